"""`DistillationTrainer`: a `transformers.Trainer` whose loss distils a frozen teacher into the model.

The trainer gathers outputs, picks layer pairs and weighs the terms; the losses themselves are the
pure functions of `hf_kd.losses`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import DistillationConfig
from .layer_map import resolve_layer_map
from .losses import attention_loss, cross_entropy_loss, hidden_state_loss, logit_distillation_loss
from .tasks import TOKEN_TASKS, auto_class, detect_task, unwrap

PROJECTIONS_NAME = "kd_projections.safetensors"
COMPONENTS = ("kd_loss", "ce_loss", "hidden_loss", "attention_loss")
# Keys of a batch that are targets, not model inputs.
TARGET_KEYS = ("labels", "start_positions", "end_positions")


def _depth(config) -> int:
    return config.get_text_config().num_hidden_layers


def _width(config) -> int:
    return config.get_text_config().hidden_size


def _num_heads(config) -> int:
    return config.get_text_config().num_attention_heads


def load_teacher(teacher_model, task: str) -> PreTrainedModel:
    """A teacher given as a model is used as is; a name or path is loaded with the student's Auto class."""
    if isinstance(teacher_model, nn.Module):
        return teacher_model
    if not isinstance(teacher_model, (str, os.PathLike)):
        raise TypeError(
            f"teacher_model must be a PreTrainedModel or a name/path, not {type(teacher_model).__name__}."
        )
    from .offline import resolve_model

    path = resolve_model(str(teacher_model))
    cls = auto_class(task)
    try:
        teacher, info = cls.from_pretrained(path, output_loading_info=True)
    except OSError as err:
        raise ValueError(
            f"Could not load the teacher {teacher_model!r} with {cls.__name__}: {err}\n"
            "Pass a local folder saved with save_pretrained, or a Hub id while online."
        ) from err
    missing = info.get("missing_keys", [])
    if missing:
        raise ValueError(
            f"The teacher {teacher_model!r} has no trained weights for {len(missing)} parameters of "
            f"{cls.__name__} (e.g. {sorted(missing)[:3]}): it is not a {task.replace('_', ' ')} model, so its "
            "logits would be random. Fine-tune the teacher for the task first, or give a checkpoint that has "
            "the task head."
        )
    return teacher


@dataclass
class _Targets:
    """What the logit losses compare, for one batch."""

    student: list[torch.Tensor]  # logits, one tensor per head (two for QA: start and end)
    teacher: list[torch.Tensor | None]
    labels: list[torch.Tensor | None]
    mask: torch.Tensor | None  # leading shape of the logits; None = every row valid
    class_mask: torch.Tensor | None  # QA: the positions that exist


class DistillationTrainer(Trainer):
    """`transformers.Trainer` that trains `model` (the student) to match `teacher_model`.

    Args:
        model: the student, a transformers model with a task head (or a PEFT model around one).
        teacher_model: a `PreTrainedModel`, or a name/path loaded with the Auto class of the student's task.
        args: a `DistillationConfig`.
        **kwargs: everything `transformers.Trainer` takes (datasets, collator, processing_class, callbacks...).

    The teacher is frozen, kept in eval mode, runs without autograd on the student's device, is never
    given to the optimizer and never saved. Each loss component, unweighted, is logged with `loss`.
    """

    def __init__(self, model=None, teacher_model=None, args: DistillationConfig | None = None, **kwargs):
        if not isinstance(args, DistillationConfig):
            raise TypeError(
                "DistillationTrainer needs args=DistillationConfig(...) (a TrainingArguments subclass with the "
                f"distillation settings), got {type(args).__name__}."
            )
        if model is None or teacher_model is None:
            raise ValueError("DistillationTrainer needs both model (the student) and teacher_model.")
        if kwargs.get("model_init") is not None:
            raise ValueError("model_init is not supported by DistillationTrainer: pass the student as model.")
        # Everything is checked before Trainer.__init__, which creates output_dir.
        self.task = detect_task(model)
        teacher = load_teacher(teacher_model, self.task)
        self._check_pair(unwrap(model), unwrap(teacher), args)
        teacher.eval()
        teacher.requires_grad_(False)
        self.teacher = teacher
        self.projections = self._build_projections(unwrap(model), teacher, args)
        self._window_counts: dict[str, torch.Tensor] | None = None
        self._component_sums: dict[str, torch.Tensor] = {}
        self._last_logged_step = 0
        self._projections_in_optimizer = False

        super().__init__(model=model, args=args, **kwargs)

        # Our losses are sums divided by counts over the whole accumulation window (and all
        # processes), so Trainer must not divide them again by the accumulation steps.
        self.loss_is_scaled_for_ga = True
        self.teacher.to(self.args.device)
        self.projections.to(self.args.device)

    # ------------------------------------------------------------------ checks and set-up
    def _check_pair(self, student, teacher, args: DistillationConfig) -> None:
        problems = []
        teacher_task = detect_task(teacher)
        if teacher_task != self.task:
            problems.append(
                f"the student solves {self.task} but the teacher {type(teacher).__name__} solves {teacher_task}; "
                "load the teacher with the student's task head."
            )
        s_cfg, t_cfg = student.config, teacher.config
        if self.task == "sequence_classification" and getattr(s_cfg, "problem_type", None) in (
            "regression",
            "multi_label_classification",
        ):
            problems.append(
                f"problem_type={s_cfg.problem_type} is not supported yet; hf_kd distils single-label classifiers."
            )
        if args.uses_teacher_logits:
            if self.task in ("sequence_classification", "token_classification"):
                if s_cfg.num_labels != t_cfg.num_labels:
                    problems.append(
                        f"the student has {s_cfg.num_labels} labels and the teacher {t_cfg.num_labels}; logit "
                        "distillation needs the same label set. Build the student with num_labels="
                        f"{t_cfg.num_labels} (and the teacher's id2label)."
                    )
            elif self.task in TOKEN_TASKS:
                sv, tv = s_cfg.get_text_config().vocab_size, t_cfg.get_text_config().vocab_size
                if sv != tv:
                    problems.append(
                        f"the student's vocabulary has {sv} tokens and the teacher's {tv}; logit distillation "
                        "needs the same tokenizer. Use a student built from the teacher's tokenizer, or set "
                        "alpha=0 and distil hidden states only."
                    )
        if (args.uses_hidden or args.uses_attention) and s_cfg.is_encoder_decoder:
            problems.append(
                "hidden-state and attention losses for encoder-decoder models are not supported yet; "
                "set hidden_weight=0 and attention_weight=0."
            )
        ls, lt = _depth(s_cfg), _depth(t_cfg)
        try:
            if args.uses_hidden:
                self.hidden_pairs = resolve_layer_map(args.layer_map, ls, lt, allow_embeddings=True)
            else:
                self.hidden_pairs = []
            if args.uses_attention:
                self.attention_pairs = resolve_layer_map(
                    args.layer_map, ls, lt, allow_embeddings=False, what="attention"
                )
            else:
                self.attention_pairs = []
        except ValueError as err:
            problems.append(str(err))
        if args.uses_attention:
            for name, m in (("student", student), ("teacher", teacher)):
                if m.config._attn_implementation != "eager":
                    try:
                        m.set_attn_implementation("eager")
                    except Exception as err:  # noqa: BLE001 - any failure means no attention maps
                        problems.append(
                            f"the {name} cannot switch to eager attention ({err}); attention maps are needed "
                            "for attention_weight > 0. Load it with attn_implementation='eager' or set "
                            "attention_weight=0."
                        )
        if problems:
            raise ValueError("Cannot distil this teacher into this student:\n  - " + "\n  - ".join(problems))

    def _build_projections(self, student, teacher, args) -> nn.ModuleList:
        """One learned linear map (student width -> teacher width) per hidden pair when widths differ."""
        ds, dt = _width(student.config), _width(teacher.config)
        if not self.hidden_pairs or ds == dt:
            return nn.ModuleList()
        # Seeded so that two runs with the same seed start from the same projections.
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(args.seed)
        projections = nn.ModuleList(nn.Linear(ds, dt) for _ in self.hidden_pairs)
        torch.random.set_rng_state(gen_state)
        return projections.to(next(student.parameters()).dtype)

    # ------------------------------------------------------------------ optimizer and checkpoints
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if len(self.projections) and not self._projections_in_optimizer:
            optimizer.add_param_group(
                {"params": list(self.projections.parameters()), "weight_decay": self.args.weight_decay}
            )
            self._projections_in_optimizer = True
        return optimizer

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if len(self.projections) and self.args.should_save:
            from safetensors.torch import save_file

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            state = {k: v.detach().cpu().contiguous() for k, v in self.projections.state_dict().items()}
            save_file(state, os.path.join(folder, PROJECTIONS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, PROJECTIONS_NAME)
        if len(self.projections):
            if not os.path.isfile(path):
                raise ValueError(
                    f"{resume_from_checkpoint} has no {PROJECTIONS_NAME}: it was not written by this "
                    "distillation set-up (different widths or hidden loss). Resume from a matching checkpoint."
                )
            from safetensors.torch import load_file

            self.projections.load_state_dict(load_file(path, device=str(self.args.device)))

    # ------------------------------------------------------------------ normalisers
    def _logit_mask(self, inputs) -> torch.Tensor | None:
        """Valid rows of the logits compared: None for one row per example (sequence classification, QA)."""
        if self.task not in TOKEN_TASKS:
            return None
        labels = inputs.get("labels")
        if self.task == "causal_lm":
            # Logits at position i predict token i+1, as in Transformers' own causal-LM loss.
            if labels is not None:
                return labels[:, 1:] != -100  # (B, T-1)
            return inputs["attention_mask"][:, 1:].bool()
        if labels is not None:
            return labels != -100  # (B, T)
        if self.task == "seq2seq_lm":
            dmask = inputs.get("decoder_attention_mask")
            return dmask.bool() if dmask is not None else None
        return inputs["attention_mask"].bool()

    def _token_mask(self, inputs) -> torch.Tensor:
        mask = inputs.get("attention_mask")
        if mask is None:
            return torch.ones_like(inputs["input_ids"], dtype=torch.bool)
        return mask.bool()  # (B, T)

    def _count_items(self, inputs) -> dict[str, torch.Tensor]:
        """What each loss divides by, for one batch (summed over a window by `get_batch_samples`)."""
        device = self.args.device
        logit_mask = self._logit_mask(inputs)
        if logit_mask is None:
            batch = next(v for v in inputs.values() if torch.is_tensor(v)).shape[0]
            logit_rows = torch.tensor(batch, device=device)
        else:
            logit_rows = logit_mask.sum().to(device)
        token_mask = self._token_mask(inputs)
        lengths = token_mask.sum(-1)
        return {
            "logit": logit_rows.float(),
            "token": lengths.sum().to(device).float(),
            "pair": (lengths.float() ** 2).sum().to(device),
        }

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples:
            counts = [self._count_items(b) for b in batch_samples]
            window = {k: torch.stack([c[k] for c in counts]).sum() for k in counts[0]}
            if self.args.world_size > 1:
                window = {k: self.accelerator.reduce(v, "sum") for k, v in window.items()}
            # Where Trainer counts labelled items (num_items_in_batch), ours is the same count.
            # clamp_min(1): an all-masked window gives a loss of 0, not 0/0.
            self._window_counts = {k: v.clamp_min(1) for k, v in window.items()}
        return batch_samples, num_items_in_batch

    # ------------------------------------------------------------------ the loss
    def _split_inputs(self, inputs):
        model_inputs = {k: v for k, v in inputs.items() if k not in TARGET_KEYS}
        if self.task == "seq2seq_lm" and "labels" in inputs and "decoder_input_ids" not in model_inputs:
            model_inputs["decoder_input_ids"] = unwrap(self.model).prepare_decoder_input_ids_from_labels(
                labels=inputs["labels"]
            )
        return model_inputs

    def _targets(self, inputs, s_out, t_out) -> _Targets:
        if self.task == "question_answering":
            attention = self._token_mask(inputs)
            return _Targets(
                student=[s_out.start_logits, s_out.end_logits],
                teacher=[t_out.start_logits if t_out is not None else None, t_out.end_logits if t_out is not None else None],
                labels=[inputs.get("start_positions"), inputs.get("end_positions")],
                mask=None,
                class_mask=attention,
            )
        s_logits = s_out.logits
        t_logits = t_out.logits if t_out is not None else None
        labels = inputs.get("labels")
        if self.task == "causal_lm":
            s_logits = s_logits[:, :-1]  # (B, T-1, V)
            t_logits = t_logits[:, :-1] if t_logits is not None else None
            labels = labels[:, 1:] if labels is not None else None
        return _Targets([s_logits], [t_logits], [labels], self._logit_mask(inputs), None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            # Evaluation reports the student's own task loss; the teacher is not run.
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        args: DistillationConfig = self.args
        if self.teacher.training:  # someone called .train() on it: the teacher stays in eval mode
            self.teacher.eval()
        if self._window_counts is not None:
            counts = self._window_counts
        else:  # called outside Trainer's loop: normalise over this batch alone
            counts = {k: v.clamp_min(1) for k, v in self._count_items(inputs).items()}
        model_inputs = self._split_inputs(inputs)
        need_hidden, need_attn = bool(self.hidden_pairs), bool(self.attention_pairs)
        extra = {}
        if need_hidden:
            extra["output_hidden_states"] = True
        if need_attn:
            extra["output_attentions"] = True

        s_out = model(**model_inputs, **extra)
        t_out = None
        if args.uses_teacher_logits or need_hidden or need_attn:
            with torch.no_grad(), self.accelerator.autocast():
                t_out = self.teacher(**model_inputs, **extra)

        components: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.args.device, dtype=torch.float32)

        targets = self._targets(inputs, s_out, t_out)
        n_heads = len(targets.student)
        if args.uses_teacher_logits:
            kd = sum(
                logit_distillation_loss(
                    s, t, targets.mask, kind=args.kd_loss, temperature=args.temperature,
                    jsd_beta=args.jsd_beta, normalizer=counts["logit"], class_mask=targets.class_mask,
                )
                for s, t in zip(targets.student, targets.teacher)
            ) / n_heads
            scale = 1.0 if args.kd_loss == "mse" else args.temperature**2
            components["kd_loss"] = kd
            total = total + args.alpha * scale * kd
        if all(label is not None for label in targets.labels) and args.alpha < 1:
            ce = sum(
                cross_entropy_loss(s, label, normalizer=counts["logit"], class_mask=targets.class_mask)
                for s, label in zip(targets.student, targets.labels)
            ) / n_heads
            components["ce_loss"] = ce
            total = total + (1 - args.alpha) * ce

        token_mask = self._token_mask(inputs)
        if need_hidden:
            s_hidden, t_hidden = s_out.hidden_states, t_out.hidden_states
            losses = []
            for i, (ks, kt) in enumerate(self.hidden_pairs):
                hs = s_hidden[ks]
                if len(self.projections):
                    hs = self.projections[i](hs)  # (B, T, D_teacher)
                losses.append(
                    hidden_state_loss(hs, t_hidden[kt], token_mask, kind=args.hidden_loss, normalizer=counts["token"])
                )
            hidden = torch.stack(losses).mean()
            components["hidden_loss"] = hidden
            total = total + args.hidden_weight * hidden
        if need_attn:
            s_attn, t_attn = s_out.attentions, t_out.attentions
            if not s_attn or not t_attn or any(a is None for a in (*s_attn, *t_attn)):
                raise RuntimeError(
                    "the models returned no attention maps although attention_weight > 0. Load both with "
                    "attn_implementation='eager' (sdpa and flash attention do not return them)."
                )
            norm = counts["pair"] if args.attention_loss == "mse" else counts["token"]
            attn = torch.stack(
                [
                    attention_loss(s_attn[ks - 1], t_attn[kt - 1], token_mask, kind=args.attention_loss, normalizer=norm)
                    for ks, kt in self.attention_pairs
                ]
            ).mean()
            components["attention_loss"] = attn
            total = total + args.attention_weight * attn

        for name, value in components.items():
            self._component_sums[name] = self._component_sums.get(name, 0.0) + value.detach().float()
        # Counts are summed over every process; DDP averages gradients, so the sum is restored here.
        total = total * self.args.world_size
        return (total, s_out) if return_outputs else total

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._component_sums:
            steps = max(self.state.global_step - self._last_logged_step, 1)
            for name in COMPONENTS:
                if name in self._component_sums:
                    value = torch.as_tensor(self._component_sums[name], device=self.args.device)
                    if self.args.world_size > 1:
                        value = self.accelerator.reduce(value, "sum")
                    logs[name] = value.item() / steps
            self._component_sums = {}
            self._last_logged_step = self.state.global_step
        super().log(logs, start_time)
