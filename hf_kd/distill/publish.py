"""The student's publication: its final saves with provenance and model card, and its pushes to the Hub.

`Publisher` does what the trainer's Hub overrides (`save_model`, `create_model_card`, `push_to_hub`,
`init_hf_repo`, Trainer's push at each save) delegate to: it evaluates student and teacher for the card, times
them on one evaluation batch, writes the full record (`hf_kd.distill.record`) and renders the card from it
(`hf_kd.distill.card`), merges a PEFT adapter into a copy for a final save, and uploads the student alone
(`hf_kd.hub.push_student`). It works through the trainer it publishes for: the pushes share Trainer's
callbacks, its push in progress and the repository it created. The small rules around it (which strategies
publish the student alone, what a failure says, tags) are functions of values.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers.trainer_utils import HubStrategy
from transformers.utils.hub import PushInProgress

from .. import adapters, hub
from ..tasks import unwrap
from . import card
from .record import length
from .targets import split_inputs

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


class Publisher:
    """The publication of `trainer`'s student (a `DistillationTrainer`): saves, card, provenance, pushes."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.latency = card.Latency()  # measured once per step for the card

    def info(self) -> hub.CardInfo:
        return self.trainer.card_info or hub.CardInfo()

    def write_provenance(self, output_dir: str | None) -> None:
        """After each of Trainer's saves, checkpoints too: what made these weights (main process)."""
        args = self.trainer.args
        if args.should_save:
            hub.write_provenance(output_dir if output_dir is not None else args.output_dir, self.provenance())

    @contextlib.contextmanager
    def student_as_saved(self, final: bool):
        """``merge_adapter_on_save``: during a final save (not a checkpoint), ``trainer.model`` is a copy of the PEFT
        student with its adapter merged, so the folder holds a plain Transformers model; training is unaffected."""
        t = self.trainer
        student = t.accelerator.unwrap_model(t.model)
        if not merges_adapter(final, t.args, student, t.backend):
            yield
            return
        self.evaluate_for_card()  # on the student being trained; the merged copy computes the same function
        model, t.model = t.model, adapters.merged_copy(student)
        try:
            yield
        finally:
            t.model = model

    def save_model(self, output_dir: str | None, internal: bool, save) -> None:
        """`DistillationTrainer.save_model`; `save` is Trainer's own ``save_model``."""
        t = self.trainer
        target = output_dir if output_dir is not None else t.args.output_dir
        # Written aside and renamed at the end: no half-written weights under the final names.
        with t.checkpoints.saving(target) as folder:
            with self.student_as_saved(final=not internal):
                save(folder, _internal_call=True)
                if not internal:
                    self.evaluate_for_card()
                    if t.args.should_save:  # the card names the model after the folder it ends in
                        self.write_card(folder, model_name=self.info().model_name or Path(target).absolute().name)
        if t.args.push_to_hub and not internal:
            t.push_to_hub(commit_message="Model save", revision=t.args.hub_revision)

    def create_model_card(self, output_dir: str | None, tags, dataset, finetuned_from, **overrides) -> None:
        """`DistillationTrainer.create_model_card` (main process only)."""
        t = self.trainer
        if not t.is_world_process_zero():
            return
        dataset = (dataset[0] if dataset else None) if isinstance(dataset, (list, tuple)) else dataset
        self.write_card(output_dir if output_dir is not None else t.args.output_dir,
                        tags=[tags] if isinstance(tags, str) else tags, base_model=finetuned_from, dataset=dataset,
                        **overrides)

    def push_to_hub(self, commit_message: str | None, blocking: bool, token, revision, private, kwargs: dict):
        """`DistillationTrainer.push_to_hub` (``kwargs`` go to ``create_model_card``)."""
        t = self.trainer
        t.callback_handler.on_push_begin(t.args, t.state, t.control)
        repo_id = t.hub_model_id or t.args.hub_model_id or Path(t.args.output_dir).absolute().name
        model_name = kwargs.pop("model_name", None) or repo_id.split("/")[-1]
        kwargs["tags"] = merge_tags(kwargs.get("tags"), getattr(unwrap(t.model), "model_tags", None))
        # Everything is on disk before the Hub is contacted: a failed push loses nothing.
        with self.student_as_saved(final=True):
            t.save_model(_internal_call=True)
            self.evaluate_for_card()
            if not t.is_world_process_zero():
                return None
            t.create_model_card(model_name=model_name, **kwargs)
        t._finish_current_push()
        return hub.push_student(
            t.args.output_dir, repo_id,
            create_repo=t.hub_model_id is None,  # else init_hf_repo made it
            token=token if token is not None else t.args.hub_token,
            private=private if private is not None else t.args.hub_private_repo,
            revision=revision if revision is not None else t.args.hub_revision,
            commit_message=commit_message or "Upload a student distilled with hf_kd", run_as_future=not blocking,
        )

    def init_repo(self, init, token, private) -> None:
        """`DistillationTrainer.init_hf_repo`; `init` is Trainer's own ``init_hf_repo``."""
        args = self.trainer.args
        check_hub_strategy(args.hub_strategy)
        try:
            # `private` only when given: Trainer.init_hf_repo of transformers 5.17 and older takes no such argument
            init(token=token, **({} if private is None else {"private": private}))
        except Exception as err:  # noqa: BLE001 - every Hub failure becomes one clear message
            raise repo_creation_error(err, args.hub_model_id, args.output_dir) from err

    def push_checkpoint(self, checkpoint_folder: str) -> None:
        """Trainer's push at each save (hub_strategy every_save), limited to the student's files."""
        t = self.trainer
        if not t.is_world_process_zero() or t.args.hub_strategy == HubStrategy.END:
            return
        if not t.args.hub_always_push and t.push_in_progress is not None and not t.push_in_progress.is_done():
            return
        t.callback_handler.on_push_begin(t.args, t.state, t.control)
        copy_publishable(checkpoint_folder, t.args.output_dir)
        repo_id = t.hub_model_id or t.args.hub_model_id
        self.write_card(t.args.output_dir, measure=False, model_name=repo_id.split("/")[-1] if repo_id else None)
        job = hub.push_student(t.args.output_dir, repo_id, token=t.args.hub_token, revision=t.args.hub_revision,
                               commit_message=progress_message(t.args, t.state), create_repo=False,
                               run_as_future=True)
        if t.push_in_progress is None or t.push_in_progress.is_done():
            t.push_in_progress = PushInProgress([job])
        else:
            t.push_in_progress.jobs.append(job)

    # ---------------------------------------------------- the record behind provenance and card
    def evaluate_for_card(self) -> None:
        """Evaluate student (at this step) and teacher (once) on eval_dataset, unless already done. All processes."""
        t = self.trainer
        if not self.info().evaluate or t.eval_dataset is None or isinstance(t.eval_dataset, dict):
            return
        student = t.evaluations.records.get("student")
        if student is None or student[0] != t.state.global_step:
            t.evaluate()
        if "teacher" not in t.evaluations.records and t.teacher_set.reads_student_batches is not None:
            t.evaluate_teacher()  # frozen: one evaluation serves all

    def provenance(self, overrides: dict | None = None) -> dict:
        t = self.trainer
        return t.record.provenance(
            wrapped=t.accelerator.unwrap_model(t.model), student=t._student(), info=self.info(),
            overrides=overrides or {}, state=t.state, datasets=(t.train_dataset, t.eval_dataset),
        )

    def latency_batch(self) -> dict | None:
        """One evaluation batch (training rows when there is no eval_dataset), collated and on the device."""
        t = self.trainer
        dataset = t.eval_dataset if not isinstance(t.eval_dataset, dict) else None
        dataset = dataset if dataset is not None else t.train_dataset
        n = min(t.args.eval_batch_size, length(dataset) or 0)
        if n == 0:
            return None
        collate = t._get_collator_with_removed_columns(t.data_collator, "latency")
        batch = t._prepare_inputs(collate([dataset[i] for i in range(n)]))
        batch = t.rollout.model_batch(batch) if t.rollout is not None and t.rollout.applies(batch) else batch
        return {k: v for k, v in split_inputs(t.task, batch, unwrap(t.model)).items() if torch.is_tensor(v)}

    def write_card(self, folder, measure: bool = True, **overrides) -> None:
        """Write the full record to the provenance file and render the model card from it (main process)."""
        t = self.trainer
        timed = None
        # Models split over the processes cannot run a forward pass on the main process alone (the others would
        # never join), so their latency is not measured.
        if measure and self.info().measure_latency and not t.backend.shards_models:
            timed = self.latency.measure(t.state.global_step, self.latency_batch,
                                         {"student": t._student(), "teacher": t.teacher_set.reads_student_batches})
        card.write_card(folder, self.provenance(overrides), t.evaluations.records, t.state.global_step,
                        length(t.eval_dataset), t._student(), t.teacher_set, t.args.device, timed)
