"""Schedules for the temperature and alpha: a value that moves from a start to an end over training.

The optimizer steps count from 0 to ``total_steps - 1``: the first step uses ``start``, the last one
``end``. With p = step / (total_steps - 1), clipped to [0, 1] (p = 0 when there is a single step):

- ``constant``: start
- ``linear``:   start + (end - start) * p
- ``cosine``:   end + (start - end) * (1 + cos(pi * p)) / 2   (flat at both ends, steepest mid-way)

Typical uses: soften early and sharpen later (temperature 4 -> 1), or lean on the teacher early and on
the labels later (alpha 0.9 -> 0.1). The T^2 factor of the KD term follows the current T.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def schedule_value(kind: str, start: float, end: float | None, step: int, total_steps: int) -> float:
    """The value of schedule `kind` at optimizer step `step` (0-based) of `total_steps`."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; use one of {', '.join(SCHEDULES)}.")
    if kind == "constant":
        return float(start)
    if end is None:
        raise ValueError(f"a {kind} schedule needs an end value.")
    p = min(max(step / (total_steps - 1), 0.0), 1.0) if total_steps > 1 else 0.0
    if kind == "linear":
        return start + (end - start) * p
    return end + (start - end) * (1.0 + math.cos(math.pi * p)) / 2.0
