"""hf_kd.distill.checkpoint, projections and record: what a checkpoint records, and the resume check."""

import json
import logging

import pytest
import torch

from conftest import make_bert
from hf_kd import CardInfo, DistillationConfig, InputError, NonFiniteLossError
from hf_kd.distill.checkpoint import KD_CONFIG_NAME, check_finite_weights, check_resume, write_signature
from hf_kd.distill.plan import build_plan
from hf_kd.distill.projections import PROJECTIONS_NAME, build_projections, load_projections, save_projections
from hf_kd.distill.record import RunRecord
from hf_kd.distill.teacher_set import TeacherSet


def _record(tmp_path, student, teacher, **kw):
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)
    plan = build_plan(student, teacher, args, "sequence_classification")
    return RunRecord(args, "sequence_classification", plan, TeacherSet([teacher], [teacher], None), 0)


def test_the_signature_names_teacher_student_and_loss(tmp_path):
    student, teacher = make_bert(layers=2), make_bert(layers=4)
    signature = _record(tmp_path, student, teacher, hidden_weight=1.0).signature(student)
    assert signature["teacher"]["class"] == "BertForSequenceClassification"
    assert signature["student"]["num_hidden_layers"] == 2 and signature["loss"]["hidden_pairs"] == [[1, 2], [2, 4]]


def test_resume_accepts_its_own_signature_and_names_every_difference(tmp_path, caplog):
    student, teacher = make_bert(layers=2), make_bert(layers=4)
    write_signature(str(tmp_path), _record(tmp_path, student, teacher).signature(student))
    check_resume(str(tmp_path), json.loads(json.dumps(_record(tmp_path, student, teacher).signature(student))))
    other = _record(tmp_path, student, make_bert(layers=4, seed=5), temperature=3.0).signature(student)
    with pytest.raises(InputError) as err:
        check_resume(str(tmp_path), other)
    assert "teacher.weights_sha256" in str(err.value) and "loss.temperature: checkpoint 2.0, now 3.0" in str(err.value)
    (tmp_path / KD_CONFIG_NAME).unlink()
    with caplog.at_level(logging.WARNING, logger="hf_kd"):
        check_resume(str(tmp_path), other)
    assert f"has no {KD_CONFIG_NAME}" in caplog.text


def test_provenance_and_signature_read_one_record(tmp_path):
    student, teacher = make_bert(layers=2), make_bert(layers=4)
    record = _record(tmp_path, student, teacher, hidden_weight=1.0)
    assert record.signature(student)["teacher"]["weights_sha256"] == record.teacher(CardInfo())["weights_sha256"]
    distillation = record.distillation()
    assert {k: v for k, v in distillation.items() if k != "layer_map"} == {
        k: v for k, v in record.signature(student)["loss"].items() if k != "jsd_beta"}


def test_projections_are_seeded_and_round_trip(tmp_path):
    student = make_bert(hidden=8, heads=2)
    state = torch.random.get_rng_state()
    a, b = build_projections(student, 16, 2, seed=3), build_projections(student, 16, 2, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # the global random state is untouched
    assert len(a) == 2 and torch.equal(a[0].weight, b[0].weight)
    assert len(build_projections(student, 8, 2, seed=3)) == 0  # same widths: nothing to learn
    save_projections(a, str(tmp_path))
    c = build_projections(student, 16, 2, seed=4)
    load_projections(c, str(tmp_path), "cpu")
    assert torch.equal(c[1].weight, a[1].weight)
    (tmp_path / PROJECTIONS_NAME).unlink()
    with pytest.raises(ValueError, match=f"has no {PROJECTIONS_NAME}"):
        load_projections(c, str(tmp_path), "cpu")


def test_non_finite_weights_are_not_checkpointed():
    weight = torch.nn.Parameter(torch.tensor([1.0, float("nan")]))
    check_finite_weights([("ok", torch.nn.Parameter(torch.ones(2)))], 3)
    with pytest.raises(NonFiniteLossError, match="after step 3 \\(first: w\\)"):
        check_finite_weights([("w", weight)], 3)
