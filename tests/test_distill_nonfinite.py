"""hf_kd.distill.nonfinite: a NaN/inf loss stops with a message or drops the batch's gradient."""

from types import SimpleNamespace

import pytest
import torch

from conftest import make_bert
from hf_kd import NonFiniteLossError
from hf_kd.distill.nonfinite import check, describe, zero_loss


def test_the_message_names_the_component_the_step_and_the_source():
    s_out = SimpleNamespace(logits=torch.tensor([float("nan")]))
    message, bad = describe({"kd_loss": torch.tensor(float("inf")), "ce_loss": torch.tensor(1.0)}, s_out, None, 7)
    assert bad == ["kd_loss"] and message == "non-finite kd_loss at step 7 (the student's logits hold NaN/inf)"


def test_stop_raises_and_skip_records_the_step():
    args = SimpleNamespace(nonfinite_loss="stop", world_size=1)
    nan = torch.tensor(float("nan"))
    assert check(torch.tensor(1.0), {}, (None, None), 1, args, None, []) is True
    with pytest.raises(NonFiniteLossError, match="non-finite kd_loss at step 2"):
        check(nan, {"kd_loss": nan}, (None, None), 2, args, None, [])
    skipped = []
    assert check(nan, {"kd_loss": nan}, (None, None), 3, SimpleNamespace(nonfinite_loss="skip", world_size=1), None,
                 skipped) is False
    assert skipped == [(3, "kd_loss")]


def test_zero_loss_gives_exact_zero_gradients_to_every_parameter():
    model = make_bert()
    zero_loss(model, "cpu").backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
