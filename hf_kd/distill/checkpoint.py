"""What a checkpoint records beside Trainer's files, and the checks made when one is written or resumed.

``kd_config.json`` holds the run's signature (teacher weights, student architecture, loss: see
`hf_kd.distill.record.RunRecord.signature`); a resume compares it with the signature of the run being started
and refuses a checkpoint made with another set-up, before any weight is loaded.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from ..errors import InputError, NonFiniteLossError

logger = logging.getLogger(__name__)

#: Beside each checkpoint: what it was made with (teacher, student architecture, loss), compared on resume.
KD_CONFIG_NAME = "kd_config.json"


def check_finite_weights(named_parameters, step: int) -> None:
    """Refuse to checkpoint non-finite weights: a resume or load_best_model_at_end would pick them.

    A finite loss can still give non-finite weights (e.g. an overflowing backward pass)."""
    for name, p in named_parameters:
        if not torch.isfinite(p).all():
            raise NonFiniteLossError(
                f"the weights hold NaN/inf after step {step} (first: {name}); the checkpoint "
                "of this step is not written and the earlier ones are kept. Lower learning_rate, keep "
                "max_grad_norm > 0, or use bf16 instead of fp16; then resume from the last checkpoint."
            )


def write_signature(folder: str, signature: dict) -> None:
    with open(os.path.join(folder, KD_CONFIG_NAME), "w") as f:
        json.dump(signature, f, indent=1)


def signature_differences(saved: dict, now: dict) -> list[str]:
    """Every field whose value differs between two signatures (a field on one side only differs too)."""
    now = json.loads(json.dumps(now))  # tuples -> lists, as read back
    return [
        f"{group}.{key}: checkpoint {saved.get(group, {}).get(key)!r}, now {fields.get(key)!r}"
        for group, fields in now.items()
        for key in {**saved.get(group, {}), **fields}
        if saved.get(group, {}).get(key) != fields.get(key)
    ]


def check_resume(checkpoint: str, signature: dict) -> None:
    """Refuse a checkpoint made with another teacher, student or loss (a warning when it records none)."""
    path = os.path.join(checkpoint, KD_CONFIG_NAME)
    if not os.path.isfile(path):
        logger.warning(
            "%s has no %s (written by hf_kd since it records teacher, student and loss): resuming without "
            "checking that they match.", checkpoint, KD_CONFIG_NAME,
        )
        return
    with open(path) as f:
        diffs = signature_differences(json.load(f), signature)
    if diffs:
        raise InputError(
            f"Cannot resume from {checkpoint}: it was made with another set-up ({KD_CONFIG_NAME}):\n  - "
            + "\n  - ".join(diffs)
            + "\nResume with the checkpoint's teacher, student and loss settings, or start a new run (a new "
            "output_dir) that loads the checkpoint's weights as the student."
        )
