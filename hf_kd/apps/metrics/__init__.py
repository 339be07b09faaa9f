"""Metrics that work offline.

``evaluate.load("accuracy")`` downloads the metric script from the Hugging Face Hub and fails
without a connection. :func:`load_metric` first looks for a bundled copy under
``hf_kd/apps/metrics/<name>/<name>.py`` (currently: ``accuracy``) and loads it from that local path,
which ``evaluate`` does without touching the network (checked with sockets blocked and with
``HF_HUB_OFFLINE=1``); any other name goes to ``evaluate.load(name)`` unchanged.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import evaluate

__all__ = ["LOCAL_METRICS_DIR", "load_metric", "local_metric_path"]

LOCAL_METRICS_DIR = Path(__file__).resolve().parent


def local_metric_path(name: str) -> str | None:
    """Path of the bundled metric script for ``name`` (e.g. ``"accuracy"``), or None."""
    if not name or "/" in name or os.sep in name or name.startswith("."):
        return None
    script = LOCAL_METRICS_DIR / name / f"{name}.py"
    return str(script) if script.is_file() else None


def load_metric(name: str, **kwargs):
    """Load an ``evaluate`` metric, preferring the bundled offline copy.

    ``name`` is a metric name (``"accuracy"`` maps to the bundled module), a local path, or any id
    ``evaluate.load`` accepts. Extra keyword arguments go to ``evaluate.load``.

    For a single process (``num_process`` 1, the default) the defaults are
    ``keep_in_memory=True`` and a unique ``experiment_id``: by default ``evaluate`` buffers
    predictions in a locked Arrow file ``<experiment_id>-1-0.arrow`` under
    ``~/.cache/huggingface/metrics``, so two runs sharing the default id at the same time collide
    on that lock. In memory no file is written at all. With ``num_process > 1`` (distributed
    evaluation, where all processes must share the file and the id) nothing is changed.
    """
    path = local_metric_path(name) or name
    if int(kwargs.get("num_process", 1)) <= 1:
        kwargs.setdefault("keep_in_memory", True)
        if kwargs.get("experiment_id") is None:
            kwargs["experiment_id"] = uuid.uuid4().hex
    return evaluate.load(path, **kwargs)
