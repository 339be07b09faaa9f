"""`hf-kd distill` with a teacher that has its own tokenizer (hf_kd.apps.tokenizers; docs/cross-tokenizer.md):
tiny models saved with tokenizers trained here, run through the app's Python entry for a few steps."""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import WORDS, make_bert, make_llama, write_tiny_csv
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from xtok_tokenizers import byte_bpe, wordpiece

from hf_kd.apps import teacher as teacher_app
from hf_kd.apps.distill import run_distill
from hf_kd.apps.recipes import parse_distill_args
from hf_kd.distill.cross_tokenizer import CrossTokenizer
from hf_kd.errors import InputError


def read_texts(path) -> list[str]:
    with open(path) as f:
        return [row["text"] for row in csv.DictReader(f)]


def save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def recorded(monkeypatch):
    """The teacher's input_ids at every distillation step, and the rows of its fine-tune."""
    seen = {"distil": [], "finetune": []}
    original = CrossTokenizer.teacher_inputs

    def teacher_inputs(self, model_inputs, labels=None):
        out = original(self, model_inputs, labels)
        seen["distil"].append(out["input_ids"].clone())
        return out

    class RecordingTrainer(teacher_app.Trainer):
        def train(self, *args, **kwargs):
            seen["finetune"].append([list(ids) for ids in self.train_dataset["input_ids"]])
            return super().train(*args, **kwargs)

    monkeypatch.setattr(CrossTokenizer, "teacher_inputs", teacher_inputs)
    monkeypatch.setattr(teacher_app, "Trainer", RecordingTrainer)
    return seen


def unpadded(batch: torch.Tensor, pad_id: int) -> list[tuple]:
    return [tuple(i for i in row.tolist() if i != pad_id) for row in batch]


def check_teacher_read_its_own_tokens(seen, wp, texts, max_length):
    """Every teacher row of every step is the WordPiece tokenization of a training text, and holds ids the student's
    BPE does not reach (the student's vocabulary is larger: only the ids are the teacher's)."""
    expected = {tuple(ids) for ids in wp(texts, truncation=True, max_length=max_length)["input_ids"]}
    assert seen["distil"], "the teacher never read a batch"
    for batch in seen["distil"]:
        assert set(unpadded(batch, wp.pad_token_id)) <= expected
        assert batch[:, 0].eq(wp.cls_token_id).all()  # the teacher tokenizer's own [CLS], absent from the BPE


@pytest.fixture
def classification_run(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_tiny_csv(data / "train.csv", n=24, seed=0)
    write_tiny_csv(data / "test.csv", n=12, seed=1)
    texts = read_texts(data / "train.csv") + read_texts(data / "test.csv")
    bpe, wp = byte_bpe(300, texts), wordpiece(120, texts)
    student = save(make_bert(layers=1, vocab=len(bpe), seed=1), bpe, tmp_path / "student")
    teacher = save(make_bert(layers=2, vocab=len(wp), seed=2), wp, tmp_path / "teacher")
    recipe = {"task": "sequence_classification", "teacher_model_name_or_path": teacher,
              "student_model_name_or_path": student, "dataset_name": str(data), "max_length": 32,
              "teacher_finetune_epochs": 1, "teacher_learning_rate": 1e-3, "cache_dir": str(tmp_path / "cache"),
              "output_dir": str(tmp_path / "out"), "max_steps": 3, "per_device_train_batch_size": 8,
              "learning_rate": 1e-2, "alpha": 0.5, "report_to": "none", "save_strategy": "no", "use_cpu": True,
              "seed": 0, "disable_tqdm": True}
    return dict(data=data, texts=read_texts(data / "train.csv"), bpe=bpe, wp=wp, student=student, teacher=teacher,
                recipe=recipe, path=tmp_path / "recipe.yaml")


def write_recipe(run, **changes) -> str:
    run["path"].write_text(yaml.safe_dump({**run["recipe"], **changes}))
    return str(run["path"])


def test_sequence_classification_across_tokenizers_through_hf_kd_distill(classification_run, recorded):
    run = classification_run
    argv = ["--config", write_recipe(run), "--teacher_tokenizer", run["teacher"], "--report", "true"]  # on the command line
    model_args, data_args, run_args, config = parse_distill_args(argv)
    assert config.teacher_tokenizer == run["teacher"]
    results = run_distill(model_args, data_args, run_args, config)

    wp, bpe = run["wp"], run["bpe"]
    # the teacher's fine-tune read its own tokenization of the labelled rows
    assert recorded["finetune"] == [wp(run["texts"], truncation=True, max_length=32)["input_ids"]]
    check_teacher_read_its_own_tokens(recorded, wp, run["texts"], 32)
    # the student trained on its own tokens: its weights moved, the losses are finite
    assert results["distilled"]["steps"] == 3 and math.isfinite(results["distilled"]["train_loss"])
    before = AutoModelForSequenceClassification.from_pretrained(run["student"]).state_dict()
    after = AutoModelForSequenceClassification.from_pretrained(config.output_dir).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert AutoTokenizer.from_pretrained(config.output_dir).get_vocab() == bpe.get_vocab()  # saved with its own
    # the teacher's accuracy was measured on its own tokens (independently recomputed here)
    teacher = AutoModelForSequenceClassification.from_pretrained(results["teacher_model"]["path"]).eval()
    with open(run["data"] / "test.csv") as f:
        rows = list(csv.DictReader(f))
    with torch.no_grad():
        enc = wp([r["text"] for r in rows], padding=True, truncation=True, max_length=32, return_tensors="pt")
        predicted = teacher(**enc).logits.argmax(-1).tolist()
    expected = sum(p == int(r["label"]) for p, r in zip(predicted, rows)) / len(rows)
    assert results["teacher_model"]["accuracy"] == pytest.approx(expected)
    report = (Path(config.output_dir) / "report.md").read_text()  # the teacher's latency timed on its own tokens
    assert "| teacher |" in report and "teacher_tokenizer" in report and run["teacher"] in report


def test_two_tokenizers_without_teacher_tokenizer_are_refused_naming_the_option(classification_run):
    run = classification_run
    with pytest.raises(InputError) as err:
        run_distill(*parse_distill_args(["--config", write_recipe(run)]))
    assert "differ" in str(err.value) and f"--teacher_tokenizer {run['teacher']}" in str(err.value)


def test_what_teacher_tokenizer_cannot_serve_is_refused_before_anything_runs(classification_run, tmp_path):
    run = classification_run
    bare = tmp_path / "bare_student"
    make_bert(layers=1, vocab=len(run["bpe"])).save_pretrained(bare)
    argv = ["--config", write_recipe(run, teacher_tokenizer=run["teacher"], student_model_name_or_path=str(bare))]
    with pytest.raises(InputError, match=r"student_model_name_or_path=.*has no tokenizer"):
        run_distill(*parse_distill_args(argv))
    argv = ["--config", write_recipe(run, teacher_tokenizer=run["teacher"], task="masked_lm")]
    with pytest.raises(InputError, match=r"a masked_lm run cannot distil across tokenizers"):
        run_distill(*parse_distill_args(argv))
    argv = ["--config", write_recipe(run, teacher_tokenizer=run["teacher"], teacher_seed="[1, 2]")]
    with pytest.raises(InputError, match=r"teacher_seed lists several teachers"):
        run_distill(*parse_distill_args(argv))
    argv = ["--config", write_recipe(run, teacher_tokenizer=run["teacher"], task="causal_lm", block_size=16)]
    with pytest.raises(InputError, match=r"block_size packs several texts"):
        run_distill(*parse_distill_args(argv))


def test_causal_lm_across_tokenizers_through_hf_kd_distill(tmp_path, recorded):
    rng = random.Random(0)
    data = tmp_path / "texts"
    data.mkdir()
    splits = {s: [" ".join(rng.choices(WORDS, k=rng.randint(3, 9))) for _ in range(n)] for s, n in (("train", 16),
                                                                                                       ("test", 6))}
    for split, lines in splits.items():
        (data / f"{split}.txt").write_text("\n".join(lines) + "\n")
    texts = splits["train"] + splits["test"]
    bpe, wp = byte_bpe(300, texts), wordpiece(120, texts)
    student = save(make_llama(layers=1, vocab=len(bpe), seed=1), bpe, tmp_path / "student")
    teacher = save(make_llama(layers=2, vocab=len(wp), seed=2), wp, tmp_path / "teacher")
    recipe = {"task": "causal_lm", "teacher_model_name_or_path": teacher, "student_model_name_or_path": student,
              "teacher_tokenizer": teacher, "dataset_name": str(data), "max_length": 32, "teacher_finetune_epochs": 1,
              "cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "out"), "max_steps": 3,
              "per_device_train_batch_size": 4, "learning_rate": 1e-2, "alpha": 1.0, "temperature": 1.0,
              "cross_tokenizer_loss": "hybrid", "report_to": "none", "save_strategy": "no", "use_cpu": True,
              "seed": 0, "logging_steps": 1, "disable_tqdm": True}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))  # teacher_tokenizer as a recipe key
    results = run_distill(*parse_distill_args(["--config", str(tmp_path / "recipe.yaml")]))

    assert recorded["finetune"] == [wp(splits["train"], truncation=True, max_length=32)["input_ids"]]
    check_teacher_read_its_own_tokens(recorded, wp, splits["train"], 32)
    logs = [results["distilled"]["first_log"], results["distilled"]["last_log"]]
    assert all(math.isfinite(e["kd_loss"]) and e["kd_loss"] > 0 for e in logs) and logs[0] != logs[1]
    before = AutoModelForCausalLM.from_pretrained(student).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # perplexities: the student's per BPE token, the teacher's per WordPiece token (its own tokens)
    assert results["teacher_model"]["tokenizer"] == teacher
    assert all(math.isfinite(results[k]["perplexity"]) for k in ("teacher_model", "distilled"))


def test_seq2seq_across_tokenizers_through_hf_kd_distill(tmp_path, recorded):
    from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

    rng = random.Random(1)
    data = tmp_path / "pairs"
    data.mkdir()
    rows = {s: [(" ".join(rng.choices(WORDS, k=rng.randint(3, 7))), " ".join(rng.choices(WORDS, k=rng.randint(2, 5))))
                for _ in range(n)] for s, n in (("train", 12), ("test", 4))}
    for split, pairs in rows.items():
        with open(data / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("text", "target"), *pairs])
    texts = [t for pairs in rows.values() for pair in pairs for t in pair]
    bpe, wp = byte_bpe(300, texts), wordpiece(120, texts)

    def t5(vocab, layers, seed):
        torch.manual_seed(seed)
        return T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=layers,
                                                   num_heads=2, dropout_rate=0.0, pad_token_id=0, eos_token_id=0,
                                                   decoder_start_token_id=0))

    student = save(t5(len(bpe), 1, 1), bpe, tmp_path / "student")
    teacher = save(t5(len(wp), 2, 2), wp, tmp_path / "teacher")
    recipe = {"task": "seq2seq_lm", "teacher_model_name_or_path": teacher, "student_model_name_or_path": student,
              "teacher_tokenizer": teacher, "dataset_name": str(data), "max_length": 32, "max_target_length": 16,
              "output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
              "learning_rate": 1e-2, "alpha": 0.5, "report_to": "none", "save_strategy": "no", "use_cpu": True,
              "seed": 0, "disable_tqdm": True}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    results = run_distill(*parse_distill_args(["--config", str(tmp_path / "recipe.yaml")]))
    sources = [s for s, _ in rows["train"]]
    expected = {tuple(ids) for ids in wp(sources, truncation=True, max_length=32)["input_ids"]}
    assert recorded["distil"] and all(set(unpadded(b, wp.pad_token_id)) <= expected for b in recorded["distil"])
    assert results["distilled"]["steps"] == 2 and math.isfinite(results["distilled"]["train_loss"])
    before = AutoModelForSeq2SeqLM.from_pretrained(student).state_dict()
    after = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(math.isfinite(results[k]["perplexity"]) for k in ("teacher_model", "distilled"))
