"""Small rules of the trainer's Hub path: which strategies publish the student alone, what a failure says, tags."""

from __future__ import annotations

import logging
import os
import shutil

from transformers.trainer_utils import HubStrategy

from .. import adapters, hub

logger = logging.getLogger(__name__)


def check_hub_strategy(strategy) -> None:
    """hf_kd publishes the student alone: strategies that upload whole checkpoints are refused."""
    if strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
        raise hub.PushError(
            f"hub_strategy={strategy.value!r} uploads whole checkpoints (optimizer state and "
            "training arguments as pickles, projection heads); hf_kd publishes the student alone. Use "
            "hub_strategy='every_save' or 'end', and resume from the local checkpoints."
        )


def repo_creation_error(err: Exception, hub_model_id: str | None, output_dir: str) -> hub.PushError:
    """The message for a Hub repository that could not be created before training."""
    reason, hint = hub.failure_reason(err)
    repo = hub_model_id or "NAME"
    return hub.PushError(
        f"push_to_hub is set, but the Hub repository {repo} could not be created: {reason}\n  {hint}\n"
        "  Training has not started. Train with push_to_hub=False (the student is saved in "
        f"{output_dir}) and publish it later with: hf-kd push --model {output_dir} --repo_id {repo}"
    )


def merge_tags(tags, model_tags):
    """The card's tags: the caller's, then the model's own (PEFT adds some) not already there."""
    if not model_tags:
        return tags
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    return tags + [t for t in model_tags if t not in tags]


def copy_publishable(checkpoint_folder: str, output_dir: str) -> None:
    """The student's files of a checkpoint (`hub.publishable_files`) copied into the folder that is pushed."""
    for name in hub.publishable_files(checkpoint_folder):
        shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(output_dir, name))


def progress_message(args, state) -> str:
    """The commit message of a push made at a save during training."""
    if args.save_strategy == "steps":
        return f"Training in progress, step {state.global_step}"
    return f"Training in progress, epoch {int(state.epoch or 0)}"


def merges_adapter(final: bool, args, student, backend) -> bool:
    """Whether this save writes the PEFT student with its adapter merged (``merge_adapter_on_save``, final saves
    only; not where the backend shards the models, which gets a warning and the adapter saved)."""
    if not (final and args.merge_adapter_on_save and adapters.is_peft_model(student)):
        return False
    if backend.shards_models:
        logger.warning("merge_adapter_on_save is not supported under %s: the adapter is saved.", backend.name)
        return False
    return True
