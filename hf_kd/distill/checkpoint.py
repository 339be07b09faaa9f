"""What a checkpoint records beside Trainer's files, how it is written, and which one a resume takes.

``kd_config.json`` holds the run's signature (teacher weights, student architecture, loss: see
`hf_kd.distill.record.RunRecord.signature`); a resume compares it with the signature of the run being started
and refuses a checkpoint made with another set-up, before any weight is loaded.

A checkpoint is written whole into a partial folder (Trainer's files, the projections, ``kd_config.json``, the
provenance), flushed, renamed to ``checkpoint-N``, and only then are older ones rotated (`Checkpoints.writing`);
a final `save_model` folder likewise (`Checkpoints.saving`, see `hf_kd.distill.atomic`). A resume with
``True`` or ``"auto"`` takes the newest checkpoint that holds every file a resume reads (`missing_files`),
skipping others with a warning; ``"auto"`` starts afresh when there is none (`Checkpoints.resume_point`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

from ..errors import InputError, NonFiniteLossError
from . import atomic
from .projections import PROJECTIONS_NAME

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


# ---------------------------------------------------------------------------------------- complete checkpoints
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")  # the names Transformers resumes from


def missing_files(folder: str, projections: bool, resume_state: bool = True) -> list[str]:
    """What `folder` lacks of the files a resume reads (empty: complete).

    Trainer's state, the weights (every shard its index names), with ``resume_state`` (not ``save_only_model``) the
    optimizer, scheduler and RNG states (Trainer would resume without them, silently, from a fresh optimizer),
    ``kd_config.json`` and, when the run has `projections`, ``kd_projections.safetensors``."""
    names = set(os.listdir(folder))
    missing = [] if TRAINER_STATE_NAME in names else [TRAINER_STATE_NAME]
    sharded = any(n.startswith(("pytorch_model_fsdp", "global_step")) for n in names)  # FSDP, DeepSpeed
    adapters = [n for n in names if os.path.isdir(os.path.join(folder, n)) and any(
        atomic.WEIGHT_FILE.match(m) for m in os.listdir(os.path.join(folder, n)))]  # several PEFT adapters
    weights = [n for n in names if atomic.WEIGHT_FILE.match(n)]
    if not (weights or sharded or adapters):
        missing.append("the model weights (model.safetensors or another weights file)")
    for index in (n for n in weights if n.endswith(".index.json")):
        shards = _read_json(os.path.join(folder, index))
        shards = sorted(set(shards.get("weight_map", {}).values()) - names) if shards is not None else [None]
        missing += [f"{shard} (named by {index})" if shard else f"{index} (unreadable)" for shard in shards]
    if resume_state:
        if not any(n.startswith(("optimizer", "global_step")) for n in names):
            missing.append(OPTIMIZER_NAME)
        if SCHEDULER_NAME not in names and not any(n.startswith("global_step") for n in names):
            missing.append(SCHEDULER_NAME)
        if not any(n.startswith("rng_state") for n in names):
            missing.append("rng_state.pth")
    missing += [n for n in (KD_CONFIG_NAME, PROJECTIONS_NAME if projections else None) if n and n not in names]
    if KD_CONFIG_NAME in names and _read_json(os.path.join(folder, KD_CONFIG_NAME)) is None:
        missing.append(f"{KD_CONFIG_NAME} (unreadable)")
    return missing


def _read_json(path: str) -> dict | None:
    """The JSON object in `path`; None when it does not parse (cut short by a kill)."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def newest_complete(output_dir: str, projections: bool, resume_state: bool = True) -> str | None:
    """The newest ``checkpoint-N`` of `output_dir` that lacks nothing; each newer one is skipped with a warning
    naming what it lacks."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(((int(m.group(1)), name) for name in os.listdir(output_dir)
                    if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))), reverse=True)
    for _, name in steps:
        folder = os.path.join(output_dir, name)
        missing = missing_files(folder, projections, resume_state)
        if not missing:
            return folder
        logger.warning(
            "%s is incomplete (a save was interrupted, or another tool or an older version wrote it): it lacks %s. "
            "Skipped; the resume takes an earlier checkpoint.", folder, ", ".join(missing),
        )
    return None


def rotate(run_dir: str, limit: int | None, best: str | None) -> None:
    """Trainer's rotation (keep the `limit` newest checkpoints, always the newest and the best), each deleted one
    first renamed to a partial name, so that none is left half-deleted under its name."""
    if not limit or limit <= 0:
        return
    ordered = sort_checkpoints(run_dir, use_mtime=True)  # oldest first (by step where mtimes are not reliable)
    protected = {ordered[-1], str(Path(best)) if best else None} & set(ordered) if ordered else set()
    doomed = [c for c in ordered if c not in protected][: max(0, len(ordered) - max(limit, len(protected)))]
    for checkpoint in doomed:
        partial = atomic.partial_path(checkpoint)
        atomic.remove(partial)
        os.rename(checkpoint, partial)
        atomic.remove(partial)


class Checkpoints:
    """The trainer's saves and resumes under one or several processes.

    Every process writes its part of a save into the same partial folder; after a barrier one process (Trainer's
    ``should_save``) renames it, then all go on: every process sees a checkpoint under its name only when it is
    complete. Which checkpoint a resume takes is decided by the first process and shared with the others.
    """

    def __init__(self, args, projections: bool, barrier: Callable[[], None]):
        self.args, self.projections, self.barrier = args, projections, barrier
        #: While a checkpoint is written: the partial folder Trainer takes for its run folder.
        self.partial_run_dir: str | None = None

    @contextlib.contextmanager
    def writing(self, run_dir: str, state) -> Iterator[str]:
        """Write ``checkpoint-<state.global_step>`` of `run_dir`: yields the partial checkpoint folder, while
        `partial_run_dir` holds the run folder to give Trainer; on exit, renames it, then rotates older ones.
        An exception leaves the partial folder for the next start to remove, as a kill would."""
        name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        final, partial_run = os.path.join(run_dir, name), atomic.partial_path(os.path.join(run_dir, name))
        folder = os.path.join(partial_run, name)
        if self.args.should_save:
            atomic.remove(partial_run)  # left by a killed save of this step
        self.barrier()
        self.partial_run_dir = partial_run
        try:
            yield folder
        finally:
            self.partial_run_dir = None
        if state.best_model_checkpoint == folder:  # Trainer found the best checkpoint in the partial folder
            state.best_model_checkpoint = final
            if self.args.should_save and os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME)):
                state.save_to_json(os.path.join(folder, TRAINER_STATE_NAME))
        self.barrier()  # every process has written its part
        if self.args.should_save:
            atomic.publish_folder(folder, final)
            os.rmdir(partial_run)
            rotate(run_dir, self.args.save_total_limit, state.best_model_checkpoint)  # only now may older ones go
        self.barrier()

    @contextlib.contextmanager
    def saving(self, output_dir: str) -> Iterator[str]:
        """A `save_model` into `output_dir`: yields the folder to write. Inside a checkpoint, `output_dir` itself
        (the checkpoint is renamed as a whole); else a partial folder, renamed to `output_dir` when that is new,
        else moved into it a file at a time."""
        if self.partial_run_dir is not None:
            yield output_dir
            return
        fresh = not os.path.isdir(output_dir)
        partial = atomic.partial_path(output_dir) if fresh else os.path.join(output_dir, atomic.PARTIAL + "save")
        if self.args.should_save:
            atomic.remove(partial)
        self.barrier()
        yield partial
        self.barrier()
        if self.args.should_save and os.path.isdir(partial):
            (atomic.publish_folder if fresh else atomic.publish_entries)(partial, output_dir)
        self.barrier()

    def resume_point(self, value, output_dir: str, signature: Callable[[], dict]) -> str | None:
        """The checkpoint ``train(resume_from_checkpoint=value)`` resumes from, checked; None to start afresh.

        ``True``: the newest complete checkpoint of `output_dir` (an error when there is none); ``"auto"``: the
        same, or None when there is none (one command for a job restarted after each pre-emption); a path: that
        checkpoint, refused when incomplete. A checkpoint of another set-up is refused (`check_resume`). First
        removes what a killed save left in `output_dir`."""
        if self.args.should_save:
            atomic.remove_partial(output_dir)
        self.barrier()
        chosen, error = None, None
        # On every process: the teacher's digest may gather weights that are partitioned over the processes.
        now = signature() if value is not None and value is not False else None
        if self.args.process_index == 0:
            try:
                chosen = self._choose(value, output_dir, now)
            except InputError as err:  # raised on every process below, or the others would wait
                error = str(err)
        chosen, error = broadcast_object_list([chosen, error])
        if error is not None:
            raise InputError(error)
        return chosen

    def _choose(self, value, output_dir: str, signature: dict | None) -> str | None:
        resume_state = not self.args.save_only_model
        word = value.strip().lower() if isinstance(value, str) and not os.path.isdir(value) else None  # the CLI's
        auto = word == "auto"
        if value is None or value is False:
            return None
        if value is True or word == "true" or auto:
            chosen = newest_complete(output_dir, self.projections, resume_state)
            if chosen is None and auto:
                logger.info("resume_from_checkpoint=auto: %s holds no complete checkpoint; starting afresh.", output_dir)
                return None
            if chosen is None:
                raise InputError(
                    f"resume_from_checkpoint=True, but {output_dir} holds no complete checkpoint. Pass "
                    "resume_from_checkpoint='auto' to start afresh when there is none, or the path of a checkpoint."
                )
        else:
            chosen = str(value)
            if not os.path.isdir(chosen):
                raise InputError(f"Cannot resume from {chosen}: no such folder.")
        missing = missing_files(chosen, self.projections, resume_state)
        if missing == [KD_CONFIG_NAME] or not any(m.startswith(KD_CONFIG_NAME) for m in missing):
            check_resume(chosen, signature)  # another set-up: refused, whatever else it lacks; none recorded: warned
        if missing and missing != [KD_CONFIG_NAME]:  # kd_config.json alone: a plain Trainer checkpoint, resumed
            raise InputError(
                f"Cannot resume from {chosen}: it is incomplete (a save was interrupted, or another tool or an older "
                f"version wrote it): it lacks {', '.join(missing)}. Resume from an earlier checkpoint, or pass "
                "resume_from_checkpoint='auto' to take the newest complete one."
            )
        return chosen
