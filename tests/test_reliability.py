"""Reliability: exact resume, numerical safety, bad input refused before training, device and dtype."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import (
    ListDataset,
    build_tokenizer,
    make_bert,
    random_batch,
    rows_from_batch,
)
from test_trainer import ALL_TASKS, make_args, task_pair
from transformers import BertForSequenceClassification, PreTrainedTokenizerFast, TrainerCallback

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd import InputError, NonFiniteLossError
from hf_kd.distill.checkpoint import KD_CONFIG_NAME


def _dataset(task="sequence_classification", n=8, **kw):
    return ListDataset(rows_from_batch(random_batch(task, batch=n, **kw)))


# ---------------------------------------------------------------- 1. exact resume
class _StopAt(TrainerCallback):
    """Interrupts a run after `step` (its checkpoint is written first, as save_steps divides it)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _resume_pair(seed_offset=0):
    # Dropout on: the resumed run must restore the RNG state to draw the same masks.
    teacher = make_bert(layers=4, hidden=16, heads=4, seed=1)
    torch.manual_seed(2 + seed_offset)
    from conftest import bert_config

    cfg = bert_config(layers=2, hidden=8, heads=2)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.1
    return teacher, BertForSequenceClassification(cfg)


def _resume_args(out, **kw):
    return make_args(
        out, output_dir=str(out), max_steps=6, save_strategy="steps", save_steps=3, per_device_train_batch_size=4,
        hidden_weight=1.0, learning_rate=1e-2, **kw,
    )


def test_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path):
    """Pins two bugs: projection gradients were never zeroed (Trainer zeroes the student's only), so they
    added up over steps and a resumed run diverged; logged components were divided by all steps since 0."""
    data = _dataset(n=16, pad_from=[10, 7, 5, 9] * 4)
    teacher, student = _resume_pair()
    full = DistillationTrainer(model=student, teacher_model=teacher, args=_resume_args(tmp_path / "a"), train_dataset=data)
    full.train()

    teacher, student = _resume_pair()
    first = DistillationTrainer(model=student, teacher_model=teacher, args=_resume_args(tmp_path / "b"), train_dataset=data)
    first.add_callback(_StopAt(3))
    first.train()
    assert first.state.global_step == 3
    assert (tmp_path / "b" / "checkpoint-3" / KD_CONFIG_NAME).is_file()

    teacher, student = _resume_pair(seed_offset=5)  # other initial weights: all must come from the checkpoint
    resumed = DistillationTrainer(
        model=student, teacher_model=teacher, args=_resume_args(tmp_path / "b"), train_dataset=data
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Logged components after the resume average the steps since the resume, as in the uninterrupted run.
    logs = lambda t: {e["step"]: e for e in t.state.log_history if "loss" in e}  # noqa: E731
    la, lb = logs(full), logs(resumed)
    for step in (4, 5, 6):
        for name in ("loss", "kd_loss", "ce_loss", "hidden_loss"):
            assert la[step][name] == lb[step][name], (step, name)
    pa, pb = full.projections.state_dict(), resumed.projections.state_dict()
    assert len(pa) == 4
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


@pytest.mark.parametrize(
    "change,match",
    [
        ("teacher", r"teacher.weights_sha256"),
        ("student", r"student.num_hidden_layers: checkpoint 2, now 3"),
        ("loss", r"loss.temperature: checkpoint 2.0, now 4.0"),
    ],
)
def test_resume_with_another_setup_is_refused(tmp_path, change, match):
    data = _dataset()
    teacher, student = make_bert(layers=4, hidden=16, heads=4, seed=1), make_bert(layers=2, hidden=8, heads=2, seed=2)
    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, hidden_weight=1.0)
    DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data).train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    record = json.loads((ckpt / KD_CONFIG_NAME).read_text())
    assert record["loss"]["temperature"] == 2.0 and record["loss"]["projections"] == 2

    teacher2 = make_bert(layers=4, hidden=16, heads=4, seed=9 if change == "teacher" else 1)
    student2 = make_bert(layers=3 if change == "student" else 2, hidden=8, heads=2, seed=2)
    kw = {"temperature": 4.0} if change == "loss" else {}
    args2 = make_args(tmp_path, max_steps=4, hidden_weight=1.0, **kw)
    before = {k: v.clone() for k, v in student2.state_dict().items()}
    trainer = DistillationTrainer(model=student2, teacher_model=teacher2, args=args2, train_dataset=data)
    with pytest.raises(InputError, match=match):
        trainer.train(resume_from_checkpoint=str(ckpt))
    for k, v in student2.state_dict().items():  # refused before any weight was loaded
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- 2. numerical safety
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 5.0, 20.0])
@pytest.mark.parametrize("kd_loss", ["forward_kl", "jsd"])
def test_half_precision_autocast_gives_finite_loss_and_grads(tmp_path, dtype, temperature, kd_loss):
    teacher, student = task_pair("sequence_classification")
    args = make_args(tmp_path, temperature=temperature, kd_loss=kd_loss, hidden_weight=1.0, attention_weight=1.0,
                     attention_loss="kl", hidden_loss="cosine")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    student.train()
    batch = random_batch("sequence_classification", pad_from=[10, 4, 6, 2])
    with torch.autocast("cpu", dtype=dtype):
        loss = trainer.compute_loss(student, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in [*student.parameters(), *trainer.projections.parameters()] if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("temperature", [0.5, 20.0])
def test_fp16_models_give_finite_loss_and_grads(tmp_path, temperature):
    teacher, student = task_pair("causal_lm")
    student, teacher = student.half(), teacher.half()
    args = make_args(tmp_path, temperature=temperature, hidden_weight=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    student.train()
    batch = random_batch("causal_lm", pad_from=[10, 4, 6, 2])
    loss = trainer.compute_loss(student, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


@pytest.mark.parametrize("temperature", [0.5, 20.0])
def test_bf16_mixed_precision_training_run_is_finite(tmp_path, temperature):
    teacher, student = task_pair("token_classification")
    args = make_args(tmp_path, bf16=True, temperature=temperature, hidden_weight=1.0, attention_weight=1.0,
                     max_steps=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=_dataset("token_classification", pad_from=[10, 3, 6, 1, 10, 8, 2, 5]))
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs and all(math.isfinite(e[k]) for e in logs for k in ("loss", "kd_loss", "hidden_loss", "grad_norm"))
    assert all(torch.isfinite(p).all() for p in student.parameters())


class _NaNTeacherAt:
    """Teacher forward that returns NaN logits from the `call`-th training call on."""

    def __init__(self, teacher, call):
        self.orig, self.call, self.n = teacher.forward, call, 0

    def __call__(self, *a, **kw):
        out = self.orig(*a, **kw)
        self.n += 1
        if self.n >= self.call:
            out.logits = torch.full_like(out.logits, float("nan"))
        return out


def test_nan_teacher_logits_stop_with_step_and_component_and_no_checkpoint_after(tmp_path):
    teacher, student = task_pair("sequence_classification")
    args = make_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_dataset(n=24))
    teacher.forward = _NaNTeacherAt(teacher, call=3)
    with pytest.raises(NonFiniteLossError, match=r"non-finite kd_loss at step 3 \(the teacher's logits hold NaN/inf\)"):
        trainer.train()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]
    from safetensors.torch import load_file

    weights = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_nonfinite_weights_are_never_saved_over_a_good_checkpoint(tmp_path):
    teacher, student = task_pair("sequence_classification")
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_dataset(n=16))

    class Poison(TrainerCallback):  # stands for an overflowing backward pass at step 2
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                with torch.no_grad():
                    student.classifier.weight[0, 0] = float("inf")

    trainer.add_callback(Poison())
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf after step 2 \(first: classifier.weight\)"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]


def test_skip_drops_the_nonfinite_batch_and_goes_on(tmp_path, caplog):
    teacher, student = task_pair("sequence_classification")
    args = make_args(tmp_path, max_steps=4, nonfinite_loss="skip", learning_rate=1e-2, lr_scheduler_type="constant",
                     optim="sgd")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_dataset(n=16))
    orig, calls = teacher.forward, []

    def only_second(*a, **kw):  # NaN teacher logits at the second step only
        calls.append(1)
        out = orig(*a, **kw)
        if len(calls) == 2:
            out.logits = torch.full_like(out.logits, float("nan"))
        return out

    teacher.forward = only_second
    before = {}

    class Snap(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            before[state.global_step] = {k: v.clone() for k, v in student.state_dict().items()}

    trainer.add_callback(Snap())
    with caplog.at_level("WARNING", logger="hf_kd.distill.nonfinite"):
        trainer.train()
    assert trainer.skipped_steps == [(2, "kd_loss")]
    assert "non-finite kd_loss at step 2" in caplog.text
    assert all(torch.isfinite(p).all() for p in student.parameters())
    # Plain SGD without weight decay: a dropped gradient leaves the weights of that step unchanged.
    after_step2 = before[2]
    for k, v in before[1].items():
        assert torch.equal(v, after_step2[k]), k
    assert any(not torch.equal(v, before[2][k]) for k, v in before[3].items())


@pytest.mark.parametrize("field,value,match", [
    ("nonfinite_loss", "ignore", r"nonfinite_loss='ignore' is unknown; use 'stop' or 'skip'"),
    ("teacher_dtype", "fp8", r"teacher_dtype='fp8' is unknown"),
])
def test_new_config_fields_are_validated(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        DistillationConfig(output_dir=str(tmp_path / "out"), report_to=[], **{field: value})


# ---------------------------------------------------------------- 3. bad input, refused before training
def _refused(tmp_path, match, student, teacher, error=InputError, **kwargs):
    out = tmp_path / "refused"
    with pytest.raises(error, match=match):
        DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, output_dir=str(out)), **kwargs)
    assert not out.exists(), "nothing may be written to output_dir when input is refused"


def _shuffled_tokenizer():
    """Same words and size as conftest's tokenizer, two of them with swapped ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    base = build_tokenizer().get_vocab()
    vocab = dict(base)
    vocab["good"], vocab["bad"] = base["bad"], base["good"]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def test_refuses_tokenizers_of_equal_size_with_other_ids(tmp_path, tiny_pair):
    teacher, student = tiny_pair
    a, b = build_tokenizer(), _shuffled_tokenizer()
    assert len(a) == len(b)
    _refused(tmp_path, r"2 tokens have other ids \(e.g. 'bad' is \d+ for the student, \d+ for the teacher\)",
             student, teacher, processing_class=b, teacher_tokenizer=a)


def test_teacher_tokenizer_is_read_from_the_teacher_folder(tmp_path, tiny_pair):
    teacher, student = tiny_pair
    teacher.save_pretrained(tmp_path / "teacher")
    build_tokenizer().save_pretrained(tmp_path / "teacher")
    _refused(tmp_path, r"tokens have other ids", student, str(tmp_path / "teacher"), processing_class=_shuffled_tokenizer())
    # The same tokenizer passes.
    DistillationTrainer(model=student, teacher_model=str(tmp_path / "teacher"), args=make_args(tmp_path),
                        processing_class=build_tokenizer())


def test_refuses_an_empty_dataset(tmp_path, tiny_pair):
    teacher, student = tiny_pair
    _refused(tmp_path, r"train_dataset is empty", student, teacher, train_dataset=ListDataset([]))


@pytest.mark.parametrize("task", ["sequence_classification", "token_classification", "causal_lm"])
def test_refuses_labels_out_of_range(tmp_path, task):
    teacher, student = task_pair(task)
    batch = random_batch(task, batch=4)
    batch["labels"][1] = 70 if task == "causal_lm" else 5
    _refused(tmp_path, r"labels \[(5|70)\] outside 0\.\.", student, teacher, train_dataset=ListDataset(rows_from_batch(batch)))


def test_labels_are_scanned_in_a_datasets_dataset_by_column(tmp_path, tiny_pair):
    from datasets import Dataset

    teacher, student = tiny_pair
    rows = rows_from_batch(random_batch("sequence_classification", batch=4))
    data = Dataset.from_list([{"input_ids": r["input_ids"].tolist(), "label": 3} for r in rows])
    _refused(tmp_path, r"labels \[3\] outside 0\.\.1", student, teacher, train_dataset=data)


def test_refuses_sequences_longer_than_either_models_positions(tmp_path, tiny_pair):
    teacher, student = tiny_pair  # both 64 positions
    data = _dataset(n=2, length=80)
    _refused(tmp_path, r"sequences of 80 tokens, longer than the student's max_position_embeddings=64.*max_length=64",
             student, teacher, train_dataset=data)


def test_refuses_a_missing_or_unreadable_teacher_path(tmp_path, tiny_pair):
    _, student = tiny_pair
    _refused(tmp_path, r"'missing/path' is not a local folder", student, "missing/path")
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, r"has no config.json", student, str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    _refused(tmp_path, r"Could not load the teacher", student, str(tmp_path / "broken"))


# ---------------------------------------------------------------- 4. device and dtype
@pytest.mark.parametrize("teacher_dtype,expected", [("auto", torch.float32), ("bfloat16", torch.bfloat16)])
def test_teacher_dtype_follows_the_student_unless_asked(tmp_path, teacher_dtype, expected):
    teacher, student = task_pair("sequence_classification")
    teacher = teacher.to(torch.float64)  # a mismatch: fp64 teacher, fp32 student
    args = make_args(tmp_path, teacher_dtype=teacher_dtype, hidden_weight=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    assert next(trainer.teacher.parameters()).dtype == expected
    student.train()
    loss = trainer.compute_loss(student, random_batch("sequence_classification"))
    assert torch.isfinite(loss)
    loss.backward()


def test_bf16_teacher_with_fp32_student_kept_bf16_gives_finite_loss(tmp_path):
    teacher, student = task_pair("causal_lm")
    teacher = teacher.to(torch.bfloat16)
    args = make_args(tmp_path, teacher_dtype="bfloat16", hidden_weight=1.0, max_steps=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_dataset("causal_lm"))
    trainer.train()
    assert next(trainer.teacher.parameters()).dtype == torch.bfloat16
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


def test_refuses_a_teacher_on_the_meta_device(tmp_path, tiny_pair):
    _, student = tiny_pair
    with torch.device("meta"):
        teacher = make_bert(layers=4, hidden=16, heads=4)
    _refused(tmp_path, r"teacher's weights are on the 'meta' device.*from_pretrained", student, teacher)


# ---------------------------------------------------------------- 5. what trains and what does not
@pytest.mark.parametrize("task", ALL_TASKS)
def test_every_student_parameter_changes_and_no_teacher_parameter_does(tmp_path, task):
    teacher, student = task_pair(task)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.named_parameters()}
    args = make_args(tmp_path, max_steps=3, learning_rate=1e-2, hidden_weight=1.0, attention_weight=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_dataset(task, n=8))
    trainer.train()
    unchanged = [k for k, v in student.named_parameters() if torch.equal(v, student_before[k])]
    assert not unchanged, f"student parameters that did not train: {unchanged}"
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


# ---------------------------------------------------------------- 3. bad input through the command line
from test_cli import tiny_recipe  # noqa: E402,F401 - the fixture
import yaml  # noqa: E402

from hf_kd.cli import main  # noqa: E402


def _cli_refused(tiny, match, **changes):
    path, tmp, _ = tiny
    recipe = yaml.safe_load(path.read_text())
    recipe.update(changes)
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit, match=match):
        main(["distill", "--config", str(path)])
    assert not (tmp / "out").exists(), "nothing may be written when input is refused"
    return tmp


def test_cli_refuses_a_missing_teacher_path(tiny_recipe):
    _cli_refused(tiny_recipe, r"teacher_model_name_or_path='/nowhere/teacher' does not exist",
                 teacher_model_name_or_path="/nowhere/teacher")


def test_cli_refuses_a_base_model_teacher_without_finetuning(tiny_recipe):
    _, tmp, teacher = tiny_recipe
    teacher.bert.save_pretrained(tmp / "base")
    _cli_refused(tiny_recipe, r"is a BertModel, not a sequence classifier.*teacher_finetune_epochs > 0",
                 teacher_model_name_or_path=str(tmp / "base"))


def test_cli_refuses_a_student_tokenizer_with_other_ids(tiny_recipe):
    _, tmp, _ = tiny_recipe
    student = make_bert(layers=2, hidden=16, heads=4, vocab=len(build_tokenizer()))
    student.save_pretrained(tmp / "student")
    _shuffled_tokenizer().save_pretrained(tmp / "student")
    _cli_refused(tiny_recipe, r"tokens have other ids", student_model_name_or_path=str(tmp / "student"),
                 student_layers=None)


def test_cli_refuses_a_missing_text_column(tiny_recipe):
    _cli_refused(tiny_recipe, r"no column 'sentence'.*set text_column", text_column="sentence")


def test_cli_refuses_unlabelled_rows(tiny_recipe):
    _, tmp, _ = tiny_recipe
    test_csv = tmp / "data" / "test.csv"
    lines = test_csv.read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ",-1"
    test_csv.write_text("\n".join(lines) + "\n")
    _cli_refused(tiny_recipe, r"1 rows of the 'test' split have no label")


def test_cli_refuses_an_empty_split(tiny_recipe):
    _, tmp, _ = tiny_recipe
    (tmp / "data" / "test.csv").write_text("text,label\n")
    _cli_refused(tiny_recipe, r"has no rows \(Instruction \"test\" corresponds to no data")


def test_cli_refuses_max_length_beyond_the_models_positions(tiny_recipe):
    _cli_refused(tiny_recipe, r"max_length=100 is longer than the tokenizer's model_max_length=64 \(.*teacher: the model's "
                 r"maximum positions\); set max_length to 64 or less", max_length=100)
