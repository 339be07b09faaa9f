"""Distillation losses as pure functions of tensors and masks.

Every function upcasts its inputs to fp32 before any softmax / log / square,
and returns a 0-dim fp32 tensor.

Reduction convention (shared by all losses)
-------------------------------------------
``loss = sum(per_position_loss over valid positions) / denominator`` where

* ``denominator = normalizer`` if ``normalizer`` is given (python number or
  tensor; the trainer passes the count over a whole gradient-accumulation
  window, so that summing the micro-batch losses gives the window mean), else
  the number of valid positions in this call (see each function for what a
  "position" is);
* the denominator is clamped to ``>= 1`` in both cases, so an all-masked
  input gives exactly ``0.0`` with zero (finite) gradients.

Masked positions are selected away with ``torch.where`` and their inputs are
replaced by safe values before any arithmetic, so NaN/inf stored at masked
positions can reach neither the loss nor the gradients.
"""

from __future__ import annotations

import math
from numbers import Number
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = [
    "COMPONENTS",
    "F32_MIN",
    "F32_TINY",
    "KD_LOSSES",
    "HIDDEN_LOSSES",
    "ATTENTION_LOSSES",
    "logit_distillation_loss",
    "topk_distillation_loss",
    "cross_entropy_loss",
    "hidden_state_loss",
    "attention_loss",
    "attention_pair_count",
]

KD_LOSSES = ("forward_kl", "reverse_kl", "jsd", "mse")
HIDDEN_LOSSES = ("mse", "cosine")
ATTENTION_LOSSES = ("mse", "kl")
#: The loss components `DistillationTrainer` logs (each unweighted, beside `loss`), in this order.
COMPONENTS = ("kd_loss", "ce_loss", "hidden_loss", "attention_loss", "relation_loss")

_F32 = torch.float32
F32_MIN = torch.finfo(torch.float32).min  # most negative finite fp32
F32_TINY = torch.finfo(torch.float32).tiny  # smallest positive normal fp32
_COSINE_EPS = 1e-8

Normalizer = Optional[Union[Number, Tensor]]


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _check_kind(kind: str, valid: tuple, what: str) -> None:
    if kind not in valid:
        raise ValueError(f"unknown {what} kind {kind!r}; valid kinds are {valid}")


def check_logit_loss_args(student_shape, teacher_shape, kind: str, temperature: float, jsd_beta: float) -> None:
    """The argument checks every logit distillation loss (chunked or not) makes."""
    _check_kind(kind, KD_LOSSES, "logit distillation")
    if tuple(student_shape) != tuple(teacher_shape):
        raise ValueError(
            f"student logits {tuple(student_shape)} and teacher logits {tuple(teacher_shape)} must have the same shape"
        )
    check_softening(kind, temperature, jsd_beta)


def check_softening(kind: str, temperature: float, jsd_beta: float) -> None:
    """The settings of a divergence between softened distributions: jsd's beta in (0, 1), a positive temperature."""
    if kind == "jsd" and not (0.0 < jsd_beta < 1.0):
        raise ValueError(f"jsd_beta must be in (0, 1), got {jsd_beta}")
    if kind != "mse" and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def check_topk_kind(kind: str) -> None:
    """A teacher stored as its top k classes cannot give ``mse``, which compares every raw logit."""
    if kind == "mse":
        raise ValueError("kd_loss='mse' compares every raw logit; a top-k teacher cannot give it. Use forward_kl, "
                         "reverse_kl or jsd.")


def check_topk_classes(k: int, num_classes: int) -> None:
    if k > num_classes:
        raise ValueError(f"k={k} top-k classes but the student has only {num_classes} classes")


def _valid_mask(mask: Optional[Tensor], lead_shape: torch.Size, device) -> Tensor:
    """Bool mask of exactly ``lead_shape`` (None -> all True)."""
    if mask is None:
        return torch.ones(lead_shape, dtype=torch.bool, device=device)
    mask = mask.to(device=device, dtype=torch.bool)
    try:
        return torch.broadcast_to(mask, lead_shape)
    except RuntimeError as err:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not match leading shape {tuple(lead_shape)}"
        ) from err


def _class_mask(class_mask: Optional[Tensor], shape: torch.Size, device) -> Optional[Tensor]:
    if class_mask is None:
        return None
    class_mask = class_mask.to(device=device, dtype=torch.bool)
    try:
        return torch.broadcast_to(class_mask, shape)
    except RuntimeError as err:
        raise ValueError(
            f"class_mask of shape {tuple(class_mask.shape)} is not broadcastable to {tuple(shape)}"
        ) from err


def _denominator(normalizer: Normalizer, count: Optional[Tensor], device) -> Tensor:
    """A loss's denominator before its clamp to >= 1: ``normalizer`` when given, else ``count``; fp32 on ``device``."""
    if normalizer is not None:
        return torch.as_tensor(normalizer, dtype=_F32, device=device)
    return count.to(device=device, dtype=_F32)


def _reduce(per_pos: Tensor, valid: Tensor, normalizer: Normalizer, count: Optional[Tensor] = None) -> Tensor:
    """sum(per_pos over valid) / clamp_min(normalizer or count or valid.sum(), 1)."""
    total = torch.where(valid, per_pos, 0.0).sum()  # ()
    if normalizer is None and count is None:
        count = valid.sum()
    return total / _denominator(normalizer, count, total.device).clamp_min(1.0)


def _safe_log_softmax(z: Tensor, class_mask: Optional[Tensor]) -> Tensor:
    """fp32 log_softmax over the last dim; excluded classes get logit finfo.min.

    The result is clamped at finfo.min so -inf never reaches later arithmetic.
    """
    if class_mask is not None:
        z = z.masked_fill(~class_mask, F32_MIN)  # (..., C)
    return torch.log_softmax(z, dim=-1).clamp_min(F32_MIN)  # (..., C)


def _divergence_terms(log_pt: Tensor, log_ps: Tensor, kind: str, jsd_beta: float) -> Tensor:
    """Per-class terms of the divergence ``kind`` between two log-distributions (finite, fp32); sum them."""
    if kind == "forward_kl":
        return log_pt.exp() * (log_pt - log_ps)  # (..., C)
    if kind == "reverse_kl":
        return log_ps.exp() * (log_ps - log_pt)  # (..., C)
    ps = log_ps.exp()  # (..., C)
    pt = log_pt.exp()  # (..., C)
    beta = float(jsd_beta)  # jsd
    log_m = torch.logsumexp(
        torch.stack([log_pt + math.log(beta), log_ps + math.log1p(-beta)]),  # (2, ..., C)
        dim=0,
    )  # (..., C)
    return beta * pt * (log_pt - log_m) + (1.0 - beta) * ps * (log_ps - log_m)  # (..., C)


# --------------------------------------------------------------------------- #
# logits
# --------------------------------------------------------------------------- #
def logit_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Optional[Tensor] = None,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    normalizer: Normalizer = None,
    class_mask: Optional[Tensor] = None,
) -> Tensor:
    """Logit distillation loss (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network").

    Shapes: ``student_logits``, ``teacher_logits``: (..., C); ``mask``: (...) bool
    (None = all valid); ``class_mask``: bool broadcastable to (..., C), marking the
    classes that exist (excluded classes are removed from the softmax and add 0).

    Per position, with p_t = softmax(z_t / T), p_s = softmax(z_s / T):

    * ``forward_kl``: KL(p_t || p_s) = sum_c p_t (log p_t - log p_s)
    * ``reverse_kl``: KL(p_s || p_t)
    * ``jsd``: generalised JSD as in GKD (Agarwal et al. 2024),
      M = beta p_t + (1 - beta) p_s,
      JSD = beta KL(p_t || M) + (1 - beta) KL(p_s || M), beta in (0, 1)
      (beta = 0.5 is the symmetric JS divergence, bounded by log 2)
    * ``mse``: mean over (existing) classes of (z_s - z_t)^2 on RAW logits
      (temperature not applied).

    Returns sum over valid positions / (normalizer or number of valid positions),
    clamped to >= 1. Does NOT multiply by T^2 or any alpha (the trainer does).
    """
    check_logit_loss_args(student_logits.shape, teacher_logits.shape, kind, temperature, jsd_beta)

    device = student_logits.device
    shape = student_logits.shape
    valid = _valid_mask(mask, shape[:-1], device)  # (...)
    cmask = _class_mask(class_mask, shape, device)  # (..., C) or None

    # Safe values at masked positions: garbage there cannot reach forward or backward (no mask: nothing to hide).
    zs, zt = student_logits.float(), teacher_logits.float()  # (..., C)
    if mask is not None:
        zs = torch.where(valid[..., None], zs, 0.0)  # (..., C)
        zt = torch.where(valid[..., None], zt, 0.0)  # (..., C)

    if kind == "mse":
        if cmask is not None:
            zs = torch.where(cmask, zs, 0.0)  # (..., C)
            zt = torch.where(cmask, zt, 0.0)  # (..., C)
            n_cls = cmask.sum(-1).clamp_min(1).to(_F32)  # (...)
        else:
            n_cls = float(shape[-1])
        per_pos = (zs - zt).pow(2).sum(-1) / n_cls  # (...)
        return _reduce(per_pos, valid, normalizer)

    if temperature != 1.0:  # z / 1.0 is z: no (..., C) pass for it, nor its backward
        zs, zt = zs / temperature, zt / temperature  # (..., C)
    log_ps = _safe_log_softmax(zs, cmask)  # (..., C)
    log_pt = _safe_log_softmax(zt, cmask)  # (..., C)
    terms = _divergence_terms(log_pt, log_ps, kind, jsd_beta)  # (..., C)
    if cmask is not None:
        terms = torch.where(cmask, terms, 0.0)  # (..., C)
    per_pos = terms.sum(-1)  # (...)
    return _reduce(per_pos, valid, normalizer)


def topk_distillation_loss(
    student_logits: Tensor,
    topk_ids: Tensor,
    teacher_topk_logits: Tensor,
    teacher_logsumexp: Tensor,
    teacher_rest_logprob: Tensor,
    mask: Optional[Tensor] = None,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    normalizer: Normalizer = None,
) -> Tensor:
    """`logit_distillation_loss` against a teacher stored as its top-k classes plus one "rest" bucket.

    Shapes: ``student_logits`` (..., V); ``topk_ids`` (..., k) integer, distinct per row;
    ``teacher_topk_logits`` (..., k) raw teacher logits of those classes; ``teacher_logsumexp`` (...)
    = logsumexp(z_t / T) over all V classes; ``teacher_rest_logprob`` (...) = log of the teacher's
    probability outside the top k at T (-inf or very negative when k = V); ``mask`` (...) bool.

    Both distributions live on k + 1 buckets: the teacher's is
    ``[z_t[top-k] / T - logsumexp(z_t / T), rest]``; the student's is its softmax(z_s / T) over all V
    classes, read at the top-k ids, with the rest bucket = log of the student's mass elsewhere
    (a logsumexp over the other classes, not log(1 - sum), so it stays exact when that mass is tiny).
    The divergence (``forward_kl``, ``reverse_kl``, ``jsd``) over these buckets is a lower bound of the
    full one (merging classes never increases a KL or JS divergence) and equals it when k = V.
    ``mse`` needs every logit and is refused. Reduction as in the module docstring.
    """
    _check_kind(kind, KD_LOSSES, "logit distillation")
    check_topk_kind(kind)
    check_softening(kind, temperature, jsd_beta)
    lead, k = student_logits.shape[:-1], topk_ids.shape[-1]
    if topk_ids.shape[:-1] != lead or teacher_topk_logits.shape != topk_ids.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)}, top-k ids {tuple(topk_ids.shape)} and teacher top-k "
            f"logits {tuple(teacher_topk_logits.shape)} must share the leading shape and k"
        )
    if teacher_logsumexp.shape != lead or teacher_rest_logprob.shape != lead:
        raise ValueError(f"teacher_logsumexp and teacher_rest_logprob must have the leading shape {tuple(lead)}")
    check_topk_classes(k, student_logits.shape[-1])

    device = student_logits.device
    valid = _valid_mask(mask, lead, device)  # (...)
    ids = torch.where(valid[..., None], topk_ids.to(device).long(), 0)  # (..., k); safe at masked rows
    zs = torch.where(valid[..., None], student_logits.float(), 0.0)  # (..., V)
    log_ps = _safe_log_softmax(zs / temperature, None)  # (..., V)
    ps_top = log_ps.gather(-1, ids)  # (..., k)
    in_top = torch.zeros_like(log_ps, dtype=torch.bool).scatter_(-1, ids, True)  # (..., V)
    ps_rest = torch.logsumexp(log_ps.masked_fill(in_top, F32_MIN), dim=-1).clamp_min(F32_MIN)  # (...)
    log_ps_b = torch.cat([ps_top, ps_rest[..., None]], dim=-1)  # (..., k+1)

    zt = torch.where(valid[..., None], teacher_topk_logits.to(device).float(), 0.0)  # (..., k)
    lse = torch.where(valid, teacher_logsumexp.to(device).float(), 0.0)  # (...)
    rest = torch.where(valid, teacher_rest_logprob.to(device).float(), F32_MIN)  # (...)
    pt_top = (zt / temperature - lse[..., None]).clamp_min(F32_MIN)  # (..., k)
    log_pt_b = torch.cat([pt_top, rest.clamp_min(F32_MIN)[..., None]], dim=-1)  # (..., k+1)

    per_pos = _divergence_terms(log_pt_b, log_ps_b, kind, jsd_beta).sum(-1)  # (...)
    return _reduce(per_pos, valid, normalizer)


def cross_entropy_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    normalizer: Normalizer = None,
    class_mask: Optional[Tensor] = None,
) -> Tensor:
    """Hard-label cross entropy in fp32: CE = -log softmax(z)[y].

    Shapes: ``logits`` (..., C), ``labels`` (...) integer; positions with
    ``labels == ignore_index`` are excluded. ``class_mask`` (bool, broadcastable
    to (..., C)) removes classes from the softmax. Returns the sum over valid
    labels / (normalizer or number of valid labels), clamped to >= 1.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits leading shape {tuple(logits.shape[:-1])}"
        )
    device = logits.device
    labels = labels.to(device)
    valid = labels != ignore_index  # (...)
    cmask = _class_mask(class_mask, logits.shape, device)  # (..., C) or None
    z = torch.where(valid[..., None], logits.float(), 0.0)  # (..., C)
    log_p = _safe_log_softmax(z, cmask)  # (..., C)
    safe_labels = torch.where(valid, labels, 0).long()  # (...)
    nll = -log_p.gather(-1, safe_labels[..., None]).squeeze(-1)  # (...)
    return _reduce(nll, valid, normalizer)


# --------------------------------------------------------------------------- #
# hidden states
# --------------------------------------------------------------------------- #
def hidden_state_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    mask: Optional[Tensor] = None,
    *,
    kind: str = "mse",
    normalizer: Normalizer = None,
) -> Tensor:
    """Hidden-state matching loss (FitNets / TinyBERT-style, Jiao et al. 2020).

    Shapes: (B, T, D) with ``mask`` (B, T), or pooled (B, D) with ``mask`` (B,);
    both inputs must have the same D (the caller projects the student).

    * ``mse``: per token, mean over D of (h_s - h_t)^2
    * ``cosine``: per token, 1 - <h_s, h_t> / max(|h_s| |h_t|, 1e-8)
      (a zero vector gives cosine 0, i.e. loss 1, with finite gradients)

    Returns sum over valid tokens / (normalizer or number of valid tokens), clamped to >= 1.
    """
    _check_kind(kind, HIDDEN_LOSSES, "hidden-state")
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
            f"{tuple(teacher_hidden.shape)} must have the same shape (project the student first)"
        )
    if student_hidden.dim() not in (2, 3):
        raise ValueError(f"hidden states must be (B, T, D) or (B, D), got {tuple(student_hidden.shape)}")

    device = student_hidden.device
    valid = _valid_mask(mask, student_hidden.shape[:-1], device)  # (B, T) or (B,)
    hs = torch.where(valid[..., None], student_hidden.float(), 0.0)  # (B, T, D)
    ht = torch.where(valid[..., None], teacher_hidden.float(), 0.0)  # (B, T, D)

    if kind == "mse":
        per_pos = (hs - ht).pow(2).mean(-1)  # (B, T)
    else:  # cosine
        dot = (hs * ht).sum(-1)  # (B, T)
        norms = torch.linalg.vector_norm(hs, dim=-1) * torch.linalg.vector_norm(ht, dim=-1)  # (B, T)
        per_pos = 1.0 - dot / norms.clamp_min(_COSINE_EPS)  # (B, T)
    return _reduce(per_pos, valid, normalizer)


# --------------------------------------------------------------------------- #
# attention maps
# --------------------------------------------------------------------------- #
def attention_pair_count(mask: Tensor) -> Tensor:
    """Number of valid (query, key) pairs, sum_b n_b^2, for ``mask`` (B, T).

    This is the default denominator of ``attention_loss(kind="mse")``;
    ``kind="kl"`` uses the number of valid query rows, ``mask.sum()``.
    """
    n = mask.to(torch.bool).sum(-1).to(_F32)  # (B,)
    return n.pow(2).sum()  # ()


def attention_loss(
    student_attn: Tensor,
    teacher_attn: Tensor,
    mask: Optional[Tensor] = None,
    *,
    kind: str = "mse",
    normalizer: Normalizer = None,
) -> Tensor:
    """Attention-map distillation on probabilities (TinyBERT, Jiao et al. 2020).

    Shapes: ``student_attn`` (B, Hs, T, T), ``teacher_attn`` (B, Ht, T, T) with
    rows = queries and columns = keys; ``mask`` (B, T) of valid tokens (None =
    all valid). If Hs != Ht both are first averaged over heads (keeping a head
    dim of size 1); otherwise heads are compared one to one.

    * ``mse``: per valid (q, k) pair, mean over heads of (A_s - A_t)^2; default
      denominator = number of valid pairs, sum_b n_b^2 (``attention_pair_count``).
    * ``kl``: per valid query row and head,
      sum over valid keys of A_t (log A_t - log A_s) (probabilities clamped at
      finfo(float32).tiny before log, terms with A_t = 0 are 0), mean over heads;
      default denominator = number of valid query rows, ``mask.sum()``.

    Returns the sum / (normalizer or that default count), clamped to >= 1.
    """
    _check_kind(kind, ATTENTION_LOSSES, "attention")
    if student_attn.dim() != 4 or teacher_attn.dim() != 4:
        raise ValueError("attention maps must be (B, H, T, T)")
    if (student_attn.shape[0], *student_attn.shape[2:]) != (teacher_attn.shape[0], *teacher_attn.shape[2:]):
        raise ValueError(
            f"student attention {tuple(student_attn.shape)} and teacher attention "
            f"{tuple(teacher_attn.shape)} differ in batch or sequence dims"
        )
    B, _, T, T2 = student_attn.shape
    if T != T2:
        raise ValueError(f"attention maps must be square in the last two dims, got {T}x{T2}")

    device = student_attn.device
    valid = _valid_mask(mask, torch.Size((B, T)), device)  # (B, T)
    pair = valid[:, None, :, None] & valid[:, None, None, :]  # (B, 1, T, T)

    a_s = torch.where(pair, student_attn.float(), 0.0)  # (B, Hs, T, T)
    a_t = torch.where(pair, teacher_attn.float(), 0.0)  # (B, Ht, T, T)
    if a_s.shape[1] != a_t.shape[1]:
        a_s = a_s.mean(1, keepdim=True)  # (B, 1, T, T)
        a_t = a_t.mean(1, keepdim=True)  # (B, 1, T, T)

    if kind == "mse":
        per_pair = (a_s - a_t).pow(2).mean(1)  # (B, T, T)
        return _reduce(per_pair, pair[:, 0], normalizer, count=attention_pair_count(valid))

    # kl: teacher prob 0 (incl. masked pairs) -> term 0; logs on clamped values.
    a_s = torch.where(pair, a_s, 1.0)  # (B, H, T, T)
    log_ratio = a_t.clamp_min(F32_TINY).log() - a_s.clamp_min(F32_TINY).log()  # (B, H, T, T)
    terms = torch.where(pair & (a_t > 0), a_t * log_ratio, 0.0)  # (B, H, T, T)
    per_row = terms.sum(-1).mean(1)  # (B, T)
    return _reduce(per_row, valid, normalizer)
