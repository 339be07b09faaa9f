"""hf_kd.distill.card and publish: the card's evaluations and measurements, the Hub rules."""

from types import SimpleNamespace

import pytest
from transformers.trainer_utils import HubStrategy

from conftest import make_bert, random_batch
from hf_kd import InputError, PushError
from hf_kd.distill.card import Evaluations, Latency, card_evaluation, measurements
from hf_kd.distill.publish import check_hub_strategy, merge_tags, progress_message
from hf_kd.distill.teacher_set import TeacherSet


def test_an_older_student_evaluation_is_not_the_cards():
    evaluations = {"student": (3, "eval", {"eval_accuracy": 0.8}), "teacher": (0, "teacher_eval",
                                                                           {"teacher_eval_accuracy": 0.9})}
    now = card_evaluation(evaluations, 3, "test", 10)
    assert now["student"]["accuracy"] == 0.8 and now["teacher"]["accuracy"] == 0.9 and now["rows"] == 10
    later = card_evaluation(evaluations, 5, "test", 10)
    assert "student" not in later and later["teacher"]["accuracy"] == 0.9
    assert card_evaluation({}, 5, "test", 10) is None


def test_an_evaluation_is_recorded_under_the_role_being_evaluated():
    evaluations, teacher = Evaluations(), make_bert(layers=1)
    evaluations.record(2, "eval", {"eval_loss": 0.5})
    with evaluations.of_teacher(teacher, SimpleNamespace()):
        evaluations.record(2, "teacher_eval", {"teacher_eval_loss": 0.3})
    assert evaluations.records == {"student": (2, "eval", {"eval_loss": 0.5}),
                                   "teacher": (2, "teacher_eval", {"teacher_eval_loss": 0.3})}
    with pytest.raises(RuntimeError), evaluations.of_teacher(teacher, SimpleNamespace()):
        raise RuntimeError("an evaluation that fails")
    assert evaluations.teacher is False  # the next evaluation is the student's again


def test_no_teacher_that_reads_the_student_batches_is_refused_with_the_settings_named():
    evaluations = Evaluations()
    with pytest.raises(InputError, match="teacher_cache=/cache .*teacher_tokenizer=None"):
        with evaluations.of_teacher(None, SimpleNamespace(teacher_cache="/cache", teacher_tokenizer=None)):
            pass
    assert evaluations.teacher is False and evaluations.records == {}


def test_latency_is_measured_once_a_step(tmp_path):
    calls = []
    batch = {k: v for k, v in random_batch("sequence_classification", batch=2).items() if k != "labels"}
    latency = Latency()
    models = {"student": make_bert(layers=1), "teacher": None}
    first = latency.measure(4, lambda: calls.append(1) or batch, models)
    assert latency.measure(4, lambda: calls.append(1) or batch, models) is first and len(calls) == 1
    assert first[0] == [1, 2] and set(first[1]) == {"student"} and set(first[1]["student"]) == {"1", "2"}
    teacher = make_bert()
    teacher.save_pretrained(tmp_path)
    out = measurements(tmp_path, models["student"], TeacherSet([teacher], [teacher], None), "cpu", first)
    assert out["student"]["latency_ms"] == first[1]["student"] and out["batch_sizes"] == [1, 2]
    assert out["student"]["size_mb"] > 0


def test_hub_rules():
    with pytest.raises(PushError, match="publishes the student alone"):
        check_hub_strategy(HubStrategy.CHECKPOINT)
    check_hub_strategy(HubStrategy.EVERY_SAVE)
    assert merge_tags("a", ["a", "peft"]) == ["a", "peft"] and merge_tags(None, None) is None
    assert progress_message(SimpleNamespace(save_strategy="steps"), SimpleNamespace(global_step=4)) == \
        "Training in progress, step 4"
