"""What every application shares: its console line, the output-dir check, the plain Trainer arguments."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from transformers import TrainingArguments

from ..errors import InputError


def say(message: str) -> None:
    print(f"[hf-kd] {message}", flush=True)


def check_output_dir(output_dir, overwrite: bool, resume=None) -> None:
    """Refuse an output_dir that already holds a run, unless told to overwrite or resume it."""
    out = Path(output_dir)
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
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


def save_or_rescue(trainer, output_dir: str) -> None:
    """`trainer.save_model(output_dir)`; when that fails (a full disk, a folder made read-only during training), the
    trained student is saved into a fresh folder where it can be, and the error says where."""
    try:
        trainer.save_model(output_dir)
        return
    except OSError as err:
        failure = err
    for parent in (tempfile.gettempdir(), os.getcwd(), os.path.expanduser("~")):
        try:
            rescue = tempfile.mkdtemp(prefix="hf-kd-student-", dir=parent)
            trainer.save_model(rescue)
        except OSError:
            continue
        raise InputError(
            f"the trained student could not be saved to {output_dir} ({failure.strerror or failure}); it was saved to "
            f"{rescue} instead. Copy it from there (hf-kd push --model {rescue} publishes it as it is)."
        ) from None
    raise InputError(f"the trained student could not be saved to {output_dir} ({failure}) nor to a temporary folder; "
                     "free some disk space and run again.") from None
