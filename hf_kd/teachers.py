"""Several teachers: their weights, their compatibility, and the one target they give the student.

With teachers i = 1..K and weights w_i (>= 0, normalised to sum 1), the logit target is the mixture of
their softened distributions, not a distribution of averaged logits:

    p_avg = sum_i w_i softmax(z_i / T)

`logit_distillation_loss` takes teacher logits and softens them itself (divides by T, then log-softmax), so
the target is passed as the logits ``T * log p_avg``: divided by T they give ``log p_avg``, which
log-softmax leaves unchanged (it sums to one already). For ``kd_loss="mse"`` (raw logits, no T) the target
is the weighted average of the logits. Hidden-state and attention losses are not averaged (teachers
differ in depth and width): the trainer refuses them with several teachers.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .tasks import TOKEN_TASKS

LOGIT_FIELDS = ("logits", "start_logits", "end_logits")


def normalise_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """``weights`` divided by their sum (equal weights when None); ValueError when unusable."""
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(
            f"teacher_weights has {len(weights)} values for {count} teachers; give one weight per teacher, "
            "in the order of teacher_model (or leave it unset for equal weights)."
        )
    total = sum(weights)
    return [w / total for w in weights]


def weight_problems(weights: Sequence[float] | None) -> list[str]:
    """What is wrong with ``teacher_weights`` on its own (for `DistillationConfig.__post_init__`)."""
    if weights is None:
        return []
    if not isinstance(weights, (list, tuple)) or not weights:
        return [f"teacher_weights={weights!r} must be a non-empty list of numbers, one per teacher."]
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        return [f"teacher_weights={list(weights)!r} must hold numbers only."]
    if any(not math.isfinite(w) or w < 0 for w in values):
        return [f"teacher_weights={values} must be finite and >= 0."]
    if sum(values) <= 0:
        return [f"teacher_weights={values} sum to 0; give at least one positive weight."]
    return []


def _output_size(config, task: str) -> tuple[int, str]:
    if task in ("sequence_classification", "token_classification"):
        return config.num_labels, "labels"
    if task in TOKEN_TASKS:
        return config.get_text_config().vocab_size, "vocabulary tokens"
    return 0, ""  # question answering: one logit per position, nothing to compare


def compatibility_problems(teachers: Sequence, task: str, names: Sequence[str]) -> list[str]:
    """Teachers whose logits cannot be averaged with the first's: other label counts or vocabulary sizes."""
    problems = []
    first, what = _output_size(teachers[0].config, task)
    for i, teacher in enumerate(teachers[1:], start=1):
        size, _ = _output_size(teacher.config, task)
        if size != first:
            problems.append(
                f"teacher {i + 1} ({names[i]}) has {size} {what} and teacher 1 ({names[0]}) has {first}; "
                "the logits of several teachers are averaged, so every teacher needs the same label set / tokenizer."
            )
    return problems


def average_teacher_logits(
    logits: Sequence[Tensor],
    weights: Sequence[float],
    *,
    kind: str,
    temperature: float,
    class_mask: Tensor | None = None,
) -> Tensor:
    """The logits whose softened distribution is the weighted mixture of the teachers' (see the module docstring).

    Shapes: each of ``logits`` (..., C); ``class_mask`` bool broadcastable to (..., C) (QA: positions that
    exist). Returns fp32 (..., C): ``T * log sum_i w_i softmax(z_i / T)``, or for ``kind="mse"`` ``sum_i w_i z_i``.
    Excluded classes hold 0 (the loss leaves them out).
    """
    if kind == "mse":
        return sum(w * z.float() for w, z in zip(weights, logits))  # (..., C)
    parts = []
    for w, z in zip(weights, logits):
        z = z.float() / temperature  # (..., C)
        if class_mask is not None:
            z = z.masked_fill(~class_mask.bool(), float("-inf"))
        parts.append(torch.log_softmax(z, dim=-1) + (math.log(w) if w > 0 else float("-inf")))
    log_avg = torch.logsumexp(torch.stack(parts), dim=0)  # (..., C): log p_avg
    out = temperature * log_avg
    if class_mask is not None:
        out = torch.where(class_mask.bool(), out, 0.0)  # (..., C)
    return out


def combine_outputs(outputs: Sequence, weights: Sequence[float], *, kind: str, temperature: float, class_mask=None):
    """One teacher output whose logit fields are the teachers' mixture target (the first output's other fields)."""
    first = outputs[0]
    combined = type(first)(**dict(first.items()))
    for name in LOGIT_FIELDS:
        if getattr(first, name, None) is not None:
            combined[name] = average_teacher_logits(
                [getattr(o, name) for o in outputs], weights, kind=kind, temperature=temperature, class_mask=class_mask
            )
    return combined
