"""Logit losses between two vocabularies: pure functions of tensors and a mask (fp32, reduction as `hf_kd.losses`).

The rows compared are predictions of the same thing made from the same text: the next token after a prefix
on which both tokenizations end (see `hf_kd.distill.cross_tokenizer`). Each row of the student has its own
vocabulary (Vs classes), each row of the teacher its own (Vt).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .losses import Normalizer, _reduce, _safe_log_softmax, _valid_mask, check_softening

__all__ = ["uld_loss", "hybrid_loss", "sorted_distance"]


def sorted_distance(ps: Tensor, pt: Tensor) -> Tensor:
    """Per row, sum_k |sort(ps)_k - sort(pt)_k| with both sorted in decreasing order and the shorter padded with 0.

    Shapes: ``ps`` (N, A), ``pt`` (N, B) -> (N,). The closed form of the 1-Wasserstein distance between the
    two sorted probability vectors (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal
    Logit Distillation Loss for LLMs")."""
    width = max(ps.shape[-1], pt.shape[-1])
    ps = torch.nn.functional.pad(ps.sort(-1, descending=True).values, (0, width - ps.shape[-1]))  # (N, W)
    pt = torch.nn.functional.pad(pt.sort(-1, descending=True).values, (0, width - pt.shape[-1]))  # (N, W)
    return (ps - pt).abs().sum(-1)  # (N,)


def _probs(student_logits: Tensor, teacher_logits: Tensor, valid: Tensor, temperature: float):
    zs = torch.where(valid[..., None], student_logits.float(), 0.0)  # (N, Vs)
    zt = torch.where(valid[..., None], teacher_logits.float(), 0.0)  # (N, Vt)
    return _safe_log_softmax(zs / temperature, None), _safe_log_softmax(zt / temperature, None)


def _check(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> None:
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"student rows {tuple(student_logits.shape[:-1])} and teacher rows "
                         f"{tuple(teacher_logits.shape[:-1])} must match (one row per aligned prediction)")
    check_softening("forward_kl", temperature, 0.5)


def uld_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Optional[Tensor] = None, *,
             temperature: float = 1.0, normalizer: Normalizer = None) -> Tensor:
    """ULD: the L1 distance between the sorted softmax(z / T) of student (..., Vs) and teacher (..., Vt).

    Differs from the paper in one respect: the paper sums this term with the student's cross-entropy at
    fixed weight; here the trainer weighs it with ``alpha`` like any logit loss. Returns the sum over valid
    rows / (normalizer or the number of valid rows), clamped to >= 1."""
    _check(student_logits, teacher_logits, temperature)
    valid = _valid_mask(mask, student_logits.shape[:-1], student_logits.device)
    log_ps, log_pt = _probs(student_logits, teacher_logits, valid, temperature)
    lead = valid.shape
    per_row = sorted_distance(log_ps.exp().reshape(-1, log_ps.shape[-1]), log_pt.exp().reshape(-1, log_pt.shape[-1]))
    return _reduce(per_row.reshape(lead), valid, normalizer)


def hybrid_loss(student_logits: Tensor, teacher_logits: Tensor, student_ids: Tensor, teacher_ids: Tensor,
                mask: Optional[Tensor] = None, *, temperature: float = 1.0, normalizer: Normalizer = None) -> Tensor:
    """KL on the tokens both vocabularies hold, ULD on the rest (the hybrid of TRL's GOLD trainer).

    ``student_ids`` / ``teacher_ids`` (M,): the same token string's id in each vocabulary. Per row, with the full
    softmax(z / T) of each model, p_s and p_t:

        sum_m p_t[t_m] (log p_t[t_m] - log p_s[s_m])  +  sorted_distance(p_s[not matched], p_t[not matched])

    With identical tokenizers every token is matched and this is KL(p_t || p_s), `logit_distillation_loss`'s
    forward_kl. Reduction as `uld_loss`."""
    _check(student_logits, teacher_logits, temperature)
    valid = _valid_mask(mask, student_logits.shape[:-1], student_logits.device)
    log_ps, log_pt = _probs(student_logits, teacher_logits, valid, temperature)
    device = log_ps.device
    s_ids, t_ids = student_ids.to(device).long(), teacher_ids.to(device).long()
    ls, lt = log_ps[..., s_ids], log_pt[..., t_ids]  # (..., M)
    kl = (lt.exp() * (lt - ls)).sum(-1)  # (...)
    s_rest = torch.ones(log_ps.shape[-1], dtype=torch.bool, device=device).index_fill(0, s_ids, False)
    t_rest = torch.ones(log_pt.shape[-1], dtype=torch.bool, device=device).index_fill(0, t_ids, False)
    rest = torch.zeros_like(kl)
    if s_rest.any() or t_rest.any():
        ps, pt = log_ps[..., s_rest].exp(), log_pt[..., t_rest].exp()
        rest = sorted_distance(ps.reshape(-1, ps.shape[-1]), pt.reshape(-1, pt.shape[-1])).reshape(kl.shape)
    return _reduce(kl + rest, valid, normalizer)
