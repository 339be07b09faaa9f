"""A NaN/inf loss: stop with the step, the component and where it came from, or drop the micro-batch's gradient.

``nonfinite_loss="stop"`` raises `NonFiniteLossError` before the backward pass (on every process, with one
message, when there are several); ``"skip"`` returns a zero connected to every trainable parameter, so the
backward pass gives exact zero gradients and DDP's all-reduce still sees every parameter.
"""

from __future__ import annotations

import logging

import torch

from .. import distributed
from ..errors import NonFiniteLossError

logger = logging.getLogger(__name__)

OUTPUT_FIELDS = ("logits", "start_logits", "end_logits", "hidden_states", "attentions", "encoder_hidden_states",
                 "decoder_hidden_states", "encoder_attentions", "decoder_attentions")


def describe(components: dict, s_out, t_out, step: int) -> tuple[str, list[str]]:
    """What was not finite at optimizer step `step`, and where it came from; and the bad component names."""
    bad = [name for name, v in components.items() if not torch.isfinite(v).all()] or ["loss (total)"]
    sources = []
    for who, out in (("student", s_out), ("teacher", t_out)):
        if out is None:
            continue
        for key in OUTPUT_FIELDS:
            value = getattr(out, key, None)
            tensors = value if isinstance(value, (tuple, list)) else [value]
            if any(torch.is_tensor(t) and not torch.isfinite(t).all() for t in tensors):
                sources.append(f"the {who}'s {key}")
    where = f" ({', '.join(sources)} hold NaN/inf)" if sources else ""
    return f"non-finite {', '.join(bad)} at step {step}{where}", bad


def stop(message: str | None, world_size: int):
    """Raise `NonFiniteLossError`; with several processes every one raises with every process's message."""
    if world_size > 1:
        reports = distributed.gather_messages(message, world_size)
        message = "; ".join(f"{m} on process {rank} of {world_size}" for rank, m in enumerate(reports) if m)
    raise NonFiniteLossError(
        f"{message}. Training stopped before this step's backward pass"
        + (" on every process" if world_size > 1 else "")
        + "; no checkpoint was written after it. Lower learning_rate or the temperature, check the data of "
        "this step, use bf16 instead of fp16, or set nonfinite_loss='skip' to drop such batches."
    )


def zero_loss(model, device) -> torch.Tensor:
    """A zero connected to every trainable parameter: backward gives exact zero gradients (and DDP sees them all)."""
    params = [p for p in model.parameters() if p.requires_grad]
    zero = sum((p.reshape(-1)[:1] * 0).sum() for p in params) if params else torch.zeros((), device=device)
    return zero.float()


def check(total, components: dict, outputs: tuple, step: int, args, accelerator, skipped: list) -> bool:
    """Whether the loss of optimizer step `step` is finite. When it is not: nonfinite_loss="stop" raises (on every
    process together when there are several), "skip" warns, appends (step, components) to `skipped`, and returns
    False (the caller then returns `zero_loss`). `outputs`: the (student, teacher) outputs, for the message."""
    finite = bool(torch.isfinite(total))  # one sync per micro-batch, as Trainer's own nan/inf filter costs
    stop_run, world = args.nonfinite_loss == "stop", args.world_size
    if stop_run and world > 1:
        # Stopping is collective: a process that raised alone would leave the others waiting in the
        # backward pass's all-reduce. One scalar all-reduce per micro-batch.
        if distributed.any_process(not finite, accelerator):
            stop(None if finite else describe(components, *outputs, step)[0], world)
        return True
    if finite:
        return True
    message, bad = describe(components, *outputs, step)
    if stop_run:
        stop(message, 1)
    # Not collective: the zero loss reaches every student parameter, so DDP's all-reduce still runs, and the
    # projections' gradients are averaged whether or not this process has any.
    logger.warning("%s: this batch's gradient is dropped (nonfinite_loss='skip').", message)
    skipped.append((step, ", ".join(bad)))
    return False
