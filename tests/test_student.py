"""Students made from teachers keep exactly the teacher layers asked for."""

from __future__ import annotations

import pytest
import torch
from conftest import make_bert, make_llama

from hf_kd.student import student_from_teacher


def test_student_keeps_the_chosen_bert_layers_and_the_rest_of_the_teacher():
    teacher = make_bert(layers=6, hidden=16, heads=4, seed=3)
    student = student_from_teacher(teacher, [1, 3, 5])
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 6
    t, s = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 2, 4]):
        for key in [k for k in t if k.startswith(f"bert.encoder.layer.{old}.")]:
            assert torch.equal(s[key.replace(f"layer.{old}.", f"layer.{new}.")], t[key])
    for key in ("bert.embeddings.word_embeddings.weight", "classifier.weight", "bert.pooler.dense.weight"):
        assert torch.equal(s[key], t[key])
    assert not any(k.startswith("bert.encoder.layer.3.") for k in s)
    # A copy, not a view: training the student leaves the teacher alone.
    with torch.no_grad():
        student.bert.encoder.layer[0].output.dense.weight.add_(1.0)
    assert not torch.equal(student.bert.encoder.layer[0].output.dense.weight, teacher.bert.encoder.layer[0].output.dense.weight)


def test_decoder_student_renumbers_its_attention_layers():
    teacher = make_llama(layers=4)
    student = student_from_teacher(teacher, [2, 4])
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    ids = torch.randint(0, 64, (2, 6))
    assert student(input_ids=ids).logits.shape == (2, 6, 64)


@pytest.mark.parametrize("layers", [[], [0], [7], [1, 1]])
def test_bad_layer_lists_are_refused(layers):
    with pytest.raises(ValueError, match="distinct teacher layers in 1..6"):
        student_from_teacher(make_bert(layers=6), layers)
