"""What a model costs: parameters, weight size on disk, forward latency."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["count_parameters", "size_on_disk_mb", "measure_latency_ms"]

# weight files counted by size_on_disk_mb; Trainer's pickled arguments are not weights
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_NOT_WEIGHTS = {"training_args.bin"}


def count_parameters(model) -> int:
    """Number of parameters (tied weights counted once, as ``model.parameters()`` yields them), also when
    DeepSpeed ZeRO-3 has partitioned them (then ``numel()`` is 0 and ``ds_numel`` holds the full count)."""
    return int(sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters()))


def size_on_disk_mb(folder: str | os.PathLike) -> float:
    """Total size of the weight files (``*.safetensors``, ``*.bin``) directly in ``folder``.

    MB = 1e6 bytes. ``training_args.bin`` (written by ``Trainer.save_model``) is not counted.
    """
    total = 0
    for entry in Path(folder).iterdir():
        if entry.is_file() and entry.name.endswith(_WEIGHT_SUFFIXES) and entry.name not in _NOT_WEIGHTS:
            total += entry.stat().st_size
    return total / 1e6


def _model_device(model):
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return None


def measure_latency_ms(model, inputs: Mapping[str, Any], *, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time in milliseconds of ``model(**inputs)``.

    Runs under ``torch.inference_mode()`` with ``model.eval()`` (the previous train/eval mode is
    restored afterwards), ``warmup`` untimed calls first, timed with ``time.perf_counter``.
    Tensors in ``inputs`` are moved to the model's device; on CUDA the device is synchronised
    around each call so the time covers the kernels, not just their launch.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    device = _model_device(model)
    if device is not None:
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)

    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for _ in range(max(warmup, 0)):
                model(**inputs)
            sync()
            for _ in range(repeats):
                start = time.perf_counter()
                model(**inputs)
                sync()
                times.append((time.perf_counter() - start) * 1000.0)
    finally:
        model.train(was_training)
    return float(statistics.median(times))
