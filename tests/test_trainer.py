"""DistillationTrainer: loss wiring, teacher isolation, masking, accumulation, logging, saving."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    TASK_MODELS,
    ListDataset,
    make_bert,
    make_llama,
    random_batch,
    rows_from_batch,
)
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, TrainerCallback

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.distill.projections import PROJECTIONS_NAME


def make_args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return DistillationConfig(**base)


def task_pair(task):
    if task == "causal_lm":
        return make_llama(layers=4, hidden=16, heads=4, seed=1), make_llama(layers=2, hidden=8, heads=2, seed=2)
    cls = TASK_MODELS[task]
    return (
        make_bert(cls, layers=4, hidden=16, heads=4, seed=1),
        make_bert(cls, layers=2, hidden=8, heads=2, seed=2),
    )


ALL_TASKS = ["sequence_classification", "token_classification", "question_answering", "masked_lm", "causal_lm"]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_every_component_is_finite_and_logged_for_each_task(tmp_path, task):
    teacher, student = task_pair(task)
    batch = random_batch(task, batch=8, pad_from=[10, 7, 5, 9, 10, 3, 8, 6])
    args = make_args(tmp_path, hidden_weight=1.0, attention_weight=1.0, max_steps=2)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=ListDataset(rows_from_batch(batch))
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    expected = {"kd_loss", "hidden_loss", "attention_loss", "ce_loss"}
    for entry in logs:
        assert expected <= entry.keys()
        for name in expected | {"loss"}:
            assert math.isfinite(entry[name])
        assert entry["kd_loss"] >= 0 and entry["hidden_loss"] > 0


def _manual_loss(student, teacher, batch, args, projections):
    """The total loss written out with torch.nn.functional, independently of hf_kd.losses."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    s = student(**inputs, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        t = teacher(**inputs, output_hidden_states=True, output_attentions=True)
    T = args.temperature
    kd = F.kl_div(
        F.log_softmax(s.logits.float() / T, -1), F.log_softmax(t.logits.float() / T, -1), log_target=True,
        reduction="batchmean",
    )
    ce = F.cross_entropy(s.logits.float(), batch["labels"])
    mask = batch["attention_mask"].bool()
    hidden = []
    for i, (ks, kt) in enumerate([(1, 2), (2, 4)]):  # uniform map for 2 -> 4 layers
        diff = (projections[i](s.hidden_states[ks]) - t.hidden_states[kt]) ** 2  # (B, T, D)
        hidden.append(diff.mean(-1)[mask].mean())
    attn = []
    pair = mask[:, :, None] & mask[:, None, :]  # (B, T, T)
    for ks, kt in [(1, 2), (2, 4)]:
        sa = s.attentions[ks - 1].mean(1)  # heads differ: compare head averages
        ta = t.attentions[kt - 1].mean(1)
        attn.append(((sa - ta) ** 2)[pair].mean())
    return (
        args.alpha * T * T * kd
        + (1 - args.alpha) * ce
        + args.hidden_weight * torch.stack(hidden).mean()
        + args.attention_weight * torch.stack(attn).mean()
    )


def test_total_loss_matches_the_formula_written_out(tmp_path, tiny_pair):
    teacher, student = tiny_pair
    args = make_args(tmp_path, temperature=3.0, alpha=0.3, hidden_weight=0.7, attention_weight=2.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    batch = random_batch("sequence_classification", batch=4, pad_from=[10, 6, 4, 8])
    student.train()
    ours = trainer.compute_loss(student, dict(batch))
    expected = _manual_loss(student, teacher, batch, args, trainer.projections)
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_ce_term_is_absent_without_labels(tmp_path, tiny_pair):
    teacher, student = tiny_pair
    args = make_args(tmp_path, alpha=0.4)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    batch = random_batch("sequence_classification")
    batch.pop("labels")
    student.train()
    loss = trainer.compute_loss(student, batch)
    s = student(**batch).logits
    t = teacher(**batch).logits
    kd = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="batchmean")
    assert torch.allclose(loss, 0.4 * 4 * kd, rtol=1e-5)
    assert "ce_loss" not in trainer.meter.sums


def test_unlabelled_rows_train_on_the_teacher_alone(tmp_path, tiny_pair):
    """Rows labelled -100 (an unlabelled transfer set) add KD but no CE; CE averages the labelled rows."""
    teacher, student = tiny_pair
    args = make_args(tmp_path, alpha=0.3, temperature=2.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    batch = random_batch("sequence_classification", batch=6, pad_from=[10, 6, 4, 8, 9, 3])
    batch["labels"][[0, 3, 4]] = -100
    student.train()
    loss = trainer.compute_loss(student, dict(batch))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    s = student(**inputs).logits.float()
    t = teacher(**inputs).logits.float()
    kd = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="batchmean")
    keep = torch.tensor([1, 2, 5])
    ce = F.cross_entropy(s[keep], batch["labels"][keep])
    assert torch.allclose(loss, 0.3 * 4 * kd + 0.7 * ce, rtol=1e-5)


@pytest.mark.parametrize("task", ["sequence_classification", "token_classification", "causal_lm", "masked_lm"])
def test_extra_padding_does_not_change_the_loss(tmp_path, task):
    teacher, student = task_pair(task)
    args = make_args(tmp_path, hidden_weight=1.0, attention_weight=1.0, attention_loss="kl")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    short = random_batch(task, batch=3, length=8, pad_from=[8, 5, 3])
    longer = {}
    for k, v in short.items():
        if v.dim() == 2:
            fill = -100 if k == "labels" else 0
            longer[k] = torch.cat([v, torch.full((v.shape[0], 5), fill, dtype=v.dtype)], dim=1)
        else:
            longer[k] = v
    student.train()
    a = trainer.compute_loss(student, dict(short))
    b = trainer.compute_loss(student, dict(longer))
    assert torch.allclose(a, b, atol=1e-5), (a.item(), b.item())


def test_all_masked_batch_gives_zero_not_nan(tmp_path):
    teacher, student = task_pair("token_classification")
    args = make_args(tmp_path, alpha=0.5)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    batch = random_batch("token_classification")
    batch["labels"][:] = -100
    student.train()
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


class _TrainTeacherCallback(TrainerCallback):
    """A careless callback that switches the teacher to train mode at every step."""

    def __init__(self, teacher):
        self.teacher = teacher
        self.modes = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.teacher.train()

    def on_step_end(self, args, state, control, **kwargs):
        self.modes.append(self.teacher.training)


def test_teacher_is_frozen_eval_absent_from_optimizer_and_unchanged(tmp_path, tiny_pair):
    teacher, student = tiny_pair
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    batch = random_batch("sequence_classification", batch=8)
    args = make_args(tmp_path, hidden_weight=1.0, attention_weight=1.0, max_steps=3, learning_rate=1e-2)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=ListDataset(rows_from_batch(batch))
    )
    callback = _TrainTeacherCallback(teacher)
    trainer.add_callback(callback)
    seen = []
    orig_forward = teacher.forward

    def spy(*a, **kw):
        seen.append((teacher.training, torch.is_grad_enabled()))
        return orig_forward(*a, **kw)

    teacher.forward = spy
    trainer.train()
    assert seen and all(mode is False and grad is False for mode, grad in seen)
    assert all(not p.requires_grad for p in teacher.parameters())
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in trainer.projections.parameters()} <= in_optimizer
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    assert next(teacher.parameters()).device == next(student.parameters()).device


def test_checkpoint_and_saved_model_hold_the_student_alone(tmp_path, tiny_pair):
    teacher, student = tiny_pair
    batch = random_batch("sequence_classification", batch=8)
    args = make_args(tmp_path, hidden_weight=1.0, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=ListDataset(rows_from_batch(batch))
    )
    trainer.train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    weights = load_file(str(ckpt / "model.safetensors"))
    assert set(weights) == set(student.state_dict())
    assert (ckpt / PROJECTIONS_NAME).is_file()
    proj = load_file(str(ckpt / PROJECTIONS_NAME))
    assert set(proj) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    final = tmp_path / "final"
    trainer.save_model(str(final))
    weight_files = [p.name for p in final.iterdir() if p.name.startswith(("model", "pytorch_model", "kd_"))]
    assert weight_files == ["model.safetensors"]
    assert set(load_file(str(final / "model.safetensors"))) == set(student.state_dict())
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(final))
    assert reloaded.config.num_hidden_layers == 2 and reloaded.config.hidden_size == 8
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, student.state_dict()[k]), k

    # Resuming reloads the projections (and their optimizer state, which Trainer saves with the rest).
    teacher2, student2 = make_bert(layers=4, hidden=16, heads=4, seed=1), make_bert(layers=2, hidden=8, heads=2, seed=2)
    args2 = make_args(tmp_path, hidden_weight=1.0, max_steps=3, save_strategy="no")
    trainer2 = DistillationTrainer(
        model=student2, teacher_model=teacher2, args=args2, train_dataset=ListDataset(rows_from_batch(batch))
    )
    loaded = {}
    orig = trainer2.projections.load_state_dict
    trainer2.projections.load_state_dict = lambda sd, *a, **k: (loaded.update(sd), orig(sd, *a, **k))[1]
    trainer2.train(resume_from_checkpoint=str(ckpt))
    assert set(loaded) == set(proj) and torch.equal(loaded["0.weight"], proj["0.weight"])


def _accumulation_run(tmp_path, name, per_device, accumulation, task="token_classification"):
    teacher, student = task_pair(task)
    # Variable numbers of labelled tokens per micro-batch: a per-micro-batch mean would weigh them wrongly.
    batch = random_batch(task, batch=8, pad_from=[10, 2, 7, 3, 10, 1, 5, 9], seed=3)
    if task == "sequence_classification":  # unlabelled rows (a transfer set), unevenly spread
        batch["labels"][[1, 2, 3, 6]] = -100
    args = make_args(
        tmp_path / name,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        max_steps=2,
        hidden_weight=1.0,
        attention_weight=1.0,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=ListDataset(rows_from_batch(batch))
    )
    trainer.train()
    return student.state_dict(), trainer.projections.state_dict(), trainer.state.log_history


@pytest.mark.parametrize("task", ["token_classification", "sequence_classification"])
def test_gradient_accumulation_equals_the_larger_batch(tmp_path, task):
    big, big_proj, big_logs = _accumulation_run(tmp_path, "big", per_device=8, accumulation=1, task=task)
    acc, acc_proj, acc_logs = _accumulation_run(tmp_path, "acc", per_device=2, accumulation=4, task=task)
    for k in big:
        assert torch.allclose(big[k], acc[k], atol=1e-6, rtol=1e-5), k
    for k in big_proj:
        assert torch.allclose(big_proj[k], acc_proj[k], atol=1e-6, rtol=1e-5), k
    for a, b in zip(big_logs, acc_logs):
        for name in ("loss", "kd_loss", "ce_loss", "hidden_loss", "attention_loss"):
            if name in a:
                assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-7), name


def test_logged_components_average_the_steps_since_the_last_log(tmp_path):
    def run(logging_steps):
        teacher, student = task_pair("sequence_classification")
        batch = random_batch("sequence_classification", batch=16, pad_from=[10, 3] * 8)
        args = make_args(tmp_path / str(logging_steps), max_steps=4, logging_steps=logging_steps, hidden_weight=1.0)
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=ListDataset(rows_from_batch(batch))
        )
        trainer.train()
        return [e for e in trainer.state.log_history if "loss" in e]

    every, pairs = run(1), run(2)
    assert len(every) == 4 and len(pairs) == 2
    for name in ("kd_loss", "ce_loss", "hidden_loss"):
        assert pairs[0][name] == pytest.approx((every[0][name] + every[1][name]) / 2, rel=1e-5)
        assert pairs[1][name] == pytest.approx((every[2][name] + every[3][name]) / 2, rel=1e-5)


def test_bf16_student_losses_are_fp32_and_finite(tmp_path):
    teacher, student = task_pair("causal_lm")
    student, teacher = student.to(torch.bfloat16), teacher.to(torch.bfloat16)
    args = make_args(tmp_path, temperature=20.0, hidden_weight=1.0, attention_weight=1.0, attention_loss="kl")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    student.train()
    batch = random_batch("causal_lm", pad_from=[10, 4, 6, 2])
    loss = trainer.compute_loss(student, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_sdpa_models_are_switched_to_eager_for_attention_maps(tmp_path):
    teacher, student = task_pair("sequence_classification")
    student.set_attn_implementation("sdpa")
    teacher.set_attn_implementation("sdpa")
    args = make_args(tmp_path, attention_weight=1.0)
    DistillationTrainer(model=student, teacher_model=teacher, args=args)
    assert student.config._attn_implementation == "eager"
    assert teacher.config._attn_implementation == "eager"


def test_missing_attention_maps_raise_instead_of_zero(tmp_path):
    teacher, student = task_pair("sequence_classification")
    args = make_args(tmp_path, attention_weight=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    orig = student.forward

    def no_attn(*a, **kw):
        out = orig(*a, **kw)
        out.attentions = None
        return out

    student.forward = no_attn
    student.train()
    with pytest.raises(RuntimeError, match="no attention maps"):
        trainer.compute_loss(student, random_batch("sequence_classification"))


def test_teacher_given_as_path_is_loaded_with_the_students_auto_class(tmp_path, tiny_pair):
    teacher, student = tiny_pair
    teacher.save_pretrained(tmp_path / "teacher")
    trainer = DistillationTrainer(model=student, teacher_model=str(tmp_path / "teacher"), args=make_args(tmp_path))
    assert type(trainer.teacher).__name__ == "BertForSequenceClassification"
    assert not trainer.teacher.training
    for k, v in trainer.teacher.state_dict().items():
        assert torch.equal(v, teacher.state_dict()[k])


# ---------------------------------------------------------------- bad input, refused before training
def _refused(tmp_path, match, student, teacher, **config):
    out = tmp_path / "refused"
    with pytest.raises(ValueError, match=match):
        args = make_args(tmp_path, output_dir=str(out), **config)
        DistillationTrainer(model=student, teacher_model=teacher, args=args)
    assert not out.exists(), "nothing may be written to output_dir when input is refused"


def test_refuses_different_vocabularies(tmp_path):
    teacher = make_llama(layers=2, vocab=80)
    student = make_llama(layers=1, vocab=64)
    _refused(tmp_path, r"vocabulary has 64 tokens and the teacher's 80", student, teacher)


def test_refuses_different_label_counts(tmp_path):
    teacher = make_bert(num_labels=3)
    student = make_bert(layers=2, num_labels=2)
    _refused(tmp_path, r"2 labels and the teacher 3", student, teacher)


@pytest.mark.parametrize(
    "layer_map,match",
    [([[1, 5]], r"outside the models"), ([[3, 1]], r"outside the models"), ([[0, 0]], r"no attention map")],
)
def test_refuses_layer_maps_outside_either_model(tmp_path, tiny_pair, layer_map, match):
    teacher, student = tiny_pair
    _refused(tmp_path, match, student, teacher, attention_weight=1.0, layer_map=layer_map)


def test_refuses_teacher_without_task_head(tmp_path, tiny_pair):
    teacher, student = tiny_pair
    teacher.bert.save_pretrained(tmp_path / "base")  # a BertModel: no classifier weights
    _refused(tmp_path, r"not a sequence classification model", student, str(tmp_path / "base"))


def test_refuses_teacher_for_another_task(tmp_path, tiny_pair):
    _, student = tiny_pair
    teacher = make_bert(TASK_MODELS["token_classification"])
    _refused(tmp_path, r"solves token_classification", student, teacher)
