"""Chunked logit losses for token-level tasks: no (tokens x vocabulary) fp32 tensor at once.

For a language model the logit loss of `hf_kd.losses` upcasts batch x length x vocabulary logits of
teacher and student to fp32 and keeps softmaxes of that size for the backward pass. Here the valid
positions are taken ``chunk_size`` rows at a time, and every chunk's loss is exactly the one of
`hf_kd.losses` (the same functions are called on the chunk, with the whole call's denominator), so the
sum over chunks is the unchunked loss; only the memory differs.

* `chunked_logit_distillation_loss`: from full logits (the model computed them). Forward runs chunk by
  chunk without autograd; backward recomputes one chunk at a time and writes its gradient into the
  logits' gradient (which has the logits' size and dtype, as any backward pass gives).
* `linear_distillation_loss`, `linear_cross_entropy_loss`, `linear_head_loss`: from the hidden states
  that enter a linear head (``logits = hidden @ weight.T + bias``). Each chunk's logits are made,
  used and dropped in the forward pass, which also computes that chunk's gradients w.r.t. the hidden
  rows and the head weight (an `autograd.Function` that stores only those gradients, as fused
  linear + loss kernels do); no (N x V) tensor exists at all.

Reduction: as in `hf_kd.losses` (sum over valid positions / (normalizer or number of valid positions),
clamped to >= 1). Classes are not masked here (``class_mask`` serves QA, not token-level tasks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from .losses import (
    F32_MIN,
    F32_TINY,
    KD_LOSSES,
    Normalizer,
    _check_kind,
    _denominator,
    _valid_mask,
    check_logit_loss_args,
    check_softening,
    check_topk_classes,
    check_topk_kind,
    cross_entropy_loss,
    logit_distillation_loss,
    topk_distillation_loss,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "auto_chunk_size",
    "chunked_logit_distillation_loss",
    "chunked_cross_entropy_loss",
    "linear_distillation_loss",
    "linear_cross_entropy_loss",
    "linear_head_loss",
    "HeadLoss",
    "TopK",
]

#: Rows per chunk when none is given: 1024 x a 128k vocabulary is 0.5 GB per fp32 tensor.
DEFAULT_CHUNK_SIZE = 1024
#: `auto_chunk_size` keeps one fp32 (chunk, V) tensor near 64 MiB on CPU (the closed form reuses a handful of
#: them) and near 256 MiB on CUDA, where fewer, larger chunks keep the GPU busy (scripts/bench.py on an H200,
#: README: step time / limit 1.15 with chunks of 512 at 32k, 1.07 with 2048; loss memory 0.44 of the plain
#: loss's at 4k tokens, 0.11 at 16k).
AUTO_CHUNK_ELEMENTS = 1 << 24
AUTO_CHUNK_ELEMENTS_CUDA = 1 << 26
_F32 = torch.float32


def auto_chunk_size(num_classes: int, device: torch.device | str | None = None) -> int:
    """Positions per chunk for ``num_classes`` logits on ``device`` (None = CPU): 512 for a 32k vocabulary and
    128 for 128k on CPU, four times that on CUDA (at least 64)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    return max(64, (AUTO_CHUNK_ELEMENTS_CUDA if cuda else AUTO_CHUNK_ELEMENTS) // max(int(num_classes), 1))


def _check_chunk(chunk_size: int) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def _rows(valid: Tensor) -> tuple[Tensor, ...]:
    """Index tuple of the valid positions of a (...) bool mask: ``x[_rows(valid)]`` is (n_valid, ...)."""
    return tuple(valid.nonzero().unbind(-1))  # each (n_valid,)


def _take(index: tuple[Tensor, ...], start: int, stop: int) -> tuple[Tensor, ...]:
    return tuple(i[start:stop] for i in index)


# --------------------------------------------------------------------------- #
# (a) from full logits
# --------------------------------------------------------------------------- #
class _ChunkedRows(torch.autograd.Function):
    """``sum over chunks of chunk_loss(logits[rows], rows)``; backward recomputes one chunk at a time."""

    @staticmethod
    def forward(ctx, student_logits, chunk_loss, index, chunk_size):
        n = index[0].numel() if index else 0
        total = torch.zeros((), dtype=_F32, device=student_logits.device)
        for start in range(0, n, chunk_size):
            rows = _take(index, start, start + chunk_size)
            total = total + chunk_loss(student_logits[rows], rows)  # (c, V) fp32 intermediates, freed per chunk
        ctx.save_for_backward(student_logits, *index)
        ctx.chunk = (chunk_loss, chunk_size, n)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        student_logits, *index = ctx.saved_tensors
        chunk_loss, chunk_size, n = ctx.chunk
        grad = torch.zeros_like(student_logits)  # (..., V): the gradient itself, in the logits' dtype
        for start in range(0, n, chunk_size):
            rows = _take(index, start, start + chunk_size)
            with torch.enable_grad():
                zs = student_logits[rows].detach().requires_grad_()  # (c, V)
                (g,) = torch.autograd.grad(chunk_loss(zs, rows), zs, grad_output)
            grad[rows] = g
        return grad, None, None, None


def chunked_logit_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Optional[Tensor] = None,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    normalizer: Normalizer = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """`hf_kd.losses.logit_distillation_loss` computed ``chunk_size`` valid positions at a time.

    Shapes: logits (..., V), ``mask`` (...) bool (None = all valid). The valid positions are visited in
    chunks; the fp32 softmaxes of one chunk, (chunk_size, V), are the largest tensors made besides the
    gradient w.r.t. ``student_logits`` (its size and dtype, made by the backward pass). The teacher gets
    no gradient. Same value and gradient as the unchunked loss; returns a 0-dim fp32 tensor.
    """
    check_logit_loss_args(student_logits.shape, teacher_logits.shape, kind, temperature, jsd_beta)
    _check_chunk(chunk_size)
    device = student_logits.device
    valid = _valid_mask(mask, student_logits.shape[:-1], device)  # (...)
    denom = _denominator(normalizer, valid.sum(), device)
    teacher_logits = teacher_logits.detach()

    def chunk_loss(zs: Tensor, rows: tuple[Tensor, ...]) -> Tensor:
        return logit_distillation_loss(
            zs, teacher_logits[rows], None, kind=kind, temperature=temperature, jsd_beta=jsd_beta, normalizer=denom
        )

    return _ChunkedRows.apply(student_logits, chunk_loss, _rows(valid), chunk_size)


def chunked_cross_entropy_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    normalizer: Normalizer = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """`hf_kd.losses.cross_entropy_loss` computed ``chunk_size`` labelled positions at a time (see above)."""
    _check_chunk(chunk_size)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits leading shape {tuple(logits.shape[:-1])}"
        )
    labels = labels.to(logits.device)
    valid = labels != ignore_index  # (...)
    denom = _denominator(normalizer, valid.sum(), logits.device)

    def chunk_loss(z: Tensor, rows: tuple[Tensor, ...]) -> Tensor:
        return cross_entropy_loss(z, labels[rows], normalizer=denom)  # every row of a chunk has a label

    return _ChunkedRows.apply(logits, chunk_loss, _rows(valid), chunk_size)


# --------------------------------------------------------------------------- #
# (b) from the hidden states entering a linear head
# --------------------------------------------------------------------------- #
@dataclass
class HeadLoss:
    """`linear_head_loss`'s result: ``loss`` = kd_weight * kd + ce_weight * ce (with gradient), and the
    two unweighted terms, detached (None when not computed)."""

    loss: Tensor
    kd: Optional[Tensor]
    ce: Optional[Tensor]


def _logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], dtype: Optional[torch.dtype]) -> Tensor:
    if dtype is not None:  # as autocast runs a linear layer: every operand in its dtype
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return F.linear(hidden, weight, bias)  # (c, V)


class _Workspace:
    """fp32 (chunk, V) buffers made once per loss call and reused by every chunk.

    A fresh tensor of that size costs more than the arithmetic done on it (on CPU every allocation of this size
    maps new pages, which fault on first touch: about 15 ms for 64 MiB against 2 ms for a pass over a reused
    buffer), so the closed-form chunks write their logits, softmaxes and gradient into these.
    """

    def __init__(self, rows: int, classes: int, device):
        self.shape, self.device = (rows, classes), device
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, rows: int) -> Tensor:
        if name not in self._bufs:
            self._bufs[name] = torch.empty(self.shape, dtype=_F32, device=self.device)
        return self._bufs[name][:rows]  # (rows, V), contiguous


def _head_logits_into(out: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor], dtype) -> Tensor:
    """``h @ weight.T + bias`` (as `_logits`) written into the fp32 buffer ``out`` (c, V)."""
    if (dtype or weight.dtype) == _F32 and h.dtype == _F32:
        torch.mm(h, weight.T, out=out)
        if bias is not None:
            out.add_(bias)
    else:  # the matmul in its compute dtype, then the upcast into the buffer
        out.copy_(_logits(h, weight, bias, dtype))
    return out


def _softmax_into(out: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(z) written into ``out`` and logsumexp(z), fp32 (c, V) and (c,): the row's largest probability is
    exp(0) / sum exp(z - max) (>= 1 / V, no underflow), so logsumexp = max - log(that probability)."""
    torch.ops.aten._softmax.out(z, -1, False, out=out)
    return out, z.amax(-1) - out.amax(-1).log()


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum(a * b, -1) for (c, V) tensors without a (c, V) product: a batched dot."""
    return torch.bmm(a[:, None, :], b[:, :, None])[:, 0, 0]  # (c,)


@dataclass
class TopK:
    """A teacher stored as its top-k classes plus one "rest" bucket (`hf_kd.teacher_cache`), one row per valid
    position: ``ids`` (N, k), ``logits`` (N, k) raw teacher logits, ``logsumexp`` (N,) = logsumexp(z_teacher / T)
    over all classes, ``rest_logprob`` (N,) = log of the teacher's mass outside the top k at T."""

    ids: Tensor
    logits: Tensor
    logsumexp: Tensor
    rest_logprob: Tensor

    def take(self, rows: Tensor) -> "TopK":
        return TopK(self.ids[rows].long(), self.logits[rows].float(), self.logsumexp[rows].float(),
                    self.rest_logprob[rows].float())


def _topk_kl(zs_T: Tensor, ps: Tensor, lse_s: Tensor, target: TopK, temperature: float, scratch: Tensor):
    """Forward KL over the k + 1 buckets of `losses.topk_distillation_loss`, per row, and the coefficients of its
    gradient with respect to the student's logits at T (``zs_T`` = z / T, ``ps`` its softmax, ``lse_s`` its
    logsumexp).

    With q the teacher's bucket probabilities (Q their sum), P the student's mass outside the top k and
    r = q_rest / P: d KL / d z_v = Q p_v - q_v for a top-k class v, (Q - r) p_v for any other (the rest
    bucket's mass spread as the student spreads it). Returns per_row (c,), Q - r (c,), Q (c,), q (c, k), the
    student's top-k probabilities (c, k) and, for rows whose rest mass underflowed (r is 0 there), their
    (rows, p_v / P (t, V), q_rest) from log space, else None. ``ps`` is left as it was; ``scratch`` (c, V) is
    overwritten."""
    ids = target.ids  # (c, k)
    log_q = (target.logits / temperature - target.logsumexp[:, None]).clamp_min(F32_MIN)  # (c, k)
    log_q_rest = target.rest_logprob.clamp_min(F32_MIN)  # (c,)
    q, q_rest = log_q.exp(), log_q_rest.exp()
    log_ps_top = (zs_T.gather(-1, ids) - lse_s[:, None]).clamp_min(F32_MIN)  # (c, k)
    # P, the student's mass outside the top k: the sum of those probabilities (the top k zeroed for one read,
    # then put back). Where it underflows (< 1e-30), a logsumexp over those classes in log space instead.
    ps_top = ps.gather(-1, ids)  # (c, k)
    p_rest = ps.scatter_(-1, ids, 0.0).sum(-1)  # (c,)
    ps.scatter_(-1, ids, ps_top)
    log_p_rest = p_rest.log()
    tiny = (p_rest < 1e-30).nonzero()[:, 0]  # rows; none in practice but for k = V (no class left: P = 0)
    fix = None
    if tiny.numel():
        rest = scratch[: tiny.numel()].copy_(zs_T[tiny]).scatter_(-1, ids[tiny], float("-inf"))  # (t, V)
        m = rest.amax(-1)  # (t,); -inf when k = V
        m = torch.where(torch.isfinite(m), m, 0.0)
        mass = rest.sub_(m[:, None]).exp_().sum(-1)  # (t,)
        log_p_rest[tiny] = mass.log() + m - lse_s[tiny]
        # the rest bucket's gradient p_v / P over the classes outside the top k, from log space (p_v underflows)
        fix = (tiny, rest.div_(mass.clamp_min(F32_TINY)[:, None]), q_rest[tiny])
    log_p_rest = log_p_rest.clamp_min(F32_MIN)  # (c,)
    per_row = (q * (log_q - log_ps_top)).sum(-1) + q_rest * (log_q_rest - log_p_rest)  # (c,)
    big_q = q.sum(-1) + q_rest  # (c,)
    r = (log_q_rest - log_p_rest).clamp_max(60.0).exp()  # (c,); p_v <= P bounds r * p_v by q_rest
    if fix is not None:
        r[fix[0]] = 0.0  # those rows' rest term is added from `fix` (rows, p_v / P (t, V), q_rest)
    return per_row, big_q - r, big_q, q, ps_top, fix


def _ce_value(z: Tensor, lse: Tensor, ids: Tensor, valid: Tensor, denom: Tensor) -> Tensor:
    """Cross entropy of a chunk's labelled rows over the call's denominator: -log softmax(z)[y] = lse - z[y]."""
    return torch.where(valid, lse - z.gather(-1, ids)[:, 0], 0.0).sum() / denom.clamp_min(1.0)


def _kl_ce_chunk(z, target, kd_valid, labels, kd_denom, ce_denom, kd_weight, ce_weight, temperature, ws,
                 kind="forward_kl", jsd_beta=0.5):
    """Forward KL, reverse KL or generalised JSD, and cross entropy, of one chunk of rows, and the gradient of their
    weighted sum with respect to the student's logits, in closed form: d KL(p_t || p_s) / d z_s = (p_s - p_t) / T,
    d KL(p_s || p_t) / d z_s = p_s (log p_s - log p_t - KL) / T, d JSD / d z_s = (1 - beta) p_s (r - sum p_s r) / T
    with r = log p_s - log m, m = beta p_t + (1 - beta) p_s (the mixture's own dependence on p_s cancels), and
    d CE / d z = softmax(z) - onehot(label) (each over its denominator). ``z`` is the student's fp32 logits (c, V),
    ``target`` the teacher's fp32 logits (c, V) or a `TopK` chunk (forward KL only), both in buffers of the workspace
    ``ws`` (they are overwritten; so is ``z`` at T = 1 for the JSD, after the CE's value has read it). The same
    values and gradients as autograd through `logit_distillation_loss` / `topk_distillation_loss` /
    `cross_entropy_loss` (tests), with few passes over (c, V) tensors and no new ones: one softmax per model
    (shared with CE at T = 1), batched dot products for the KL value.
    Returns (gradient (c, V) in a workspace buffer, kd, ce)."""
    c = z.shape[0]
    kd = torch.zeros((), dtype=_F32, device=z.device)
    ce = torch.zeros((), dtype=_F32, device=z.device)
    ce_valid = labels != -100  # (c,)
    ce_scale = None
    if ce_weight is not None:
        ce_ids = torch.where(ce_valid, labels, 0)[:, None]  # (c, 1)
        ce_scale = torch.where(ce_valid, ce_weight / ce_denom.clamp_min(1.0), 0.0)[:, None]  # (c, 1)
    if kd_weight is None:  # CE alone
        p, lse = _softmax_into(ws.get("ps", c), z)
        ce = _ce_value(z, lse, ce_ids, ce_valid, ce_denom)
        g = p.mul_(ce_scale)
        return g.scatter_add_(-1, ce_ids, -ce_scale), kd, ce

    zs_T = torch.div(z, temperature, out=ws.get("zT", c)) if temperature != 1.0 else z  # (c, V)
    dense = not isinstance(target, TopK)
    zt = target if not dense or temperature == 1.0 else target.div_(temperature)  # (c, V) teacher logits at T
    reverse = kind == "reverse_kl" and dense
    if reverse:  # the teacher's logsumexp alone: its softmax goes through the student's buffer before the student's
        lse_t = _softmax_into(ws.get("ps", c), zt)[1]  # (c,)
    ps, lse_s = _softmax_into(ws.get("ps", c), zs_T)  # (c, V), (c,)
    denom = kd_denom.clamp_min(1.0)
    kd_scale = torch.where(kd_valid, kd_weight / (temperature * denom), 0.0)[:, None]  # (c, 1)
    shared = ce_weight is not None and temperature == 1.0  # CE reads the same softmax
    if shared:
        ce = _ce_value(z, lse_s, ce_ids, ce_valid, ce_denom)
    if isinstance(target, TopK):
        per_row, coef, big_q, q, ps_top, fix = _topk_kl(zs_T, ps, lse_s, target, temperature, ws.get("scratch", c))
        g = ps.mul_(coef[:, None] * kd_scale + (ce_scale if shared else 0.0))  # every class as if outside the top k
        if fix is not None:  # rows whose rest mass underflowed: - q_rest p_v / P from log space
            rows, cond, q_rest = fix
            g[rows] -= cond * (q_rest[:, None] * kd_scale[rows])
        g.scatter_(-1, target.ids, (ps_top * big_q[:, None] - q) * kd_scale + (ps_top * ce_scale if shared else 0.0))
    elif reverse:  # in the teacher's logit buffer: log p_s - log p_t = (z_s - z_t) / T - lse_s + lse_t
        log_ratio = zt.sub_(zs_T).neg_()  # (c, V): (z_s - z_t) / T, for now
        per_row = _rowdot(ps, log_ratio) - lse_s + lse_t  # (c,): sum p_s log(p_s / p_t) (as sum p_s = 1)
        g = log_ratio.add_((lse_t - lse_s - per_row)[:, None]).mul_(ps).mul_(kd_scale)  # p_s (log ratio - KL)
        if shared:
            g.addcmul_(ps, ce_scale)
    elif kind == "jsd":
        pt, lse_t = _softmax_into(ws.get("pt", c), zt)
        b = float(jsd_beta)
        log_b, log_1b = math.log(b), math.log1p(-b)
        # log p + log weight, in place in the logit buffers (finite: the logits are), then log m from both
        t_side = zt.sub_((lse_t - log_b)[:, None])  # (c, V): log p_t + log beta
        s_side = zs_T.sub_((lse_s - log_1b)[:, None])  # (c, V): log p_s + log (1 - beta)
        log_m = torch.logaddexp(t_side, s_side, out=ws.get("m", c))  # (c, V)
        t_side.sub_(log_m)  # log p_t - log m + log beta
        s_side.sub_(log_m)  # log p_s - log m + log (1 - beta)
        s_dot = _rowdot(ps, s_side)  # (c,)
        # sum p (log p - log m) per side, with sum p = 1 for the constant shifts
        per_row = b * (_rowdot(pt, t_side) - log_b) + (1.0 - b) * (s_dot - log_1b)  # (c,)
        g = s_side.sub_(s_dot[:, None]).mul_(ps).mul_(kd_scale * (1.0 - b))  # (1 - beta) p_s (r - sum p_s r)
        if shared:
            g.addcmul_(ps, ce_scale)
    else:
        pt, lse_t = _softmax_into(ws.get("pt", c), zt)
        # KL = sum p_t (z_teacher - z_student) / T - lse_t + lse_s (as sum p_t = 1)
        per_row = _rowdot(pt, zt.sub_(zs_T)) - lse_t + lse_s  # (c,)
        g = ps.mul_(kd_scale + ce_scale if shared else kd_scale).addcmul_(pt, kd_scale, value=-1.0)
    kd = torch.where(kd_valid, per_row, 0.0).sum() / denom
    if ce_weight is not None and not shared:  # CE at T = 1 beside a KD term at T != 1: its own softmax
        p, lse = _softmax_into(ws.get("pt", c), z)
        ce = _ce_value(z, lse, ce_ids, ce_valid, ce_denom)
        g.addcmul_(p, ce_scale)
    if ce_weight is not None:
        g.scatter_add_(-1, ce_ids, -ce_scale)  # - onehot(label)
    return g, kd, ce


@dataclass
class _HeadCall:
    """What `linear_head_loss` hands `_LinearHeadLoss`: the rows either term uses, the masks, labels and
    denominators, the weights (None = no such term) and settings, and a top-k teacher with its row per position."""

    index: tuple[Tensor, ...]
    kd_valid: Tensor  # (...) bool
    labels: Tensor  # (...) with -100 where there is no label
    kd_denom: Tensor
    ce_denom: Tensor
    kd_weight: Optional[float]
    ce_weight: Optional[float]
    kind: str
    temperature: float
    jsd_beta: float
    chunk_size: int
    s_dtype: Optional[torch.dtype]
    t_dtype: Optional[torch.dtype]
    topk: Optional[TopK]
    topk_row: Optional[Tensor]  # (...): the top-k teacher's row of each position, -1 before the first
    into_grad: bool = False  # the weight's gradient goes into `.grad` by the backward pass, not through autograd

    def teacher_topk(self, rows: tuple[Tensor, ...]) -> TopK:
        """This chunk's rows of the stored top-k teacher (rows without one read any row)."""
        return self.topk.take(self.topk_row[rows].clamp_min(0))


class _HeadGrads:
    """The gradients w.r.t. the student's hidden states, head weight and bias that the forward pass computes: each
    hidden row written once, (..., D); the weight's and bias's summed over the chunks in fp32."""

    def __init__(self, s_hidden: Tensor, w: Tensor, b: Optional[Tensor], needs: tuple[bool, ...]):
        device = s_hidden.device
        self.h = torch.zeros_like(s_hidden) if needs[0] else None  # (..., D)
        # The weight's (V, D) sum starts as the first chunk's gradient: no vocabulary-sized buffer filled with zeros
        # only to be added to (on CPU a fresh (V, D) buffer also costs its page faults).
        self.w, self.w_shape = None, tuple(w.shape) if needs[1] else None
        self.b = torch.zeros(b.shape, dtype=_F32, device=device) if b is not None and needs[2] else None

    def add_logit_grad(self, rows, g: Tensor, h: Tensor, w: Tensor) -> None:
        """Add a chunk's gradient ``g`` (c, V) w.r.t. its logits ``h @ w.T + b``, in the head's compute dtype."""
        if self.h is not None:
            self.h[rows] = (g @ w).to(self.h.dtype)  # (c, D)
        if self.w_shape is not None:
            if self.w is None:
                self.w = (g.T @ h.to(g.dtype)).float()  # (V, D)
            elif w.dtype == _F32:
                self.w.addmm_(g.T, h.to(_F32))  # (V, D), in place
            else:
                self.w += (g.T @ h.to(g.dtype)).float()
        if self.b is not None:
            self.b += g.sum(0).float()

    def saved(self, s_weight: Tensor, s_bias: Optional[Tensor]) -> list[Optional[Tensor]]:
        """The three gradients in the parameters' dtypes (None where not computed), for the backward pass."""
        w = self.w
        if w is None and self.w_shape is not None:  # no position at all
            w = torch.zeros(self.w_shape, dtype=_F32, device=s_weight.device)
        return [self.h, None if w is None else w.to(s_weight.dtype), None if self.b is None else self.b.to(s_bias.dtype)]


@torch.no_grad()
def _closed_form_chunk(rows, s_hidden, w, b, teacher, call: _HeadCall, grads: _HeadGrads, ws: _Workspace):
    """One chunk with `_kl_ce_chunk`'s closed-form gradient (forward/reverse KL or JSD, and/or CE): no autograd graph.
    Returns the chunk's (kd, ce)."""
    zt = call.teacher_topk(rows) if call.topk is not None else None
    h = s_hidden[rows]  # (c, D)
    c = h.shape[0]
    z = _head_logits_into(ws.get("z", c), h, w, b, call.s_dtype)  # (c, V) fp32
    if call.kd_weight is not None and call.topk is None:
        t_hidden, tw, tb = teacher
        zt = _head_logits_into(ws.get("zt", c), t_hidden[rows], tw, tb, call.t_dtype)
    g, kd, ce = _kl_ce_chunk(z, zt, call.kd_valid[rows], call.labels[rows], call.kd_denom, call.ce_denom,
                             call.kd_weight, call.ce_weight, call.temperature, ws, call.kind,
                             call.jsd_beta)  # (c, V) fp32
    if g.dtype != w.dtype:  # the backward matmuls in the head's compute dtype, as autograd's
        g = g.to(w.dtype)
    grads.add_logit_grad(rows, g, h, w)
    return kd, ce


def _autograd_chunk(rows, s_hidden, w, b, teacher, call: _HeadCall, grads: _HeadGrads):
    """One chunk through autograd (MSE; reverse KL or JSD from a top-k teacher: a distillation term is there).
    Returns (kd, ce), detached; ce is None without a CE term. The chunk's (c, V) tensors go when it returns."""
    if call.topk is not None:
        zt = call.teacher_topk(rows)
    else:
        t_hidden, tw, tb = teacher
        with torch.no_grad():
            zt = _logits(t_hidden[rows], tw, tb, call.t_dtype)  # (c, V)
    settings = dict(kind=call.kind, temperature=call.temperature, jsd_beta=call.jsd_beta, normalizer=call.kd_denom)
    ce = None
    h = s_hidden[rows]  # (c, D)
    with torch.no_grad():
        zs = _logits(h, w, b, call.s_dtype)  # (c, V)
    with torch.enable_grad():
        zs.requires_grad_()  # autograd through the loss only: the head's products are `add_logit_grad`'s, as above
        loss = torch.zeros((), dtype=_F32, device=s_hidden.device)
        if call.topk is not None:
            kd = topk_distillation_loss(zs, zt.ids, zt.logits, zt.logsumexp, zt.rest_logprob, call.kd_valid[rows],
                                        **settings)
        else:
            # without a CE term every row is a distillation row: no mask to apply to the (c, V) logits
            kd = logit_distillation_loss(zs, zt, None if call.ce_weight is None else call.kd_valid[rows], **settings)
        loss = loss + call.kd_weight * kd
        if call.ce_weight is not None:
            ce = cross_entropy_loss(zs, call.labels[rows], normalizer=call.ce_denom)
            loss = loss + call.ce_weight * ce
        (g,) = torch.autograd.grad(loss, zs)  # (c, V), in the head's compute dtype
    grads.add_logit_grad(rows, g, h, w)
    return kd.detach(), None if ce is None else ce.detach()


class _LinearHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, call: _HeadCall):
        n = call.index[0].numel() if call.index else 0
        device = s_hidden.device
        needs = ctx.needs_input_grad
        # The head in its compute dtype (autocast's dtype when the model ran under it), cast once.
        w = s_weight.detach().to(call.s_dtype or s_weight.dtype)
        b = None if s_bias is None else s_bias.detach().to(call.s_dtype or s_bias.dtype)
        tw = t_weight.detach().to(call.t_dtype or t_weight.dtype)
        tb = None if t_bias is None else t_bias.detach().to(call.t_dtype or t_bias.dtype)
        grads = _HeadGrads(s_hidden, w, b, needs)
        kd_sum = torch.zeros((), dtype=_F32, device=device)
        ce_sum = torch.zeros((), dtype=_F32, device=device)
        # no autograd graph per chunk: forward KL, reverse KL and JSD against full teacher logits, CE alone
        closed_form = (call.kd_weight is None or call.kind == "forward_kl"
                       or (call.kind in ("reverse_kl", "jsd") and call.topk is None))
        ws = _Workspace(min(call.chunk_size, n), w.shape[0], device)  # closed form's (chunk, V) buffers, made on use
        for start in range(0, n, call.chunk_size):
            rows = _take(call.index, start, start + call.chunk_size)
            if closed_form:
                kd, ce = _closed_form_chunk(rows, s_hidden, w, b, (t_hidden, tw, tb), call, grads, ws)
            else:
                kd, ce = _autograd_chunk(rows, s_hidden, w, b, (t_hidden, tw, tb), call, grads)
            kd_sum += kd
            if ce is not None:
                ce_sum += ce
        # Kept on ctx, not saved for backward: the backward pass hands them on as autograd's only reference, so that
        # autograd adds a tied weight's other gradient into them in place (no new (V, D) tensor).
        ctx.grads = grads.saved(s_weight, s_bias)
        ctx.param = s_weight if call.into_grad else None  # the leaf whose .grad takes the weight's gradient
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return kd_sum * (call.kd_weight or 0.0) + ce_sum * (call.ce_weight or 0.0), kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        # kd and ce are returned detached (for logging): only `loss` carries a gradient. The stored gradients are
        # scaled in place and given away: no second (V, D) tensor, and no second backward through this graph.
        if ctx.grads is None:
            raise RuntimeError("the chunked head loss's gradients were handed on by a first backward pass; a second "
                               "one through the same graph (retain_graph=True) is not supported: compute the loss again")
        grads, ctx.grads = ctx.grads, None
        out = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        param, ctx.param = ctx.param, None
        if param is not None and out[1] is not None:  # `into_grad`: see linear_head_loss
            if param.grad is None:
                param.grad = out[1]
            else:
                param.grad.add_(out[1])
            out[1] = None
        return out[0], out[1], out[2], None, None, None, None


def _check_head_args(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, teacher_topk,
                     kd_weight, ce_weight, kind, temperature, jsd_beta) -> None:
    """`linear_head_loss`'s refusals: a term without its inputs, a teacher given twice, shapes that disagree."""
    if kd_weight is None and ce_weight is None:
        raise ValueError("linear_head_loss needs kd_weight or ce_weight (or both)")
    if kd_weight is not None:
        _check_kind(kind, KD_LOSSES, "logit distillation")
        if teacher_topk is not None:
            if teacher_hidden is not None or teacher_weight is not None:
                raise ValueError("give the teacher as teacher_hidden + teacher_weight or as teacher_topk, not both")
            check_topk_kind(kind)
        elif teacher_hidden is None or teacher_weight is None:
            raise ValueError("the distillation term (kd_weight) needs teacher_hidden and teacher_weight")
        elif teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
            raise ValueError(
                f"teacher hidden {tuple(teacher_hidden.shape)} and student hidden {tuple(student_hidden.shape)} "
                "must have the same leading shape"
            )
        if teacher_weight is not None and teacher_weight.shape[0] != student_weight.shape[0]:
            raise ValueError(
                f"teacher head has {teacher_weight.shape[0]} outputs and student head {student_weight.shape[0]}; "
                "distillation needs the same vocabulary"
            )
        check_softening(kind, temperature, jsd_beta)
    if ce_weight is not None:
        if labels is None:
            raise ValueError("the cross-entropy term (ce_weight) needs labels")
        if labels.shape != student_hidden.shape[:-1]:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} must equal the hidden states' leading shape "
                f"{tuple(student_hidden.shape[:-1])}"
            )


def _topk_rows(teacher_topk: TopK, kd_valid: Tensor, num_classes: int) -> tuple[TopK, Tensor]:
    """A top-k teacher checked against the mask (one row per position) and on the mask's device, and the row of
    each position, (...) (-1 before the first)."""
    n_kd = int(kd_valid.sum())
    k = teacher_topk.ids.shape[-1]
    if teacher_topk.ids.shape != (n_kd, k) or teacher_topk.logits.shape != (n_kd, k) or \
            teacher_topk.logsumexp.shape != (n_kd,) or teacher_topk.rest_logprob.shape != (n_kd,):
        raise ValueError(
            f"teacher_topk holds {tuple(teacher_topk.ids.shape)} ids, {tuple(teacher_topk.logits.shape)} logits, "
            f"{tuple(teacher_topk.logsumexp.shape)} and {tuple(teacher_topk.rest_logprob.shape)} row values; the "
            f"mask has {n_kd} positions: one row (k ids and logits, one logsumexp and rest) per position"
        )
    check_topk_classes(k, num_classes)
    device = kd_valid.device
    topk = TopK(*(x.to(device) for x in (teacher_topk.ids, teacher_topk.logits, teacher_topk.logsumexp,
                                          teacher_topk.rest_logprob)))
    return topk, torch.cumsum(kd_valid.reshape(-1).long(), 0).reshape(kd_valid.shape) - 1


def linear_head_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    kd_weight: Optional[float] = 1.0,
    ce_weight: Optional[float] = None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    normalizer: Normalizer = None,
    ce_normalizer: Normalizer = None,
    ignore_index: int = -100,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    student_dtype: Optional[torch.dtype] = None,
    teacher_dtype: Optional[torch.dtype] = None,
    teacher_topk: Optional[TopK] = None,
    weight_grad_into_grad: bool = False,
) -> HeadLoss:
    """Distillation and/or cross entropy through linear heads, ``chunk_size`` positions at a time.

    Shapes: ``student_hidden`` (..., D), ``student_weight`` (V, D), ``student_bias`` (V,);
    ``teacher_hidden`` (..., Dt), ``teacher_weight`` (V, Dt); ``mask`` (...) bool, the positions of the
    distillation term (None = all); ``labels`` (...) int with ``ignore_index`` for positions without a
    label. Logits are ``hidden @ weight.T + bias``, computed in ``student_dtype`` / ``teacher_dtype``
    when given (the dtype autocast gave the head's matmul), else in the weight's dtype.

    ``kd_weight`` (None = no distillation term) weighs `logit_distillation_loss` with ``kind``,
    ``temperature``, ``jsd_beta``, ``normalizer``; ``ce_weight`` (None = no CE term) weighs
    `cross_entropy_loss` on ``labels`` with ``ce_normalizer``. Values and gradients (w.r.t. the student's
    hidden states, weight and bias) equal those of the unchunked losses on the full logits. The teacher
    gets no gradient. Gradients are computed during the forward pass and stored: (..., D) for the hidden
    states, (V, D) summed in fp32 for the weight; the largest transient tensors are (chunk_size, V). The backward
    pass scales them in place and hands them on, so it runs once per call (no ``retain_graph``).

    ``teacher_topk`` (instead of ``teacher_hidden`` and ``teacher_weight``): a teacher stored as its top-k
    classes (`TopK`, one row per position of ``mask``, in row-major order, as `hf_kd.teacher_cache` saves
    them); the distillation term is then `topk_distillation_loss` (not ``mse``).

    ``weight_grad_into_grad``: the backward pass adds the student weight's gradient to ``student_weight.grad``
    itself (a leaf that requires grad) and hands autograd none. For a weight tied to an input embedding whose own
    gradient is sparse (``nn.Embedding(sparse=True)``), autograd then adds that into ``.grad`` in place: one (V, D)
    gradient in the step instead of two (autograd sums a dense and a sparse gradient of one leaf out of place).
    Hooks on the weight tensor (``register_hook``) then see the other uses' gradient only.
    """
    _check_chunk(chunk_size)
    if weight_grad_into_grad and not (student_weight.is_leaf and student_weight.requires_grad):
        raise ValueError("weight_grad_into_grad=True needs the student's head weight itself (a leaf that requires "
                         "grad), not a slice or a copy of it: pass the parameter, or leave the option off")
    _check_head_args(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, teacher_topk,
                     kd_weight, ce_weight, kind, temperature, jsd_beta)
    device = student_hidden.device
    lead = student_hidden.shape[:-1]
    kd_valid = _valid_mask(mask, lead, device) if kd_weight is not None else torch.zeros(lead, dtype=torch.bool, device=device)
    if ce_weight is not None:
        labels = labels.to(device)
        ce_valid = labels != ignore_index  # (...)
        # cross_entropy_loss masks with -100; other ignore indices become -100 here.
        labels = torch.where(ce_valid, labels, -100)
    else:
        ce_valid = torch.zeros(lead, dtype=torch.bool, device=device)
        labels = torch.full(lead, -100, dtype=torch.long, device=device)
    topk, topk_row = None, None
    if kd_weight is not None and teacher_topk is not None:
        topk, topk_row = _topk_rows(teacher_topk, kd_valid, student_weight.shape[0])
    call = _HeadCall(
        _rows(kd_valid | ce_valid), kd_valid, labels,  # positions either term uses; the others are never touched
        _denominator(normalizer, kd_valid.sum(), device), _denominator(ce_normalizer, ce_valid.sum(), device),
        None if kd_weight is None else float(kd_weight), None if ce_weight is None else float(ce_weight),
        kind, float(temperature), float(jsd_beta), chunk_size, student_dtype, teacher_dtype, topk, topk_row,
        weight_grad_into_grad,
    )
    if teacher_hidden is None:  # CE only, or a top-k teacher: a stand-in that is never read
        teacher_hidden, teacher_weight = student_hidden.detach(), student_weight.detach()
    loss, kd, ce = _LinearHeadLoss.apply(
        student_hidden, student_weight, student_bias, teacher_hidden.detach(), teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(), call,
    )
    return HeadLoss(loss, kd if kd_weight is not None else None, ce if ce_weight is not None else None)


def linear_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    mask: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    normalizer: Normalizer = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """`logit_distillation_loss` of the logits ``hidden @ weight.T + bias`` of student and teacher, chunked
    (see `linear_head_loss`)."""
    return linear_head_loss(
        student_hidden, student_weight, teacher_hidden, teacher_weight, mask, student_bias=student_bias,
        teacher_bias=teacher_bias, kind=kind, temperature=temperature, jsd_beta=jsd_beta, normalizer=normalizer,
        chunk_size=chunk_size,
    ).loss


def linear_cross_entropy_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    normalizer: Normalizer = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """`cross_entropy_loss` of the logits ``hidden @ weight.T + bias``, chunked (see `linear_head_loss`)."""
    return linear_head_loss(
        hidden, weight, labels=labels, student_bias=bias, kd_weight=None, ce_weight=1.0,
        ce_normalizer=normalizer, ignore_index=ignore_index, chunk_size=chunk_size,
    ).loss


# --------------------------------------------------------------------------- #
# reading the hidden states that enter a model's head (used by the trainer)
# --------------------------------------------------------------------------- #
class HeadTap:
    """Forward pre-hook on a linear head: keeps the hidden states it receives and lets it compute logits
    for the first ``keep`` positions only (None = all), so the model never makes its full logits.

    After the forward pass: ``hidden`` (..., T, D) is what entered the head, ``dtype`` the autocast dtype
    its matmul ran in (None without autocast), ``calls`` how often the head ran (the route needs 1).
    Use as a context manager around the forward pass.
    """

    def __init__(self, head: torch.nn.Module, keep: Optional[int] = None):
        self.head, self.keep = head, keep
        self.hidden: Optional[Tensor] = None
        self.dtype: Optional[torch.dtype] = None
        self.calls = 0
        self._handle = None

    def _hook(self, module, args):
        h = args[0]
        self.hidden, self.calls = h, self.calls + 1
        device = h.device.type
        self.dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        if self.keep is None or h.dim() < 2:
            return None
        return (h[..., : self.keep, :], *args[1:])  # (..., keep, D)

    def __enter__(self) -> "HeadTap":
        self._handle = self.head.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def reproduces(self, logits: Tensor, positions: int = 8) -> bool:
        """Whether ``head(hidden)`` gives the model's own ``logits`` (nothing after the head: no soft-capping,
        no scaling), compared on the first ``positions`` positions."""
        h = self.hidden
        if self.calls != 1 or h is None or h.dim() < 2 or logits.shape[:-1] != h.shape[:-1]:
            return False
        with torch.no_grad():
            mine = _logits(h[..., :positions, :], self.head.weight, self.head.bias, self.dtype).float()
            theirs = logits[..., :positions, :].float()
            tol = 1e-4 if (self.dtype or self.head.weight.dtype) == torch.float32 else 2e-2
            return bool(torch.allclose(mine, theirs, rtol=tol, atol=tol))
