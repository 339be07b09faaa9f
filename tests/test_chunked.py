"""Chunked logit losses (hf_kd/chunked.py) agree with the unchunked ones of hf_kd/losses.py, in value and
gradient, and never hold a (tokens x vocabulary) tensor; the trainer's chunked route gives the same step."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_kd.chunked import (
    chunked_cross_entropy_loss,
    chunked_logit_distillation_loss,
    linear_cross_entropy_loss,
    linear_distillation_loss,
    TopK,
    linear_head_loss,
)
from hf_kd.losses import KD_LOSSES, cross_entropy_loss, logit_distillation_loss, topk_distillation_loss
from hf_kd.teacher_cache import teacher_buckets

B, T, D, DT, V = 3, 7, 6, 10, 50  # N = 21 positions; chunk sizes 4 and 5 do not divide it


class LargestTensor(TorchDispatchMode):
    """Records the element count of every tensor an operator creates while active (forward and backward).

    Views and in-place results share an input's memory and are not counted: only new storage is.
    """

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        known = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in known:
                self.sizes.append(t.numel())
        return out


def _data(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, T, D, generator=g).to(dtype)
    ht = torch.randn(B, T, DT, generator=g).to(dtype)
    ws = (torch.randn(V, D, generator=g) / 2).to(dtype)
    bs = (torch.randn(V, generator=g) / 4).to(dtype)
    wt = (torch.randn(V, DT, generator=g) / 2).to(dtype)
    bt = (torch.randn(V, generator=g) / 4).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 5:] = -100  # padding of row 0
    labels[2, 1] = -100  # a position without a label
    return hs, ht, ws, bs, wt, bt, labels


@pytest.mark.parametrize("kind", KD_LOSSES)
@pytest.mark.parametrize("chunk", [1, 4, 5, 64])
def test_chunked_logits_equal_unchunked_value_and_gradient(kind, chunk):
    hs, ht, ws, bs, wt, bt, labels = _data()
    zs = hs @ ws.T  # (B, T, V)
    zt = ht @ wt.T
    zs[0, 5:] = float("nan")  # garbage at padded positions reaches neither value nor gradient
    zs.requires_grad_()
    mask = labels != -100
    kw = dict(kind=kind, temperature=2.5, jsd_beta=0.3, normalizer=17.0)
    ref = logit_distillation_loss(zs, zt, mask, **kw)
    (g_ref,) = torch.autograd.grad(ref, zs)
    out = chunked_logit_distillation_loss(zs, zt, mask, chunk_size=chunk, **kw)
    (g,) = torch.autograd.grad(out, zs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("normalizer", [None, 11.0])
def test_chunked_cross_entropy_equals_unchunked(normalizer):
    hs, _, ws, _, _, _, labels = _data(8)
    zs = hs @ ws.T
    zs[0, 5:] = float("nan")
    zs.requires_grad_()
    ref = cross_entropy_loss(zs, labels, normalizer=normalizer)
    (g_ref,) = torch.autograd.grad(ref, zs)
    out = chunked_cross_entropy_loss(zs, labels, normalizer=normalizer, chunk_size=4)
    (g,) = torch.autograd.grad(out, zs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)


def test_chunked_logits_default_denominator_and_all_masked():
    hs, ht, ws, _, wt, _, labels = _data(1)
    zs, zt = (hs @ ws.T).requires_grad_(), ht @ wt.T
    mask = labels != -100
    ref = logit_distillation_loss(zs, zt, mask, temperature=0.7)
    torch.testing.assert_close(chunked_logit_distillation_loss(zs, zt, mask, temperature=0.7, chunk_size=4), ref)
    none = chunked_logit_distillation_loss(zs, zt, torch.zeros(B, T, dtype=torch.bool), chunk_size=4)
    (g,) = torch.autograd.grad(none, zs)
    assert none.item() == 0.0 and not g.any()


def test_chunked_logits_bf16_inputs_give_fp32_loss_equal_to_unchunked():
    hs, ht, ws, _, wt, _, labels = _data(2)
    zs = (hs @ ws.T).bfloat16().requires_grad_()
    zt = (ht @ wt.T).bfloat16()
    mask = labels != -100
    ref = logit_distillation_loss(zs, zt, mask, kind="jsd", temperature=2.0)
    (g_ref,) = torch.autograd.grad(ref, zs)
    out = chunked_logit_distillation_loss(zs, zt, mask, kind="jsd", temperature=2.0, chunk_size=4)
    (g,) = torch.autograd.grad(out, zs)
    assert out.dtype == torch.float32 and g.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.float(), g_ref.float(), rtol=1e-5, atol=1e-7)


def _head_reference(hs, ws, bs, ht, wt, bt, mask, labels, kind, temperature, normalizer, kd_w, ce_w, dtype=None):
    """Unchunked: full logits through the heads, then the losses of hf_kd.losses."""
    cast = (lambda x: x.to(dtype)) if dtype is not None else (lambda x: x)
    zs = torch.nn.functional.linear(cast(hs), cast(ws), cast(bs))  # (B, T, V)
    zt = torch.nn.functional.linear(cast(ht), cast(wt), cast(bt))
    kd = logit_distillation_loss(zs, zt, mask, kind=kind, temperature=temperature, jsd_beta=0.3, normalizer=normalizer)
    ce = cross_entropy_loss(zs, labels, normalizer=9.0)
    return kd_w * kd + ce_w * ce, kd, ce


@pytest.mark.parametrize("kind", KD_LOSSES)
@pytest.mark.parametrize("chunk", [4, 5, 100])
def test_linear_head_loss_equals_unchunked_value_and_gradients(kind, chunk):
    hs, ht, ws, bs, wt, bt, labels = _data(3)
    leaves = [x.requires_grad_() for x in (hs, ws, bs)]
    mask = labels != -100
    ref, kd_ref, ce_ref = _head_reference(hs, ws, bs, ht, wt, bt, mask, labels, kind, 1.7, 13.0, 0.6, 0.4)
    g_ref = torch.autograd.grad(ref, leaves)
    # Garbage at the padded positions (which the reference did not see) changes nothing.
    dirty_s, dirty_t = hs.detach().clone(), ht.clone()
    dirty_s[0, 5:], dirty_t[0, 5:] = float("nan"), float("inf")
    leaves = [dirty_s.requires_grad_(), ws, bs]
    out = linear_head_loss(
        dirty_s, ws, dirty_t, wt, mask, labels, student_bias=bs, teacher_bias=bt, kd_weight=0.6, ce_weight=0.4,
        kind=kind, temperature=1.7, jsd_beta=0.3, normalizer=13.0, ce_normalizer=9.0, chunk_size=chunk,
    )
    g = torch.autograd.grad(out.loss, leaves)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kd, kd_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ce, ce_ref.detach(), rtol=1e-5, atol=1e-6)
    for a, b, name in zip(g, g_ref, ("hidden", "weight", "bias")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("k", [1, 7, V])
@pytest.mark.parametrize("temperature, ce_w", [(1.0, 0.4), (1.7, 0.4), (2.0, None)])
def test_linear_head_loss_from_a_topk_teacher_equals_unchunked(kind, k, temperature, ce_w):
    """A cached (top-k + rest) teacher through the student's head, chunked (closed form for forward KL), against
    `topk_distillation_loss` on the full logits: value and gradients. Rows of the distillation term are
    matched to the stored rows in row-major order, also when CE covers a position the KD mask leaves out."""
    hs, ht, ws, bs, wt, bt, labels = _data(4)
    mask = labels != -100
    mask[1, 3] = False  # a labelled position outside the distillation mask: CE only, no stored row
    zt = 3 * torch.nn.functional.linear(ht, wt, bt)  # a peaked teacher: the top k hold most of its mass
    ids, top, lse, rest = teacher_buckets(zt[mask], k, temperature)  # (N, k) ... in row-major order
    leaves = [x.requires_grad_() for x in (hs, ws, bs)]
    zs = torch.nn.functional.linear(hs, ws, bs)
    ref_kd = topk_distillation_loss(zs[mask], ids, top, lse, rest, kind=kind, temperature=temperature,
                                    jsd_beta=0.3, normalizer=13.0)
    ref = 0.6 * ref_kd
    if ce_w is not None:
        ref_ce = cross_entropy_loss(zs, labels, normalizer=9.0)
        ref = ref + ce_w * ref_ce
    g_ref = torch.autograd.grad(ref, leaves)
    dirty = hs.detach().clone()
    dirty[0, 5:] = float("nan")  # padding the reference never read
    leaves = [dirty.requires_grad_(), ws, bs]
    out = linear_head_loss(
        dirty, ws, None, None, mask, labels if ce_w is not None else None, student_bias=bs, kd_weight=0.6,
        ce_weight=ce_w, kind=kind, temperature=temperature, jsd_beta=0.3, normalizer=13.0, ce_normalizer=9.0,
        chunk_size=4, teacher_topk=TopK(ids, top, lse, rest),
    )
    g = torch.autograd.grad(out.loss, leaves)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kd, ref_kd.detach(), rtol=1e-5, atol=1e-6)
    for a, b, name in zip(g, g_ref, ("hidden", "weight", "bias")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind, beta", [("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)])
def test_closed_form_divergences_with_peaked_far_apart_models_equal_autograd(kind, beta):
    """Reverse KL and JSD in closed form (log space: log m from the two log-distributions) against autograd through
    `logit_distillation_loss`, where most probabilities of either model underflow fp32 and the two models put their
    mass on different classes: no NaN, the same values and gradients."""
    hs, ht, ws, _, wt, _, labels = _data(12)
    hs = (40 * hs).requires_grad_()  # logits spread over hundreds: exp underflows for most classes
    ht = -40 * ht
    mask = labels != -100
    zs = hs @ ws.T
    ref = logit_distillation_loss(zs, ht @ wt.T, mask, kind=kind, jsd_beta=beta)
    (g_ref,) = torch.autograd.grad(ref, hs)
    out = linear_head_loss(hs, ws, ht, wt, mask, kind=kind, jsd_beta=beta, chunk_size=4)
    (g,) = torch.autograd.grad(out.loss, hs)
    assert torch.isfinite(out.loss) and out.loss > 0.5 * (math.log(2) if kind == "jsd" else 1.0) * min(beta, 1 - beta)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_linear_head_loss_topk_when_the_students_rest_mass_underflows():
    """A student that puts (almost) nothing outside the teacher's top k while the teacher does: the rest
    bucket's log-mass must come from log space (a sum of probabilities would underflow to 0 and blow up)."""
    n, v, k = 3, 20, 4
    z = torch.full((n, v), -110.0)
    z[:, :k] = torch.tensor([0.0, -1.0, -2.0, -3.0])
    z[1, 5] = -20.0  # one row with a small but representable rest mass
    zt = torch.randn(n, v, generator=torch.Generator().manual_seed(0))
    zt[:, :k] += 3.0  # the teacher's top k are the same classes, with mass left outside them
    ids, top, lse, rest = teacher_buckets(zt, k, 1.0)
    eye = torch.eye(v)  # hidden = logits: the head is the identity
    hidden = z.clone().requires_grad_()
    ref = topk_distillation_loss(hidden @ eye.T, ids, top, lse, rest)
    (g_ref,) = torch.autograd.grad(ref, hidden)
    hidden2 = z.clone().requires_grad_()
    out = linear_head_loss(hidden2, eye, None, None, teacher_topk=TopK(ids, top, lse, rest), chunk_size=2)
    (g,) = torch.autograd.grad(out.loss, hidden2)
    assert torch.isfinite(out.loss) and out.loss > 1.0  # the teacher's rest mass is far from the student's
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_linear_head_loss_topk_teacher_is_checked():
    hs, _, ws, _, _, _, labels = _data(5)
    mask = labels != -100
    n = int(mask.sum())
    good = TopK(torch.zeros(n, 3, dtype=torch.long), torch.zeros(n, 3), torch.zeros(n), torch.zeros(n))
    short = TopK(good.ids[:-1], good.logits[:-1], good.logsumexp[:-1], good.rest_logprob[:-1])
    with pytest.raises(ValueError, match="one row"):
        linear_head_loss(hs, ws, mask=mask, teacher_topk=short)
    with pytest.raises(ValueError, match="mse"):
        linear_head_loss(hs, ws, mask=mask, teacher_topk=good, kind="mse")
    with pytest.raises(ValueError, match="not both"):
        linear_head_loss(hs, ws, hs, ws, mask=mask, teacher_topk=good)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_head_loss_reuses_its_chunk_buffers(kind):
    """On-policy distillation's reverse KL measured 1.4x TRL's peak memory on CPU: each chunk's autograd graph made
    several new (chunk, V) fp32 tensors, and malloc kept the heap they came from. Forward KL, reverse KL and JSD now
    write every chunk into the same few workspace buffers (closed-form gradient): the number of new (chunk, V)
    tensors does not grow with the number of chunks. MSE still goes through autograd, and shows what the count
    would be."""
    hs, ht, ws, _, wt, _, labels = _data(11)
    hs.requires_grad_()
    mask = labels != -100
    chunk = 2
    n_chunks = -(-int(mask.sum()) // chunk)

    def count(kd_kind, temperature=1.7):
        with NewWeightSized(chunk * V) as seen:
            out = linear_head_loss(hs, ws, ht, wt, mask, labels, kd_weight=0.6, ce_weight=0.4, kind=kd_kind,
                                   temperature=temperature, jsd_beta=0.3, normalizer=13.0, ce_normalizer=9.0,
                                   chunk_size=chunk)
            torch.autograd.grad(out.loss, hs)
        return len(seen.made)

    assert n_chunks >= 8
    # the workspace: logits of both models, the student's at T, two softmaxes, and the JSD's mixture
    assert count(kind) <= {"forward_kl": 5, "reverse_kl": 5, "jsd": 6}[kind]
    # at T = 1 (on-policy's setting) CE shares the student's softmax; reverse KL needs no teacher softmax kept
    assert count(kind, 1.0) == {"forward_kl": 4, "reverse_kl": 3, "jsd": 5}[kind]
    assert count("mse") >= 2 * n_chunks  # the autograd route makes new ones in every chunk


def test_linear_losses_scale_with_grad_output_and_match_alone():
    """The stored gradients are multiplied by the incoming gradient (here 3 * loss)."""
    hs, ht, ws, _, wt, _, labels = _data(4)
    hs.requires_grad_(), ws.requires_grad_()
    mask = labels != -100
    zs = hs @ ws.T
    kd_ref = logit_distillation_loss(zs, ht @ wt.T, mask, kind="reverse_kl", temperature=3.0)
    ce_ref = cross_entropy_loss(zs, labels)
    g_ref = torch.autograd.grad(3 * kd_ref + 0.5 * ce_ref, (hs, ws))
    kd = linear_distillation_loss(hs, ws, ht, wt, mask, kind="reverse_kl", temperature=3.0, chunk_size=4)
    ce = linear_cross_entropy_loss(hs, ws, labels, chunk_size=6)
    g = torch.autograd.grad(3 * kd + 0.5 * ce, (hs, ws))
    torch.testing.assert_close(kd, kd_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_linear_head_loss_bf16_inputs_fp32_loss_equal_to_unchunked():
    hs, ht, ws, bs, wt, bt, labels = (x.bfloat16() if x.is_floating_point() else x for x in _data(5))
    leaves = [x.requires_grad_() for x in (hs, ws)]
    mask = labels != -100
    ref, _, _ = _head_reference(hs, ws, None, ht, wt, None, mask, labels, "forward_kl", 2.0, None, 1.0, 1.0)
    g_ref = torch.autograd.grad(ref, leaves)
    out = linear_head_loss(hs, ws, ht, wt, mask, labels, kd_weight=1.0, ce_weight=1.0, temperature=2.0,
                           ce_normalizer=9.0, chunk_size=4)
    g = torch.autograd.grad(out.loss, leaves)
    assert out.loss.dtype == torch.float32 and g[0].dtype == g[1].dtype == torch.bfloat16
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    # The gradient of the logits is formed in fp32 (KD + CE) and cast to bf16 once; autograd rounds each term's
    # gradient to bf16 before adding them: a difference of bf16 rounding (eps 2^-8), no more.
    torch.testing.assert_close(g[0].float(), g_ref[0].float(), rtol=2**-7, atol=2e-3)
    # Per-chunk bf16 products of the head's gradient are summed in fp32 (unchunked: one bf16 matmul).
    torch.testing.assert_close(g[1].float(), g_ref[1].float(), rtol=1e-2, atol=1e-3)


def test_linear_head_loss_compute_dtype_matches_autocast_like_cast():
    """student_dtype/teacher_dtype run the head's matmul in that dtype, as autocast does, fp32 weights kept."""
    hs, ht, ws, bs, wt, bt, labels = _data(6)
    leaves = [x.requires_grad_() for x in (hs, ws, bs)]
    mask = labels != -100
    ref, _, _ = _head_reference(hs, ws, bs, ht, wt, bt, mask, labels, "forward_kl", 1.0, None, 1.0, 0.0,
                                dtype=torch.bfloat16)
    g_ref = torch.autograd.grad(ref, leaves)
    out = linear_head_loss(hs, ws, ht, wt, mask, student_bias=bs, teacher_bias=bt, chunk_size=5,
                           student_dtype=torch.bfloat16, teacher_dtype=torch.bfloat16)
    g = torch.autograd.grad(out.loss, leaves)
    assert all(a.dtype == torch.float32 for a in g)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[0], g_ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[1], g_ref[1], rtol=1e-2, atol=1e-3)  # bf16 chunk products, fp32 sum


def test_no_tokens_by_vocabulary_tensor_is_made():
    """The largest tensor any operator returns is a chunk's (chunk, V) (x2 for jsd's stack), never N x V;
    with full logits the only N x V tensor made is the gradient of the logits itself."""
    n, d, v, chunk = 64, 4, 40, 8  # N * V = 2560 > V * D = 160 and > 2 * chunk * V = 640
    g = torch.Generator().manual_seed(7)
    hs = torch.randn(n, d, generator=g, requires_grad=True)
    ws = torch.randn(v, d, generator=g, requires_grad=True)
    ht, wt = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    for kind in KD_LOSSES:
        with LargestTensor() as seen:
            out = linear_head_loss(hs, ws, ht, wt, None, labels, kd_weight=1.0, ce_weight=1.0, kind=kind,
                                   chunk_size=chunk)
            out.loss.backward()
        assert max(seen.sizes) <= 2 * chunk * v, kind
        with LargestTensor() as unchunked:  # the measurement sees the full tensors when they exist
            zs = hs @ ws.T
            (logit_distillation_loss(zs, ht @ wt.T, kind=kind) + cross_entropy_loss(zs, labels)).backward()
        assert max(unchunked.sizes) >= n * v

        zs, zt = (hs @ ws.T).detach().requires_grad_(), (ht @ wt.T).detach()
        with LargestTensor() as seen:
            out = chunked_logit_distillation_loss(zs, zt, kind=kind, chunk_size=chunk)
        assert max(seen.sizes) <= 2 * chunk * v, kind
        with LargestTensor() as seen:
            out.backward()
        assert sorted(seen.sizes)[-2] <= 2 * chunk * v and max(seen.sizes) == n * v, kind  # the gradient alone


class NewWeightSized(TorchDispatchMode):
    """Counts the tensors of new storage with `numel` elements that operators make while active (in-place results
    and views are not new)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.made = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        known = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        self.made += [str(func) for t in torch.utils._pytree.tree_leaves(out)
                      if isinstance(t, torch.Tensor) and t.numel() == self.numel
                      and t.untyped_storage().data_ptr() not in known]
        return out


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_head_loss_makes_no_zero_filled_or_rescaled_copy_of_the_weight_gradient(kind):
    """The profile of an on-policy step (SmolLM2 shapes, V x D = 49152 x 576) showed three vocabulary-sized buffers
    per step beyond the gradient itself: zeros to sum the chunks into, the gradient times the incoming scalar in
    backward, and the zeros of a slice's backward (see test_distill_head_route). The weight's gradient is now the
    first chunk's product, the others added in place (autograd reaches the chunk's logits only, the head's products
    are ours), and it is scaled in place: one (V, D) tensor in all. Values equal the unchunked loss's."""
    hs, ht, ws, _, wt, _, labels = _data(8)
    leaves = [x.requires_grad_() for x in (hs, ws)]
    mask = labels != -100
    ref, _, _ = _head_reference(hs, ws, None, ht, wt, None, mask, labels, kind, 1.0, 13.0, 0.6, 0.4)
    g_ref = torch.autograd.grad(3 * ref, leaves)
    chunk, n_rows = 4, int(mask.sum())  # no (chunk, V) or (2, chunk, V) tensor has V * D elements
    with NewWeightSized(V * D) as seen:
        out = linear_head_loss(hs, ws, ht, wt, mask, labels, kd_weight=0.6, ce_weight=0.4, kind=kind, jsd_beta=0.3,
                               normalizer=13.0, ce_normalizer=9.0, chunk_size=chunk)
        g = torch.autograd.grad(3 * out.loss, leaves)
    assert n_rows > 2 * chunk and seen.made == ["aten.mm.default"], seen.made  # several chunks, one weight gradient
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # no position at all: the weight's gradient is still zeros of its shape
    none = linear_head_loss(hs, ws, ht, wt, torch.zeros(B, T, dtype=torch.bool), kind=kind, chunk_size=chunk)
    (gw,) = torch.autograd.grad(none.loss, ws)
    assert gw.shape == ws.shape and not gw.any()


def test_a_tied_weight_gets_its_embedding_gradient_added_in_place():
    """SmolLM2 ties its embedding to its head. The head loss hands autograd its (V, D) gradient as the only
    reference, scaled in place, so autograd adds the embedding's gradient into it in place (add_, not add: no new
    tensor) and keeps it as .grad; the gradient equals autograd's on the full logits. (Counted with the profiler: a
    dispatch mode would itself keep autograd from accumulating in place.)"""
    from torch.profiler import profile

    hs, ht, ws, _, wt, _, labels = _data(10)
    ws.requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    mask = labels != -100
    with profile(record_shapes=True) as prof:
        h = hs + torch.nn.functional.embedding(ids, ws)  # (B, T, D)
        linear_head_loss(h, ws, ht, wt, mask, kind="reverse_kl", chunk_size=5).loss.backward()
    ops = {e.key: e.count for e in prof.key_averages(group_by_input_shape=True)
           if e.key in ("aten::add", "aten::add_", "aten::mul", "aten::mul_") and [V, D] in e.input_shapes}
    assert ops == {"aten::mul_": 1, "aten::add_": 1}, ops
    ref = ws.detach().clone().requires_grad_()
    h = hs + torch.nn.functional.embedding(ids, ref)
    logit_distillation_loss(h @ ref.T, ht @ wt.T, mask, kind="reverse_kl").backward()
    torch.testing.assert_close(ws.grad, ref.grad, rtol=1e-5, atol=1e-6)


def test_weight_grad_into_grad_with_a_sparse_embedding_gives_autograds_gradient_in_one_tensor():
    """`weight_grad_into_grad`: the head's gradient goes into .grad by the backward pass, the embedding's sparse
    gradient is added into it in place (no out-of-place sum of two (V, D) tensors); twice accumulated, it equals
    autograd's on the full logits, scaled like it. A slice of the weight is refused."""
    from torch.profiler import profile

    hs, ht, ws, _, wt, _, labels = _data(11)
    ws.requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    mask = labels != -100
    for _ in range(2):  # the second pass adds into an existing .grad
        with profile(record_shapes=True) as prof:
            h = hs + torch.nn.functional.embedding(ids, ws, sparse=True)
            out = linear_head_loss(h, ws, ht, wt, mask, kind="jsd", chunk_size=5, weight_grad_into_grad=True)
            (0.5 * out.loss).backward()
        sums = [e for e in prof.key_averages(group_by_input_shape=True)
                if e.key == "aten::add" and e.input_shapes[:1] == [[V, D]] and len(e.input_shapes) == 3]
        assert not sums and ws.grad.layout == torch.strided
    ref = ws.detach().clone().requires_grad_()
    for _ in range(2):
        h = hs + torch.nn.functional.embedding(ids, ref)
        (0.5 * logit_distillation_loss(h @ ref.T, ht @ wt.T, mask, kind="jsd")).backward()
    torch.testing.assert_close(ws.grad, ref.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="weight_grad_into_grad"):
        linear_head_loss(hs, ws[:-1], ht, wt[:-1], mask, weight_grad_into_grad=True)


def test_head_loss_refuses_a_second_backward_through_its_in_place_scaled_gradients():
    """The stored gradients are scaled in place and handed on by the first backward: a second one (retain_graph)
    is refused with a message rather than given twice-scaled gradients."""
    hs, ht, ws, _, wt, _, labels = _data(9)
    hs.requires_grad_()
    out = linear_head_loss(hs, ws, ht, wt, labels != -100, kind="reverse_kl", chunk_size=4)
    (2 * out.loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        out.loss.backward()


def test_bad_chunk_size_and_missing_inputs_are_refused():
    hs, ht, ws, _, wt, _, labels = _data()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_logit_distillation_loss(hs @ ws.T, ht @ wt.T, chunk_size=0)
    with pytest.raises(ValueError, match="labels"):
        linear_head_loss(hs, ws, ht, wt, kd_weight=1.0, ce_weight=1.0)
    with pytest.raises(ValueError, match="vocabulary"):
        linear_head_loss(hs, ws, ht, wt[:-1])


# --------------------------------------------------------------------------- #
# the trainer's route
# --------------------------------------------------------------------------- #
def _llama_step(tmp_path, chunk, kind="forward_kl", alpha=0.5, head_hook=None, student_config=None, vocab=1024,
                **more):
    """Two SGD steps of a tiny Llama pair (vocabulary 1024) on padded rows with -100 labels; the student's
    weights after them and the number of positions its head computed at each call."""
    from conftest import ListDataset, make_llama, random_batch, rows_from_batch

    from hf_kd import DistillationConfig, DistillationTrainer

    teacher = make_llama(layers=2, hidden=16, heads=4, vocab=vocab, seed=1)
    student = make_llama(layers=1, hidden=8, heads=2, vocab=vocab, seed=2)
    with torch.no_grad():  # a peaked teacher: the distillation term, not only CE, moves the student
        teacher.lm_head.weight.mul_(40)
    for key, value in (student_config or {}).items():
        setattr(student.config, key, value)
    batch = random_batch("causal_lm", batch=4, length=10, vocab=vocab, pad_from=[10, 6, 8, 3], seed=4)
    batch["labels"][0, :3] = -100  # a prompt without labels
    positions, teacher_positions = [], []
    student.lm_head.register_forward_hook(lambda m, a, out: positions.append(out.shape[-2]))
    teacher.lm_head.register_forward_hook(lambda m, a, out: teacher_positions.append(out.shape[-2]))
    if head_hook is not None:
        student.lm_head.register_forward_hook(head_hook)
    args = DistillationConfig(
        output_dir=str(tmp_path / f"run{chunk}"), per_device_train_batch_size=4, max_steps=2, optim="sgd",
        learning_rate=5.0, lr_scheduler_type="constant", max_grad_norm=0.0, warmup_steps=0, report_to=[],
        save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, logging_steps=1,
        kd_loss=kind, alpha=alpha, temperature=2.0, logit_chunk_size=chunk, **more,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=ListDataset(rows_from_batch(batch)))
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    _llama_step.teacher_positions = teacher_positions
    return {k: v.detach().clone() for k, v in student.state_dict().items()}, positions, trainer.head_route.active, logs


@pytest.mark.parametrize("kind, alpha", [("forward_kl", 0.5), ("jsd", 0.7), ("mse", 1.0)])
def test_trainer_chunked_through_the_head_gives_the_unchunked_step(tmp_path, kind, alpha):
    full, full_positions, full_route, full_logs = _llama_step(tmp_path, -1, kind, alpha)
    chunked, positions, route, logs = _llama_step(tmp_path, 7, kind, alpha)
    assert full_route is None and full_positions == [10, 10]  # -1: the plain path, full logits
    # Chunked: the first batch runs the full head once, to check head(hidden) == logits; then one position.
    assert route is True and positions == [10, 1]
    for k in full:
        torch.testing.assert_close(chunked[k], full[k], rtol=1e-5, atol=1e-5, msg=k)
    for a, b in zip(full_logs, logs):
        for name in ("loss", "kd_loss", "ce_loss"):
            assert (name in a) == (name in b)
            if name in a:
                assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-7), name


def test_trainer_hidden_only_teacher_makes_no_logits_and_ce_goes_through_the_head(tmp_path):
    """alpha=0: the teacher's logits are never read, so its head computes one position (issue 6.3); the
    student's CE still goes through its head in chunks, with the unchunked step."""
    full, full_positions, _, _ = _llama_step(tmp_path, -1, alpha=0.0, hidden_weight=1.0)
    assert _llama_step.teacher_positions == [1, 1] and full_positions == [10, 10]
    chunked, positions, route, logs = _llama_step(tmp_path, 7, alpha=0.0, hidden_weight=1.0)
    assert _llama_step.teacher_positions == [1, 1] and route is True and positions == [10, 1]
    assert all("ce_loss" in e and "kd_loss" not in e for e in logs)
    for k in full:
        torch.testing.assert_close(chunked[k], full[k], rtol=1e-5, atol=1e-5, msg=k)


def test_trainer_step_moves_the_student(tmp_path):
    """The comparison above is only meaningful if a step changes the weights by far more than 1e-5."""
    from conftest import make_llama

    before = make_llama(layers=1, hidden=8, heads=2, vocab=1024, seed=2).state_dict()
    after, *_ = _llama_step(tmp_path, 7)
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-2


def test_trainer_falls_back_to_full_logits_when_the_head_is_not_the_logits(tmp_path):
    """Something applied after the head (here a hook doubling its output; in real models soft-capping or a
    logit scale) is detected on the first batch: the full logits are chunked instead, same step."""
    double = lambda m, a, out: out * 2  # noqa: E731
    full, *_ = _llama_step(tmp_path, -1, head_hook=double)
    chunked, positions, route, _ = _llama_step(tmp_path, 7, head_hook=double)
    assert route is False and positions == [10, 10]
    for k in full:
        torch.testing.assert_close(chunked[k], full[k], rtol=1e-5, atol=1e-5, msg=k)


def test_trainer_refuses_the_head_route_for_logit_softcapping(tmp_path):
    _, positions, route, _ = _llama_step(tmp_path, 7, student_config={"final_logit_softcapping": 30.0})
    assert route is False and positions == [10, 10]


def test_auto_chunks_large_vocabularies_only(tmp_path):
    from hf_kd.chunked import auto_chunk_size

    _, positions, route, _ = _llama_step(tmp_path, 0, vocab=1024)
    assert route is None and positions == [10, 10]  # below 8192 entries: unchunked
    _, positions, route, _ = _llama_step(tmp_path, 0, vocab=8192)
    assert route is True and positions == [10, 1]
    assert auto_chunk_size(32768) == 512 and auto_chunk_size(8192) == 2048 and auto_chunk_size(10**7) == 64
    # on CUDA, chunks four times larger (fewer launches; scripts/bench.py on an H200, README)
    assert auto_chunk_size(32768, "cuda") == auto_chunk_size(32768, torch.device("cuda", 0)) == 2048
    assert auto_chunk_size(32768, "cpu") == 512 and auto_chunk_size(10**8, "cuda") == 64


def test_logit_chunk_size_is_validated(tmp_path):
    from hf_kd import DistillationConfig

    with pytest.raises(ValueError, match="logit_chunk_size"):
        DistillationConfig(output_dir=str(tmp_path), logit_chunk_size=-2, report_to=[])


def test_trainer_masked_lm_through_the_head_gives_the_unchunked_step(tmp_path):
    """BERT's output layer is a Linear after a transform: the tap reads what enters the Linear."""
    from conftest import ListDataset, make_bert, random_batch, rows_from_batch
    from transformers import BertForMaskedLM

    from hf_kd import DistillationConfig, DistillationTrainer

    def step(chunk):
        teacher = make_bert(BertForMaskedLM, layers=2, hidden=16, heads=4, vocab=1024, seed=1)
        student = make_bert(BertForMaskedLM, layers=1, hidden=8, heads=2, vocab=1024, seed=2)
        batch = random_batch("masked_lm", batch=4, length=10, vocab=1024, pad_from=[10, 6, 8, 3], seed=5)
        batch["labels"][:, ::2] = -100  # only some positions are masked tokens
        args = DistillationConfig(
            output_dir=str(tmp_path / f"mlm{chunk}"), per_device_train_batch_size=4, max_steps=2, optim="sgd",
            learning_rate=5.0, lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], save_strategy="no",
            use_cpu=True, seed=0, disable_tqdm=True, kd_loss="reverse_kl", alpha=0.6, logit_chunk_size=chunk,
        )
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                      train_dataset=ListDataset(rows_from_batch(batch)))
        trainer.train()
        return {k: v.detach().clone() for k, v in student.state_dict().items()}, trainer.head_route.active

    full, _ = step(-1)
    chunked, route = step(5)
    assert route is True
    for k in full:
        torch.testing.assert_close(chunked[k], full[k], rtol=1e-5, atol=1e-5, msg=k)
