"""hf_kd.distill.head_route: when the logit losses go through the output layers, and that they agree."""

from types import SimpleNamespace

import pytest
import torch

from conftest import make_bert, make_llama, random_batch
from hf_kd import DistillationConfig
from hf_kd.distill.head_route import HeadRoute, logit_chunk_size, route_problem
from hf_kd.distill.objective import Objective
from hf_kd.distill.plan import LossPlan
from hf_kd.distill.targets import count_items, logit_targets

SINGLE = SimpleNamespace(kind="single", name="one process")


def _args(tmp_path, **kw):
    return DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def test_chunk_size_auto_for_large_vocabularies_only(tmp_path):
    small, large = make_llama(vocab=64).config, make_llama(vocab=8192).config
    assert logit_chunk_size(_args(tmp_path), "causal_lm", small, "cpu") == 0
    assert logit_chunk_size(_args(tmp_path), "causal_lm", large, "cpu") > 0
    assert logit_chunk_size(_args(tmp_path, logit_chunk_size=7), "causal_lm", small, "cpu") == 7
    assert logit_chunk_size(_args(tmp_path, logit_chunk_size=7), "sequence_classification", small, "cpu") == 0


def test_route_problems_are_named():
    assert "distributed" in route_problem(make_llama(), make_llama(), True, SimpleNamespace(kind="ddp", name="DDP"))
    llama = make_llama()
    llama.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping=30.0" in route_problem(make_llama(), llama, True, SINGLE)
    assert route_problem(make_llama(), llama, False, SINGLE) is None  # the teacher's logits are not read
    assert route_problem(make_llama(), make_llama(), True, SINGLE) is None


def test_terms_through_the_heads_equal_the_terms_on_the_logits(tmp_path):
    args = _args(tmp_path, alpha=0.5, temperature=2.0, logit_chunk_size=3)
    student, teacher = make_llama(seed=1), make_llama(seed=2)
    route = HeadRoute(args, "causal_lm", teacher, teacher, 1, chunk=3)
    s_tap, t_tap = route.taps(student, SINGLE)
    batch = random_batch("causal_lm", batch=2, length=6)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with s_tap, t_tap, torch.no_grad():
        s_out, t_out = student(**inputs), teacher(**inputs)
    heads = route.verified(s_tap, t_tap, s_out, t_out)
    assert heads is not None and route.active is True
    counts = {k: v.clamp_min(1) for k, v in count_items("causal_lm", batch, "cpu").items()}
    targets = logit_targets("causal_lm", batch, s_out, t_out)
    loss, parts = route.terms(heads, batch, targets, counts, 2.0, 0.5)
    objective = Objective(args, "causal_lm", LossPlan(args), torch.nn.ModuleList(), cached=False)
    want, want_parts = objective(batch, targets, s_out, t_out, counts, temperature=2.0, alpha=0.5, chunk=0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert parts["kd_loss"].item() == pytest.approx(want_parts["kd_loss"].item(), rel=1e-4, abs=1e-7)


def test_encoders_never_take_the_route(tmp_path):
    route = HeadRoute(_args(tmp_path), "sequence_classification", make_bert(), None, 1, chunk=0)
    assert route.taps(make_bert(), SINGLE) == (None, None)


def _nodes_before(loss: torch.Tensor, param: torch.Tensor) -> set[str]:
    """Names of the autograd nodes whose gradient flows straight into `param`."""
    seen, stack, found = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None and getattr(child, "variable", None) is param:
                found.add(type(node).__name__)
            stack.append(child)
    return found


@pytest.mark.parametrize("classes", [None, 60])
def test_the_head_weight_reaches_the_loss_without_a_slice_unless_the_vocabulary_is_cut(tmp_path, classes):
    """The route used to hand the loss ``weight[:classes]`` also when classes was None (every row): a slice whose
    backward fills a (V, D) buffer with zeros and copies the gradient into it each step (the on-policy profile's
    largest avoidable cost on SmolLM2 shapes). The weight itself goes to the loss now; a padded pair still cuts."""
    args = _args(tmp_path, alpha=0.5, logit_chunk_size=3)
    student, teacher = make_llama(seed=1), make_llama(seed=2)
    route = HeadRoute(args, "causal_lm", teacher, teacher, 1, chunk=3)
    s_tap, t_tap = route.taps(student, SINGLE)
    batch = random_batch("causal_lm", batch=2, length=6)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with s_tap, t_tap:
        s_out = student(**inputs)
        with torch.no_grad():
            t_out = teacher(**inputs)
    heads = route.verified(s_tap, t_tap, s_out, t_out)
    counts = {k: v.clamp_min(1) for k, v in count_items("causal_lm", batch, "cpu").items()}
    loss, _ = route.terms(heads, batch, logit_targets("causal_lm", batch, s_out, t_out, classes), counts, 1.0, 0.5)
    assert _nodes_before(loss, student.lm_head.weight) == ({"_LinearHeadLossBackward"} if classes is None
                                                            else {"SliceBackward0"})
