"""`hf-kd distill` with task causal_lm (hf_kd.apps.data, hf_kd.apps.evaluation): packing, padding, perplexity,
and one end-to-end run on a tiny Llama checked by hand."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import WORDS, build_tokenizer, make_llama
from transformers import AutoModelForCausalLM, Trainer

from hf_kd import DistillationConfig
from hf_kd.apps.arguments import DataArguments, ModelArguments, RunArguments
from hf_kd.apps.data import pack_blocks, tokenize_texts
from hf_kd.apps.distill import run_distill
from hf_kd.apps.evaluation import pad_batch, perplexity
from hf_kd.apps.recipes import parse_distill_args
from hf_kd.student import student_from_teacher
from hf_kd.trainer import DistillationTrainer

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [1, 3]


def lm_tokenizer():
    tok = build_tokenizer()  # [CLS] words [SEP]: [SEP] ends every text
    tok.eos_token = "[SEP]"
    return tok


def write_texts(folder: Path, n_train=40, n_test=9, seed=0) -> Path:
    rng = random.Random(seed)
    folder.mkdir()
    for split, n in (("train", n_train), ("test", n_test)):
        lines = [" ".join(rng.choices(WORDS, k=rng.randint(1, 9))) for _ in range(n)]
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def teacher_dir(tmp_path):
    folder = tmp_path / "teacher"
    make_llama(layers=4, hidden=16, heads=4, vocab=64, seed=3).save_pretrained(folder)
    lm_tokenizer().save_pretrained(folder)
    return folder


def test_tokenize_texts_appends_eos_once_and_truncates():
    tok = lm_tokenizer()
    ids = tokenize_texts(tok, ["good film", "the plot was very dull"], max_tokens=4)
    assert ids[0] == tok("good film")["input_ids"] and ids[0][-1] == tok.eos_token_id  # already ended: no 2nd EOS
    assert len(ids[1]) == 4


def test_pack_blocks_is_the_concatenation_cut_into_full_blocks():
    lists = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    packed = pack_blocks(lists, block_size=4)
    assert packed["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]  # 10 tokens: 2 blocks, 9 and 10 dropped
    assert packed["labels"] == packed["input_ids"]
    assert all(m == [1] * 4 for m in packed["attention_mask"])


def test_pad_batch_labels_are_minus_100_exactly_on_padding():
    batch = pad_batch([[5, 6, 7], [8], [9, 10]], pad_id=0)
    expected_mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    assert torch.equal(batch["attention_mask"], expected_mask)
    assert torch.equal(batch["labels"] == -100, expected_mask == 0)
    assert torch.equal(batch["labels"][expected_mask == 1], torch.tensor([5, 6, 7, 8, 9, 10]))


def test_perplexity_does_not_depend_on_padding_or_batching():
    model = make_llama(layers=2, vocab=64, seed=1)
    g = random.Random(0)
    ids = [[g.randrange(1, 64) for _ in range(g.randint(2, 12))] for _ in range(7)]
    alone = perplexity(model, ids, pad_id=0, batch_size=1)
    together = perplexity(model, ids, pad_id=0, batch_size=7)
    assert together["tokens"] == alone["tokens"] == sum(len(x) - 1 for x in ids)
    assert together["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-5)


def reference_perplexity(model, tokenizer, texts) -> float:
    """Independent: one text at a time through the model's own loss, weighted by its predicted tokens."""
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text)["input_ids"]
            if ids[-1] != tokenizer.eos_token_id:
                ids = ids + [tokenizer.eos_token_id]
            x = torch.tensor([ids])
            nll += model(input_ids=x, labels=x).loss.item() * (len(ids) - 1)
            count += len(ids) - 1
    return math.exp(nll / count)


def test_pipeline_end_to_end_perplexities_and_identical_starts(tmp_path, teacher_dir, monkeypatch):
    data = write_texts(tmp_path / "texts")
    starts = {}

    def recording(cls):
        original = cls.train

        def train(self, *args, **kwargs):
            starts[cls.__name__] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return original(self, *args, **kwargs)

        return train

    monkeypatch.setattr(DistillationTrainer, "train", recording(DistillationTrainer))
    monkeypatch.setattr(Trainer, "train", recording(Trainer))

    model_args = ModelArguments(teacher_model_name_or_path=str(teacher_dir), task="causal_lm",
                                student_layers=json.dumps(LAYERS))
    data_args = DataArguments(dataset_name=str(data), block_size=16)
    config = DistillationConfig(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
        temperature=1.0, alpha=0.5, report_to=[], save_strategy="no", use_cpu=True, seed=0,
    )
    results = run_distill(model_args, data_args, RunArguments(baseline=True, report=True), config)
    ppl = {name: results[key]["perplexity"] for name, key in (("teacher", "teacher_model"), ("student_init",
           "student_at_init"), ("distilled", "distilled"), ("baseline", "baseline"))}

    tok = lm_tokenizer()
    texts = [t for t in (data / "test.txt").read_text().splitlines() if t.strip()]
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert ppl["teacher"] == pytest.approx(reference_perplexity(teacher, tok, texts), rel=1e-5)
    assert ppl["student_init"] == pytest.approx(
        reference_perplexity(student_from_teacher(teacher, LAYERS), tok, texts), rel=1e-5
    )
    distilled = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert distilled.config.num_hidden_layers == len(LAYERS)
    assert ppl["distilled"] == pytest.approx(reference_perplexity(distilled, tok, texts), rel=1e-5)
    baseline = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "baseline")
    assert ppl["baseline"] == pytest.approx(reference_perplexity(baseline, tok, texts), rel=1e-5)

    # Both runs start from the same weights (the student copied from the teacher), take the same steps,
    # and end in different places (the losses differ).
    kd_start, base_start = starts["DistillationTrainer"], starts["Trainer"]
    assert kd_start.keys() == base_start.keys()
    assert all(torch.equal(kd_start[k], base_start[k]) for k in kd_start)
    assert results["distilled"]["steps"] == results["baseline"]["steps"] == 3
    assert any(not torch.equal(distilled.state_dict()[k], baseline.state_dict()[k]) for k in kd_start)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {k: saved[k]["perplexity"] for k in ("teacher_model", "student_at_init", "distilled", "baseline")} == (
        pytest.approx({k: results[k]["perplexity"] for k in ("teacher_model", "student_at_init", "distilled", "baseline")}))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| Perplexity |" in report and "| distilled |" in report


def test_recipe_parses_and_says_how_to_run_it():
    recipe = ROOT / "recipes" / "smollm2.yaml"
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# hf-kd distill --config smollm2"), first
    lm_args, data_args, run_args, config = parse_distill_args(["--config", str(recipe)])
    assert lm_args.task == "causal_lm" and data_args.block_size == 64 and run_args.baseline
    assert lm_args.teacher_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert json.loads(lm_args.student_layers) == list(range(2, 31, 2))
    assert config.kd_loss == "forward_kl" and config.max_steps == 30
    _, quick, _, quick_config = parse_distill_args(["--config", "smollm2", "--quick", "--max_steps", "7"])
    assert quick_config.max_steps == 7 and quick.max_eval_samples == 20  # command line over quick over recipe
    assert quick_config.output_dir != config.output_dir


def test_prompt_rows_split_texts_into_prompt_and_completion():
    from hf_kd.apps.data import prompt_rows

    rows = prompt_rows(["the film was very good", "too short", "a b c d"], words=2)
    assert rows == [{"prompt": "the film", "completion": " was very good"}, {"prompt": "a b", "completion": " c d"}]


@pytest.mark.slow
def test_on_policy_run_through_hf_kd_distill(tmp_path, teacher_dir, monkeypatch):
    """prompt_words turns the texts into prompt-completion rows: the student generates every window, the baseline
    trains on the dataset's completions, the held-out perplexity is measured on the reference texts."""
    windows = []
    original = DistillationTrainer.get_batch_samples

    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        windows.append((self.rollout.last_source, out[0][0]["labels"].clone()))
        return out

    monkeypatch.setattr(DistillationTrainer, "get_batch_samples", recording)
    model_args = ModelArguments(teacher_model_name_or_path=str(teacher_dir), task="causal_lm",
                                student_layers=json.dumps(LAYERS))
    data_args = DataArguments(dataset_name=str(write_texts(tmp_path / "texts")), prompt_words=2, max_length=32)
    config = DistillationConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, temperature=1.0, alpha=1.0,
        lmbda=1.0, kd_loss="reverse_kl", generation_config={"max_new_tokens": 4}, report_to=[], save_strategy="no",
        use_cpu=True, seed=0,
    )
    results = run_distill(model_args, data_args, RunArguments(baseline=True), config)
    assert [source for source, _ in windows] == ["student", "student"]
    assert all((labels[:, :2] == -100).all() for _, labels in windows)  # [CLS] + the first prompt word carry no loss
    assert results["distilled"]["steps"] == results["baseline"]["steps"] == 2
    assert all(math.isfinite(results[k]["perplexity"]) for k in ("distilled", "baseline"))
