"""hf_kd.distill.teacher_set: loaded, frozen, mixed and described teachers."""

import pytest
import torch

from conftest import make_bert, random_batch
from hf_kd import DistillationConfig, InputError, weights_sha256
from hf_kd.distill.teacher_set import TeacherSet, load_teachers, teacher_folder
from hf_kd.measure import count_parameters


def _args(tmp_path, **kw):
    return DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def test_teachers_are_frozen_and_kept_in_eval_mode():
    teacher = make_bert().train()
    teachers = TeacherSet([teacher], [teacher], None)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    teachers.keep_eval()
    assert not teacher.training


def test_forward_runs_without_autograd_and_mixes_several_teachers():
    a, b = make_bert(seed=1), make_bert(seed=2)
    batch = random_batch("sequence_classification", batch=3)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    one = TeacherSet([a], [a], None).forward(inputs, {}, torch.autocast("cpu", enabled=False), kind="forward_kl",
                                           temperature=2.0)
    assert not one.logits.requires_grad and torch.equal(one.logits, a(**inputs).logits.detach())
    mixed = TeacherSet([a, b], [a, b], [1.0, 3.0]).forward(inputs, {}, torch.autocast("cpu", enabled=False),
                                                          kind="forward_kl", temperature=2.0)
    with torch.no_grad():
        p = 0.25 * torch.softmax(a(**inputs).logits / 2, -1) + 0.75 * torch.softmax(b(**inputs).logits / 2, -1)
    torch.testing.assert_close(torch.softmax(mixed.logits / 2, -1), p)  # logits T * log p_avg


def test_records_describe_every_teacher_once():
    a, b = make_bert(seed=1), make_bert(seed=2)
    teachers = TeacherSet([a, b], ["t1", None], [1.0, 1.0])
    records = teachers.records()
    assert [r["name_or_path"] for r in records][0] == "t1" and [r["weight"] for r in records] == [0.5, 0.5]
    assert records[1]["weights_sha256"] == weights_sha256(b) != records[0]["weights_sha256"]
    assert teachers.sha256() == weights_sha256(a) and teachers.parameters() == count_parameters(a)
    assert teachers.hidden_size() == 16 and teachers.class_name == "BertForSequenceClassification"


def test_several_teachers_refuse_layer_losses_and_wrong_weights(tmp_path):
    a, b = make_bert(seed=1), make_bert(seed=2)
    with pytest.raises(InputError, match="need a single teacher"):
        load_teachers([a, b], _args(tmp_path, hidden_weight=1.0), "sequence_classification")
    with pytest.raises(InputError, match="teacher_weights has 1 values for 2 teachers"):
        load_teachers([a, b], _args(tmp_path, teacher_weights=[1.0]), "sequence_classification")
    with pytest.raises(InputError, match="empty list"):
        load_teachers([], _args(tmp_path), "sequence_classification")


def test_a_teacher_named_by_folder_is_loaded_from_it(tmp_path):
    make_bert(seed=3).save_pretrained(tmp_path / "t")
    [loaded] = load_teachers([str(tmp_path / "t")], _args(tmp_path), "sequence_classification")
    assert weights_sha256(loaded) == weights_sha256(make_bert(seed=3))
    assert teacher_folder(str(tmp_path / "t")) == str(tmp_path / "t") and teacher_folder(make_bert()) is None
