"""DistillationConfig validation, HfArgumentParser round trips, and layer maps."""

from __future__ import annotations

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_kd import DistillationConfig
from hf_kd.layer_map import resolve_layer_map


def cfg(tmp_path, **kw):
    return DistillationConfig(output_dir=str(tmp_path / "out"), report_to=[], **kw)


def test_defaults_and_inheritance(tmp_path):
    c = cfg(tmp_path)
    assert isinstance(c, TrainingArguments)
    assert (c.temperature, c.alpha, c.kd_loss, c.jsd_beta) == (2.0, 0.5, "forward_kl", 0.5)
    assert (c.hidden_weight, c.hidden_loss, c.attention_weight, c.attention_loss) == (0.0, "mse", 0.0, "mse")
    assert c.layer_map == "uniform"


def test_hfargumentparser_reads_every_field_from_the_command_line(tmp_path):
    parser = HfArgumentParser(DistillationConfig)
    (c,) = parser.parse_args_into_dataclasses(
        args=[
            "--output_dir", str(tmp_path), "--temperature", "4", "--alpha", "0.9", "--kd_loss", "jsd",
            "--jsd_beta", "0.3", "--hidden_weight", "2", "--hidden_loss", "cosine", "--attention_weight", "1",
            "--attention_loss", "kl", "--layer_map", "[[1, 2], [2, 4]]", "--learning_rate", "3e-4",
        ]
    )
    assert c.temperature == 4 and c.alpha == 0.9 and c.kd_loss == "jsd" and c.jsd_beta == 0.3
    assert c.hidden_loss == "cosine" and c.attention_loss == "kl" and c.learning_rate == 3e-4
    assert c.layer_map == [[1, 2], [2, 4]]


def test_parse_dict_accepts_a_yaml_style_list_layer_map(tmp_path):
    (c,) = HfArgumentParser(DistillationConfig).parse_dict(
        {"output_dir": str(tmp_path), "layer_map": [[0, 0], [3, 6]], "hidden_weight": 1.0}
    )
    assert c.layer_map == [[0, 0], [3, 6]]


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("temperature", 0.0, r"temperature=0.0 must be > 0"),
        ("temperature", -1.0, r"temperature=-1.0 must be > 0"),
        ("alpha", 1.5, r"alpha=1.5 must be in \[0, 1\]"),
        ("alpha", -0.1, r"alpha=-0.1 must be in \[0, 1\]"),
        ("hidden_weight", -1.0, r"hidden_weight=-1.0 is negative"),
        ("attention_weight", -0.5, r"attention_weight=-0.5 is negative"),
        ("kd_loss", "kl", r"kd_loss='kl' is unknown; use one of forward_kl, reverse_kl, jsd, mse"),
        ("hidden_loss", "l1", r"hidden_loss='l1' is unknown"),
        ("attention_loss", "ce", r"attention_loss='ce' is unknown"),
        ("jsd_beta", 1.0, r"jsd_beta=1.0 must be strictly between 0 and 1"),
        ("layer_map", "every_other", r"layer_map='every_other' is not understood"),
        ("layer_map", [[1, 2], [1, 2]], r"pair \[1, 2\] twice"),
        ("layer_map", [[1, 2], [1, 3]], r"student layer 1 more than once"),
        ("layer_map", [[1, 2, 3]], r"not a \[student_layer, teacher_layer\] pair"),
        ("layer_map", [[-1, 2]], r"negative layer"),
    ],
)
def test_bad_values_are_refused_with_the_fix(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        cfg(tmp_path, **{field: value})
    assert not (tmp_path / "out").exists()


def test_every_distillation_weight_zero_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"every distillation weight is zero.*Set alpha > 0"):
        cfg(tmp_path, alpha=0.0)
    cfg(tmp_path, alpha=0.0, hidden_weight=1.0)  # hidden states alone are a distillation signal


@pytest.mark.parametrize(
    "ls,lt,expected",
    [
        (3, 6, [(1, 2), (2, 4), (3, 6)]),
        (4, 6, [(1, 2), (2, 3), (3, 5), (4, 6)]),  # 1.5 -> 2 and 4.5 -> 5: halves round up
        (4, 2, [(1, 1), (2, 1), (3, 2), (4, 2)]),
        (2, 2, [(1, 1), (2, 2)]),
    ],
)
def test_uniform_layer_map(ls, lt, expected):
    assert resolve_layer_map("uniform", ls, lt) == expected


def test_last_and_explicit_layer_maps():
    assert resolve_layer_map("last", 3, 12) == [(3, 12)]
    assert resolve_layer_map([[0, 0], [2, 6]], 3, 6) == [(0, 0), (2, 6)]
    with pytest.raises(ValueError, match="no attention map"):
        resolve_layer_map([[0, 0]], 3, 6, allow_embeddings=False, what="attention")
    with pytest.raises(ValueError, match=r"student has layers 0..3 and the teacher 0..6"):
        resolve_layer_map([[4, 6]], 3, 6)
