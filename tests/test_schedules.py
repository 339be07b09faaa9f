"""Temperature and alpha schedules: the closed forms, their validation, and the trainer using them per step."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import ListDataset, make_bert, random_batch, rows_from_batch

from hf_kd import DistillationConfig, DistillationTrainer, InputError
from hf_kd.schedules import schedule_value
from hf_kd.distill.checkpoint import KD_CONFIG_NAME, check_resume


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=5, logging_steps=1,
                report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    base.update(kw)
    return DistillationConfig(**base)


# ---------------------------------------------------------------- the closed forms
@pytest.mark.parametrize("start, end", [(4.0, 1.0), (0.1, 0.9), (2.0, 2.0)])
def test_schedules_start_and_end_where_asked_and_meet_half_way(start, end):
    total = 11  # steps 0..10: step 5 is half way
    for kind in ("linear", "cosine"):
        assert schedule_value(kind, start, end, 0, total) == pytest.approx(start)
        assert schedule_value(kind, start, end, 10, total) == pytest.approx(end)
        assert schedule_value(kind, start, end, 5, total) == pytest.approx((start + end) / 2)
        assert schedule_value(kind, start, end, 25, total) == pytest.approx(end)  # past the end: stays there
    for step in (0, 5, 10):
        assert schedule_value("constant", start, None, step, total) == start


def test_schedules_between_the_ends_follow_their_formulas():
    start, end, total = 4.0, 1.0, 9  # p = step / 8
    for step in range(total):
        p = step / 8
        assert schedule_value("linear", start, end, step, total) == pytest.approx(start * (1 - p) + end * p)
        # The same cosine written the other way round: start + (end - start) * (1 - cos(pi p)) / 2.
        assert schedule_value("cosine", start, end, step, total) == pytest.approx(
            start + (end - start) * (1 - math.cos(math.pi * p)) / 2
        )
    # Cosine is flatter than linear near both ends.
    assert schedule_value("cosine", start, end, 1, total) > schedule_value("linear", start, end, 1, total)
    assert schedule_value("cosine", start, end, 7, total) < schedule_value("linear", start, end, 7, total)


def test_a_single_step_run_uses_the_start_value():
    assert schedule_value("linear", 4.0, 1.0, 0, 1) == 4.0


def test_unknown_schedule_lists_the_choices():
    with pytest.raises(ValueError, match="constant, linear, cosine"):
        schedule_value("exp", 1.0, 2.0, 0, 3)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "fields, message",
    [
        ({"temperature_schedule": "linear"}, "temperature_schedule='linear' needs temperature_end"),
        ({"alpha_schedule": "cosine"}, "alpha_schedule='cosine' needs alpha_end"),
        ({"temperature_schedule": "linear", "temperature_end": 0.0}, r"temperature_end=0.0 must be > 0"),
        ({"alpha_schedule": "linear", "alpha_end": 1.5}, r"alpha_end=1.5 must be in \[0.0, 1.0\]"),
        ({"temperature_end": 1.0}, "temperature_end=1.0 is set but temperature_schedule is 'constant'"),
        ({"alpha_schedule": "step"}, "alpha_schedule='step' is unknown; use one of constant, linear, cosine"),
    ],
)
def test_bad_schedules_are_refused(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **fields)


def test_an_alpha_that_grows_from_zero_still_uses_the_teacher(tmp_path):
    args = make_args(tmp_path, alpha=0.0, alpha_schedule="linear", alpha_end=0.5)
    assert args.uses_teacher_logits
    with pytest.raises(ValueError, match="every distillation weight is zero"):
        make_args(tmp_path, alpha=0.0)


# ---------------------------------------------------------------- the trainer
def _trainer(tmp_path, n_rows=20, **kw):
    teacher = make_bert(layers=4, hidden=16, heads=4, seed=1)
    student = make_bert(layers=2, hidden=16, heads=4, seed=2)
    batch = random_batch("sequence_classification", batch=n_rows, length=8, seed=3)
    data = ListDataset(rows_from_batch(batch))
    args = make_args(tmp_path, **kw)
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data), student, teacher


def test_training_logs_the_scheduled_values_of_each_step(tmp_path):
    trainer, _, _ = _trainer(tmp_path, temperature=4.0, temperature_schedule="linear", temperature_end=1.0,
                             alpha=0.9, alpha_schedule="cosine", alpha_end=0.1)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logs] == [1, 2, 3, 4, 5]
    for e in logs:
        p = (e["step"] - 1) / 4  # the log after step s shows what step s (0-based: s - 1) used
        assert e["temperature"] == pytest.approx(4.0 - 3.0 * p)
        assert e["alpha"] == pytest.approx(0.1 + 0.8 * (1 + math.cos(math.pi * p)) / 2)
    assert logs[0]["temperature"] == 4.0 and logs[-1]["temperature"] == pytest.approx(1.0)


def test_constant_values_are_not_logged(tmp_path):
    trainer, _, _ = _trainer(tmp_path, max_steps=2, temperature_schedule="linear", temperature_end=1.0)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all("temperature" in e and "alpha" not in e for e in logs)


def test_the_loss_at_a_step_uses_that_steps_temperature_and_alpha(tmp_path):
    trainer, student, teacher = _trainer(tmp_path, temperature=4.0, temperature_schedule="cosine",
                                         temperature_end=1.0, alpha=0.2, alpha_schedule="linear", alpha_end=0.8)
    trainer.state.max_steps = 5
    trainer.state.global_step = 3  # the fourth step: p = 3/4
    T = 1.0 + 3.0 * (1 + math.cos(math.pi * 0.75)) / 2
    alpha = 0.2 + 0.6 * 0.75
    batch = random_batch("sequence_classification", batch=4, pad_from=[10, 6, 4, 8])
    student.train()
    ours = trainer.compute_loss(student, dict(batch))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    s = student(**inputs).logits.float()
    with torch.no_grad():
        t = teacher(**inputs).logits.float()
    # KL(teacher || student) at temperature T, row by row, times T^2.
    kd = sum((F.softmax(t[i] / T, -1) * (F.log_softmax(t[i] / T, -1) - F.log_softmax(s[i] / T, -1))).sum()
             for i in range(4)) / 4
    ce = F.cross_entropy(s, batch["labels"])
    assert torch.allclose(ours, alpha * T * T * kd + (1 - alpha) * ce, rtol=1e-5, atol=1e-6)
    # And not the loss at the configured start values.
    trainer.state.global_step = 0
    assert not torch.allclose(trainer.compute_loss(student, dict(batch)), ours)


def test_a_checkpoint_resumes_only_with_its_schedule(tmp_path):
    trainer, _, _ = _trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2,
                             temperature_schedule="linear", temperature_end=1.0)
    trainer.train()
    checkpoint = os.path.join(trainer.args.output_dir, "checkpoint-2")
    saved = json.load(open(os.path.join(checkpoint, KD_CONFIG_NAME)))
    assert saved["loss"]["temperature_schedule"] == "linear" and saved["loss"]["temperature_end"] == 1.0
    same, _, _ = _trainer(tmp_path, max_steps=2, temperature_schedule="linear", temperature_end=1.0)
    check_resume(checkpoint, same.checkpoint_signature())  # no error
    for changes, diff in [
        ({"temperature_schedule": "linear", "temperature_end": 1.5}, "loss.temperature_end: checkpoint 1.0, now 1.5"),
        ({}, "loss.temperature_schedule: checkpoint 'linear', now None"),
        ({"temperature_schedule": "linear", "temperature_end": 1.0, "alpha_schedule": "linear", "alpha_end": 0.2},
         "loss.alpha_schedule: checkpoint None, now 'linear'"),
    ]:
        other, _, _ = _trainer(tmp_path, max_steps=2, **changes)
        with pytest.raises(InputError, match=diff.replace(".", r"\.").replace("(", r"\(")):
            check_resume(checkpoint, other.checkpoint_signature())


def test_constant_runs_keep_the_signature_of_checkpoints_made_before_schedules(tmp_path):
    trainer, _, _ = _trainer(tmp_path, max_steps=2)
    assert not any("schedule" in k or k.endswith("_end") for k in trainer.checkpoint_signature()["loss"])


def test_the_model_card_states_the_schedule(tmp_path):
    trainer, _, _ = _trainer(tmp_path, max_steps=1, alpha_schedule="cosine", alpha_end=0.1)
    trainer.train()
    trainer.save_model()
    kd = json.load(open(os.path.join(trainer.args.output_dir, "hf_kd_provenance.json")))["distillation"]
    assert (kd["alpha"], kd["alpha_schedule"], kd["alpha_end"]) == (0.5, "cosine", 0.1)
    assert "temperature_schedule" not in kd
    card = open(os.path.join(trainer.args.output_dir, "README.md")).read()
    assert "| alpha_schedule | cosine |" in card and "| alpha_end | 0.1 |" in card
