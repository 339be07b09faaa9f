"""What every application shares: its console line, the output-dir check, the plain Trainer arguments."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from transformers import TrainingArguments


def say(message: str) -> None:
    print(f"[hf-kd] {message}", flush=True)


def check_output_dir(output_dir, overwrite: bool, resume=None) -> None:
    """Refuse an output_dir that already holds a run, unless told to overwrite or resume it."""
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise SystemExit(
            f"hf-kd: output_dir {out} already holds a run. Pick a new output_dir, pass --overwrite_output_dir true "
            "to replace it, or --resume_from_checkpoint to continue it."
        )


def plain_args(config, output_dir: str, **changes) -> TrainingArguments:
    """The run's TrainingArguments (no distillation fields) for the teacher fine-tune and the baseline."""
    names = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    values = {n: getattr(config, n) for n in names}
    values.update(output_dir=output_dir, **changes)
    return TrainingArguments(**values)
