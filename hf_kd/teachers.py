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

import json
import math
import os
from typing import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from . import adapters
from .errors import InputError
from .tasks import TOKEN_TASKS, auto_class, tasks_of_class

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


def load_teacher(teacher_model, task: str) -> PreTrainedModel:
    """A teacher given as a model is used as is; a name or path is loaded with the Auto class of `task`."""
    if isinstance(teacher_model, nn.Module):
        return teacher_model
    if not isinstance(teacher_model, (str, os.PathLike)):
        raise TypeError(
            f"teacher_model must be a PreTrainedModel or a name/path, not {type(teacher_model).__name__}."
        )
    path = str(teacher_model)
    cls = auto_class(task)
    local = os.path.expanduser(path)
    if adapters.is_adapter_folder(local):  # base model + adapter, merged (the teacher is frozen)
        teacher, problem = adapters.load_adapter_teacher(local, task, cls)
        if problem:
            raise InputError(f"Cannot load the teacher {teacher_model!r}: {problem}")
        return teacher
    if os.path.isdir(local) and not os.path.isfile(os.path.join(local, "config.json")):
        raise InputError(
            f"The teacher folder {teacher_model!r} has no config.json: it is not a model saved with save_pretrained. "
            "Point teacher_model at the folder that holds config.json and the weights."
        )
    if not os.path.exists(local) and (os.path.isabs(local) or path.startswith(".") or os.environ.get("HF_HUB_OFFLINE") == "1"):
        raise InputError(
            f"The teacher {teacher_model!r} is not a local folder"
            + (" (and the Hub is offline, HF_HUB_OFFLINE=1)" if os.environ.get("HF_HUB_OFFLINE") == "1" else "")
            + ". Check the path, or pass a model object as teacher_model."
        )
    try:
        teacher, info = cls.from_pretrained(path, output_loading_info=True)
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(
            f"Could not load the teacher {teacher_model!r} with {cls.__name__}: {err}\n"
            "Pass a local folder saved with save_pretrained, or a Hub id while online."
        ) from err
    saved_as = {a: tasks_of_class(a) for a in getattr(teacher.config, "architectures", None) or []}
    if any(saved_as.values()) and not any(task in tasks for tasks in saved_as.values()):
        name, tasks = next((a, t) for a, t in saved_as.items() if t)
        raise InputError(
            f"The teacher {teacher_model!r} was saved as {name}, a {tasks[0].replace('_', ' ')} model, not a "
            f"{task.replace('_', ' ')} model: loaded with {cls.__name__} its head would not mean what the student's "
            "does (head weights of the same shape load silently). Give a teacher fine-tuned for the student's task."
        )
    missing = info.get("missing_keys", [])
    if missing:
        raise InputError(
            f"The teacher {teacher_model!r} has no trained weights for {len(missing)} parameters of "
            f"{cls.__name__} (e.g. {sorted(missing)[:3]}): it is not a {task.replace('_', ' ')} model, so its "
            "logits would be random. Fine-tune the teacher for the task first, or give a checkpoint that has "
            "the task head."
        )
    return teacher
