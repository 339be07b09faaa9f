"""hf_kd.distill.search_support: the students of model_init (the checked one first, once), each trial's plan, the
default space."""

from __future__ import annotations

import pytest
from conftest import make_bert

from hf_kd import DistillationConfig, InputError
from hf_kd.distill.plan import build_plan
from hf_kd.distill.search_support import Students, search_space, trial_plan


def _args(tmp_path, **kw):
    return DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def test_the_first_student_is_built_once_and_returned_once_then_fresh_ones(tmp_path):
    made = []

    def model_init(trial):  # Trainer passes the trial; the first build (before any trial) gets None
        made.append(trial)
        return make_bert(layers=1, seed=len(made))

    students = Students(model_init)
    first = students.first
    assert made == [None]
    asked = []
    make = lambda trial: asked.append(trial) or model_init(trial)  # noqa: E731 - Trainer's call_model_init
    assert students.next(make, "t0", _args(tmp_path), "sequence_classification") is first and asked == []
    second = students.next(make, "t1", _args(tmp_path), "sequence_classification")
    assert second is not first and asked == ["t1"] and made == [None, "t1"]


def test_a_model_init_without_arguments_is_called_without_one():
    students = Students(lambda: make_bert(layers=1))
    assert students.first is not None and Students(None).first is None


def test_each_trial_plans_for_its_settings_and_a_cache_is_refused(tmp_path):
    student, teacher = make_bert(layers=2, hidden=8, heads=2), make_bert(layers=4)
    args = _args(tmp_path, hidden_weight=1.0)
    plan = trial_plan(student, teacher, args, "sequence_classification")
    assert plan.n_hidden_pairs == build_plan(student, teacher, args, "sequence_classification").n_hidden_pairs > 0
    assert trial_plan(student, teacher, _args(tmp_path), "sequence_classification").n_hidden_pairs == 0
    with pytest.raises(InputError, match="needs a live teacher.*Pass teacher_model"):
        trial_plan(student, None, args, "sequence_classification")


def test_the_default_space_is_the_distillation_settings_in_use(tmp_path):
    mine = lambda trial: {}  # noqa: E731
    assert search_space(mine, _args(tmp_path)) is mine
    assert search_space(None, _args(tmp_path, hidden_weight=1.0)).terms == ["hidden_weight"]
