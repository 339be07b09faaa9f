"""`DistillationTrainer`: a `transformers.Trainer` whose loss distils a frozen teacher into the model.

The trainer is wiring. Each concern is a collaborator of `hf_kd.distill`, built from the config and the
models: the start-up checks (`checks`), the loss plan of terms and layer pairs (`plan`), the teachers
(`teacher_set`), the width projections (`projections`), the chunked route through the output layers
(`head_route`), the objective that turns outputs into weighted terms (`objective`, over the pure losses of
`hf_kd.losses`), the run record behind checkpoints and provenance (`record`, `checkpoint`), the model card's
evaluations and measurements (`card`), the saves, card and pushes of the student (`publish`), the students of
``model_init`` and the trial's plan for ``hyperparameter_search`` (`search_support`) and the generation metrics
(`generation_eval`).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import Trainer

from . import distributed, hub, prompts, relations, teacher_cache
from .config import DistillationConfig
from .distill import card, checks, generation_eval, nonfinite, publish, rollout, search_support
from .distill.checkpoint import Checkpoints, check_finite_weights, write_signature
from .distill.head_route import HeadRoute, logit_chunk_size
from .distill.objective import Meter, Objective
from .distill.projections import build_projections, load_projections, save_projections
from .distill.record import RunRecord
from .distill.targets import logit_targets, split_inputs, takes_use_cache, window_counts
from .errors import InputError
from .tasks import detect_task, token_mask, unwrap

__all__ = ["DistillationTrainer"]


class DistillationTrainer(Trainer):
    """`transformers.Trainer` that trains `model` (the student) to match `teacher_model`.

    Args:
        model: the student, a transformers model with a task head (or a PEFT model around one; with
            ``args.peft_config`` the trainer wraps it, see `hf_kd.adapters`).
        teacher_model: a `PreTrainedModel` (or a PEFT model), or a name/path loaded with the Auto class of the
            student's task (a folder holding an adapter loads as base + adapter, merged); or a list of these:
            several teachers, weighted by ``args.teacher_weights`` (see `hf_kd.teachers`).
        args: a `DistillationConfig`.
        teacher_tokenizer: the teacher's tokenizer, compared with ``processing_class`` (default: the one saved in
            the teacher's folder, when the teacher is named by a folder).
        **kwargs: everything `transformers.Trainer` takes (datasets, collator, processing_class, callbacks...).

    The teacher is frozen, kept in eval mode, runs without autograd on the student's device, is never
    given to the optimizer and never saved. Each loss component, unweighted, is logged with `loss`.
    Public collaborators: ``plan`` (terms and layer pairs), ``teacher_set``, ``projections``, ``head_route``,
    ``loss_objective``, ``meter`` (the components summed since the last log), ``record`` (the run record),
    ``evaluations`` (the card's), ``publisher`` (saves, card, pushes), ``students`` (``model_init``'s).
    """

    #: What the trainer cannot know about the run (command, dataset, split, student initialisation...),
    #: for the model card and the provenance record: set ``trainer.card_info = hf_kd.CardInfo(...)``.
    card_info: hub.CardInfo | None = None

    def __init__(self, model=None, teacher_model=None, args: DistillationConfig | None = None, teacher_tokenizer=None,
                 **kwargs):
        checks.check_arguments(model, teacher_model, args, kwargs)
        model_init = kwargs.pop("model_init", None)
        self.students = search_support.Students(model_init)  # with model_init, the checks run on its first student
        model = model if model_init is None else self.students.first
        if args.world_size > 1:  # reading it formed the process group: end it at exit (else gloo may abort then)
            distributed.end_process_group_at_exit()
        checks.check_launch(args.world_size)  # everything is checked before Trainer.__init__ creates output_dir
        sources = list(teacher_model) if isinstance(teacher_model, (list, tuple)) else [teacher_model]
        failure = None
        try:
            self.task = detect_task(model)
            model = checks.prepare_student(model, args, self.task)
            self.teacher_set, self.plan = checks.start(unwrap(model), sources, args, self.task, teacher_tokenizer,
                                                      kwargs.get("train_dataset"), kwargs.get("processing_class"))
            # prompt-completion data and generated completions (docs/generation.md); may default the collator
            self.rollout = rollout.prepare(kwargs, args, self.task, unwrap(model), unwrap(self.teacher_set.first),
                                           self.teacher_set.vocab.cross)
        except Exception as err:  # noqa: BLE001 - re-raised below, on every process
            failure = err
        checks.fail_together(failure, args.world_size)
        self._build_run(unwrap(model), args)
        self.publisher = publish.Publisher(self)  # the student's saves, card and pushes
        self.checkpoints = Checkpoints(args, len(self.projections) > 0, lambda: self.accelerator.wait_for_everyone())
        self.students.first = model if model_init is not None else None  # prepared: Trainer's first call_model_init

        super().__init__(model=None if model_init is not None else model, model_init=model_init, args=args, **kwargs)

        # Our losses are sums divided by counts over the whole accumulation window (and all
        # processes), so Trainer must not divide them again by the accumulation steps.
        self.loss_is_scaled_for_ga = True
        if self.teacher is None:
            self.data_collator = teacher_cache.CacheCollator(self.data_collator)
        else:
            dtype = self.teacher_set.dtype(self.args, self.backend, self.accelerator, unwrap(model))
            self.teacher_set.place(self.backend, self.accelerator, self.args, dtype)
        self._build_loss(unwrap(model))

    def _build_run(self, student, args: DistillationConfig) -> None:
        """What follows the student and the settings: the width projections (seeded: fresh), the record, the meter."""
        self.projections = build_projections(student, self.teacher_set.hidden_size(), self.plan.n_hidden_pairs, args.seed)
        self.record = RunRecord(args, self.task, self.plan, self.teacher_set, len(self.projections))
        self.meter, self.skipped_steps = Meter(), []  # skipped: (step, components) dropped by nonfinite_loss="skip"
        self._window_counts: dict[str, torch.Tensor] | None = None
        self._projections_in_optimizer = False
        self.evaluations = card.Evaluations()  # student's and teacher's, for the card
        self._teacher_completions = generation_eval.TeacherCompletions()  # eval_generation's, made once
        self._use_cache_arg: bool | None = None

    def _build_loss(self, student) -> None:
        """The loss objective and the route through the output layers, on the device (after Trainer's set-up)."""
        self.projections.to(self.args.device)
        # Not `self.objective`: Trainer's hyperparameter search keeps its metric under that name.
        self.loss_objective = Objective(self.args, self.task, self.plan, self.projections, cached=self.teacher is None)
        runner = self.teacher_set.runners[0] if self.teacher_set.runners else None
        self.head_route = HeadRoute(self.args, self.task, self.teacher, runner, len(self.teachers),
                                    logit_chunk_size(self.args, self.task, student.config, self.args.device))

    # ------------------------------------------------------------------ model_init and hyperparameter_search
    def call_model_init(self, trial=None):
        """A fresh student from ``model_init`` (prepared as ``model`` would be); the first call returns the student
        the start-up checks ran on."""
        return self.students.next(super().call_model_init, trial, self.args, self.task)

    def _hp_search_setup(self, trial) -> None:
        """After Trainer sets a trial's settings on ``args``: with ``model_init``, ``train`` made a new student, so the
        loss plan, fresh projections, the record and the objective are built again for it and for these settings."""
        super()._hp_search_setup(trial)
        if self.model_init is not None:
            student = self._student()
            self.plan = search_support.trial_plan(student, self.teacher, self.args, self.task)
            self._build_run(student, self.args)
            self._build_loss(student)

    def hyperparameter_search(self, hp_space=None, compute_objective=None, n_trials: int = 20, direction="minimize",
                              backend=None, hp_name=None, **kwargs):
        """Trainer's search, by default over the distillation settings (`hf_kd.search.distillation_hp_space`:
        temperature, alpha and the weights of the terms in use) rather than Trainer's learning rate and epochs.
        Needs ``model_init`` (a fresh student per trial) and optuna (``pip install hf_kd[search]``)."""
        return super().hyperparameter_search(search_support.search_space(hp_space, self.args), compute_objective,
                                             n_trials, direction, backend, hp_name, **kwargs)

    @property
    def teacher(self):
        """The first teacher (None with a teacher cache): layer pairs, evaluation and the card use it."""
        return self.teacher_set.first

    @property
    def teachers(self) -> list:
        return self.teacher_set.models

    # ------------------------------------------------------------------ Trainer's set-up, optimizer, checkpoints
    def create_accelerator_and_postprocess(self) -> None:
        """Trainer's accelerator, then the backend checks (still before anything is written to output_dir)."""
        super().create_accelerator_and_postprocess()
        self.backend = distributed.backend_of(self.accelerator)
        problems = distributed.backend_problems(self.backend, self.accelerator, self.args, len(self.projections))
        problems += rollout.backend_problems(self.backend, self.args)
        if problems:  # the launcher's configuration, the same on every process: every process refuses
            raise InputError(f"Cannot distil under {self.backend.name}:\n  - " + "\n  - ".join(problems))

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.teacher_set.cache_meta is not None:  # remove_unused_columns must keep the cached teacher columns
            columns = teacher_cache.cache_columns(self.teacher_set.cache_meta)
            self._signature_columns += [c for c in columns if c not in self._signature_columns]
        if self.rollout is not None:  # the prompt-completion columns, tokenized by the collator
            self._signature_columns += [c for c in prompts.COLUMNS if c not in self._signature_columns]

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if len(self.projections) and not self._projections_in_optimizer:
            optimizer.add_param_group({"params": list(self.projections.parameters()), "weight_decay": self.args.weight_decay})
            self._projections_in_optimizer = True
        return optimizer

    def _student(self, model=None):
        """The transformers model of the student, out of accelerate's and PEFT's wrappers."""
        return unwrap(self.accelerator.unwrap_model(self.model if model is None else model))

    def checkpoint_signature(self) -> dict:
        """What a checkpoint of this run records and must be resumed with (see `hf_kd.distill.record`)."""
        return self.record.signature(self._student())

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Trainer's ``train``. ``resume_from_checkpoint``: ``True`` takes the newest *complete* checkpoint of
        ``output_dir`` (incomplete ones are skipped with a warning), ``"auto"`` the same or a fresh start when there is
        none, a path that checkpoint; one of another set-up is refused (see `hf_kd.distill.checkpoint`)."""
        resume = self.checkpoints.resume_point(resume_from_checkpoint, self.args.output_dir, self.checkpoint_signature)
        return super().train(resume, trial, ignore_keys_for_eval, **kwargs)

    def _get_output_dir(self, trial) -> str:
        """While a checkpoint is written, Trainer writes it into a partial folder (renamed when complete)."""
        return self.checkpoints.partial_run_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        named = [*self._student(model).named_parameters(),
                 *(("projections." + n, p) for n, p in self.projections.named_parameters())]
        check_finite_weights(named, self.state.global_step)
        with self.checkpoints.writing(self._get_output_dir(trial=trial), self.state) as folder:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                save_projections(self.projections, folder)
                write_signature(folder, self.checkpoint_signature())

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # checked by `train` before any weight is loaded
        load_projections(self.projections, resume_from_checkpoint, self.args.device)

    def _clip_grad_norm(self, model):
        """Clip the student's and the projections' gradients together (Trainer sees the student alone).

        Projections exist only in one process or under DDP (GPUs or CPU processes); FSDP and DeepSpeed refuse them.
        """
        if not len(self.projections) or self.backend.kind not in (distributed.SINGLE, distributed.DDP):
            return super()._clip_grad_norm(model)
        params = [*model.parameters(), *self.projections.parameters()]
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # After the window's last backward pass (when DDP reduces the student's gradients), average the
        # projections' gradients too: they are outside the wrapped student, and each process's differ.
        if len(self.projections) and self.accelerator.sync_gradients:
            distributed.average_gradients(self.projections.parameters(), self.accelerator)
        return loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # Called once per optimizer step, before its micro-batches. Trainer zeroes the student's gradients
        # (model.zero_grad()) but not the projections', which would otherwise add up over all past steps.
        self.projections.zero_grad(set_to_none=True)
        self.meter.steps += 1
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples and self.rollout is not None and self.rollout.applies(batch_samples[0]):
            # the window's completions (generated once for all its prompts, or the dataset's), then their count
            batch_samples = self.rollout.window(batch_samples, self._student(), unwrap(self.teacher),
                                                self.state.global_step, self.state.max_steps or 1)
            num_items_in_batch = self._get_num_items_in_batch(batch_samples, device)
        if batch_samples:  # the normalisers of the whole window, over every process
            self._window_counts = window_counts(self.task, batch_samples, self.args.device,
                                                self.accelerator.reduce if self.args.world_size > 1 else None)
        return batch_samples, num_items_in_batch

    # ------------------------------------------------------------------ the loss
    def _scheduled(self, name: str, step: int | None = None) -> float:
        """`temperature` or `alpha` at optimizer step `step` (default: the step being computed), per its schedule.
        Outside a training loop (no max_steps yet) this is the start value."""
        step = self.state.global_step if step is None else step
        return self.args.scheduled(name, step, self.state.max_steps or 1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation reports the student's own task loss; the teacher is not run
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.teacher_set.keep_eval()
        counts = self._window_counts  # None outside Trainer's loop: normalise over this batch alone
        counts = counts if counts is not None else window_counts(self.task, [inputs], self.args.device)
        s_out, t_out, heads, captures = self._forward(model, inputs)
        targets = logit_targets(self.task, inputs, s_out, t_out, self.teacher_set.vocab.classes)
        temperature, alpha = self._scheduled("temperature"), self._scheduled("alpha")
        head_terms = (self.head_route.terms(heads, inputs, targets, counts, temperature, alpha) if heads  # or aligned:
                      else self.teacher_set.vocab.terms(inputs, targets, counts, temperature, alpha))
        total, components = self.loss_objective(inputs, targets, s_out, t_out, counts, temperature=temperature,
                                                alpha=alpha, chunk=self.head_route.chunk, head_terms=head_terms,
                                                captures=captures)
        step = self.state.global_step + 1
        if not nonfinite.check(total, components, (s_out, t_out), step, self.args, self.accelerator, self.skipped_steps):
            zero = nonfinite.zero_loss(model, self.args.device)  # nonfinite_loss="skip": this batch adds nothing
            return (zero, s_out) if return_outputs else zero
        self.meter.add(components)
        # Counts are summed over every process; DDP averages gradients, so the sum is restored here.
        total = total * self.args.world_size
        return (total, s_out) if return_outputs else total

    def _forward(self, model, inputs):
        """Student and teacher outputs of one batch, the verified head taps, and MiniLM's q/k/v captures."""
        plan, args = self.plan, self.args
        model_inputs = split_inputs(self.task, inputs, unwrap(self.model))
        if self._use_cache_arg is None:
            self._use_cache_arg = takes_use_cache([self._student(model), *(unwrap(t) for t in self.teachers)])
        extra = {"use_cache": False} if self._use_cache_arg else {}
        if plan.hidden or args.uses_relations:
            extra["output_hidden_states"] = True
        if plan.attention_maps:
            extra["output_attentions"] = True
        # MiniLM relations read q/k/v through forward hooks that live for one forward pass each; the head taps
        # (hf_kd.chunked) keep what enters the output layers when the logit losses start from there.
        s_tap, t_tap = self.head_route.taps(self._student(model), self.backend)
        captures = tuple(relations.QKVCapture(plan.minilm_modules[w]) for w in ("student", "teacher")) if plan.minilm else None
        s_cap, t_cap = captures or (contextlib.nullcontext(), contextlib.nullcontext())
        with s_cap, self.head_route.student_forward(s_tap, self._student(model), self.teacher_set.vocab.classes):
            s_out = model(**model_inputs, **extra)
        t_out = None
        if self.teacher is not None and plan.needs_teacher():  # the first teacher's q/k/v (several refuse MiniLM)
            class_mask = token_mask(inputs) if self.task == "question_answering" else None
            with t_cap, t_tap or contextlib.nullcontext():
                t_out = self.teacher_set.forward(model_inputs, extra, self.accelerator.autocast(), kind=args.kd_loss,
                                                 temperature=self._scheduled("temperature"), class_mask=class_mask,
                                                 labels=inputs.get("labels"))
        return s_out, t_out, self.head_route.verified(s_tap, t_tap, s_out, t_out), captures

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: Trainer logs it on every process at the same step
            # Each process holds its items' share of the whole batch's mean (the normalisers count every process's
            # items), so the sum over processes is the number one process with the whole batch logs.
            totals = distributed.sum_over_processes(self.meter.vector(self.args.device), self.accelerator).tolist()
            logs.update(self.meter.means(totals))
            for name in ("temperature", "alpha", "lmbda"):  # a schedule: the value the window's last optimizer step used
                if getattr(self.args, f"{name}_schedule") != "constant":
                    logs[name] = self._scheduled(name, self.state.global_step - 1)
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation, and publishing (distill.publish)
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        generation = self.args.eval_generation and not self.evaluations.teacher
        with generation_eval.metrics_on_texts(self, generation):  # compute_metrics receives the generated texts
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if generation:
            metrics.update(self.evaluate_generation(eval_dataset, metric_key_prefix))
        if eval_dataset is None and self.eval_dataset is not None and not isinstance(self.eval_dataset, dict):
            self.evaluations.record(self.state.global_step, metric_key_prefix, metrics)  # the model card's
        return metrics

    def recorded_evaluation(self, role: str = "student") -> tuple[int, str, dict] | None:
        """The last evaluation of `role` ("student" or "teacher") on the trainer's eval_dataset, as
        ``(global_step, metric_key_prefix, metrics)``, or None."""
        return self.evaluations.records.get(role)

    def evaluate_teacher(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "teacher_eval"):
        """The teacher's metrics through the student's evaluation loop: same data, collator, batches, `compute_metrics`;
        `evaluate`'s dict with keys ``teacher_eval_*``, logged like the student's."""
        with self.evaluations.of_teacher(self.teacher_set.reads_student_batches, self.args):
            return self.evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def evaluate_generation(self, eval_dataset=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The generation metrics of `hf_kd.distill.generation_eval` on the evaluation prompts, logged."""
        metrics = generation_eval.prefixed_metrics(
            self.rollout, self.task, self._student(), unwrap(self.teacher), self.get_eval_dataloader(eval_dataset),
            self.processing_class, self.accelerator if self.args.world_size > 1 else None, self.compute_metrics,
            metric_key_prefix, self._teacher_completions)
        self.log(metrics)
        return metrics

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self.rollout is not None and self.rollout.applies(inputs):  # the dataset's completions, or no loss
            if "completion_input_ids" not in inputs:
                return None, None, None
            inputs = self.rollout.dataset_batch(inputs)
        if self.evaluations.teacher:
            model = self.teacher_set.runners[0]
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        self.publisher.write_provenance(output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the student (config, safetensors, tokenizer) with its provenance, and, when called by the user
        (not for a checkpoint), its model card.

        For the card, the student and the teacher are evaluated on ``eval_dataset`` unless that was done
        at this step already, and both are timed on one evaluation batch (see `hf_kd.hub.CardInfo`).
        With ``push_to_hub`` the folder is then pushed, as Trainer does. Call it on every process, as Trainer
        asks (evaluation is collective); only the main process writes.
        """
        self.publisher.save_model(output_dir, _internal_call, super().save_model)

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, output_dir: str | None = None):
        """Write hf_kd's model card (README.md) and provenance into ``output_dir`` (default ``args.output_dir``).

        Trainer's arguments override `card_info` (``finetuned_from`` is the ``base_model``); ``tasks``,
        ``dataset_tags`` and ``dataset_args`` are not used: the task comes from the model. Uses the
        evaluations already run (see `save_model`), so it may be called on the main process alone.
        """
        self.publisher.create_model_card(output_dir, tags, dataset, finetuned_from, language=language,
                                         license=license, model_name=model_name)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, token=None,
                    revision=None, private=None, **kwargs):
        """Publish the student alone to ``args.hub_model_id``: save it with its provenance and card first, then
        upload `hf_kd.hub.publishable_files` (no pickles, no projection heads, no checkpoints) in one commit.

        When the Hub cannot be reached this raises `hf_kd.hub.PushError`; the saved folder stays complete
        and ``hf-kd push --model OUTPUT_DIR --repo_id NAME`` publishes it later. ``kwargs`` go to
        `create_model_card`.
        """
        return self.publisher.push_to_hub(commit_message, blocking, token, revision, private, kwargs)

    def init_hf_repo(self, token=None, private=None) -> None:
        self.publisher.init_repo(super().init_hf_repo, token, private)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        self.publisher.push_checkpoint(checkpoint_folder)
