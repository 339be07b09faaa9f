"""hf_kd.distill.objective: the weighted sum of the terms, against the pure losses, and the meter."""

from types import SimpleNamespace

import pytest
import torch

from conftest import random_batch
from hf_kd import DistillationConfig
from hf_kd.distill.objective import Meter, Objective
from hf_kd.distill.plan import LossPlan
from hf_kd.distill.targets import count_items, logit_targets
from hf_kd.losses import COMPONENTS, cross_entropy_loss, hidden_state_loss, logit_distillation_loss


def _args(tmp_path, **kw):
    return DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def test_total_is_the_weighted_sum_of_independently_computed_terms(tmp_path):
    torch.manual_seed(0)
    args = _args(tmp_path, alpha=0.3, temperature=2.0, hidden_weight=0.7)
    plan = LossPlan(args, hidden_pairs=[(1, 2)])
    batch = random_batch("sequence_classification", batch=3, length=5, pad_from=[5, 4, 2])
    hs = tuple(torch.randn(3, 5, 8) for _ in range(3))
    s_out = SimpleNamespace(logits=torch.randn(3, 2), hidden_states=hs, attentions=None)
    t_out = SimpleNamespace(logits=torch.randn(3, 2), hidden_states=tuple(torch.randn(3, 5, 8) for _ in range(3)),
                            attentions=None)
    counts = {k: v.clamp_min(1) for k, v in count_items("sequence_classification", batch, "cpu").items()}
    targets = logit_targets("sequence_classification", batch, s_out, t_out)
    objective = Objective(args, "sequence_classification", plan, torch.nn.ModuleList(), cached=False)
    total, parts = objective(batch, targets, s_out, t_out, counts, temperature=2.0, alpha=0.3, chunk=0)
    kd = logit_distillation_loss(s_out.logits, t_out.logits, temperature=2.0)
    ce = cross_entropy_loss(s_out.logits, batch["labels"])
    hidden = hidden_state_loss(hs[1], t_out.hidden_states[2], batch["attention_mask"].bool())
    assert set(parts) == {"kd_loss", "ce_loss", "hidden_loss"}
    for got, want in ((parts["kd_loss"], kd), (parts["ce_loss"], ce), (parts["hidden_loss"], hidden)):
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
    expected = 0.3 * 4.0 * kd + 0.7 * ce + 0.7 * hidden
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_alpha_one_has_no_hard_label_term(tmp_path):
    args = _args(tmp_path, alpha=1.0)
    batch = random_batch("sequence_classification", batch=2)
    out = SimpleNamespace(logits=torch.randn(2, 2))
    counts = {k: v.clamp_min(1) for k, v in count_items("sequence_classification", batch, "cpu").items()}
    objective = Objective(args, "sequence_classification", LossPlan(args), torch.nn.ModuleList(), cached=False)
    total, parts = objective(batch, logit_targets("sequence_classification", batch, out, out), out, out, counts,
                             temperature=1.0, alpha=1.0, chunk=0)
    assert set(parts) == {"kd_loss"} and total.item() == pytest.approx(0.0, abs=1e-7)  # identical logits


def test_meter_means_per_step_and_flags_absent_components():
    meter = Meter()
    meter.steps = 2
    meter.add({"kd_loss": torch.tensor(1.0)})
    meter.add({"kd_loss": torch.tensor(3.0), "ce_loss": torch.tensor(2.0)})
    vector = meter.vector("cpu")
    assert vector.shape == (2 * len(COMPONENTS),)
    means = meter.means(vector.tolist())
    assert means == {"kd_loss": 2.0, "ce_loss": 1.0}  # hidden, attention, relation absent: not logged
    assert meter.sums == {} and meter.steps == 0
