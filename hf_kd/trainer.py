"""`DistillationTrainer`: a `transformers.Trainer` whose loss distils a frozen teacher into the model.

The trainer gathers outputs, picks layer pairs and weighs the terms; the losses themselves are the
pure functions of `hf_kd.losses`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy

from . import adapters, distributed, hub, relations, teachers
from .chunked import HeadTap, auto_chunk_size, chunked_cross_entropy_loss, chunked_logit_distillation_loss, linear_head_loss
from .config import DistillationConfig
from .distill.checks import check_tokenizers, load_tokenizer
from .errors import InputError, NonFiniteLossError
from .layer_map import resolve_layer_map
from .losses import COMPONENTS, attention_loss, cross_entropy_loss, hidden_state_loss, logit_distillation_loss
from .measure import count_parameters
from .tasks import TARGET_KEYS, TOKEN_TASKS, detect_task, logit_row_mask, unwrap
from .tasks import token_mask as batch_token_mask

logger = logging.getLogger(__name__)

PROJECTIONS_NAME = "kd_projections.safetensors"
#: Beside each checkpoint: what it was made with (teacher, student architecture, loss), compared on resume.
KD_CONFIG_NAME = "kd_config.json"
#: Rows of a training set scanned for labels and lengths before training (the checks stay cheap on big data).
SCAN_ROWS = 10_000
#: logit_chunk_size=0 (auto) chunks the logit losses of token-level tasks from this many classes on.
AUTO_CHUNK_MIN_VOCAB = 8192
# Tasks whose logits come from a linear head over the vocabulary: the chunked losses can start from its input.
HEAD_TASKS = ("causal_lm", "masked_lm", "seq2seq_lm")
# Config fields of models that change the logits after the head (soft-capping, scales): no head route.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _depth(config) -> int:
    return config.get_text_config().num_hidden_layers


def _decoder_depth(config) -> int:
    """Layers of the decoder of an encoder-decoder model (T5: num_decoder_layers; BART, Marian...: decoder_layers)."""
    text = config.get_text_config()  # get_text_config(decoder=True) rebuilds a BART config with default depths
    for name in ("num_decoder_layers", "decoder_layers"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    return text.num_hidden_layers


def _width(config) -> int:
    return config.get_text_config().hidden_size


def _num_heads(config) -> int:
    return config.get_text_config().num_attention_heads


def _fail_together(error: BaseException | None, world_size: int) -> None:
    """Raise on every process when one failed: the first failure's message, this process's own error where it has one."""
    messages = distributed.gather_messages(None if error is None else str(error), world_size)
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if failed:
        rank, message = failed[0]
        raise InputError(f"process {rank} of {world_size} refused to start, so every process stops: {message}")


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
        model: the student, a transformers model with a task head (or a PEFT model around one; with
            ``args.peft_config`` the trainer wraps it, see `hf_kd.adapters`).
        teacher_model: a `PreTrainedModel` (or a PEFT model), or a name/path loaded with the Auto class of the
            student's task (a folder holding an adapter loads as base + adapter, merged); or a list of these:
            several teachers, weighted by ``args.teacher_weights`` (see `hf_kd.teachers`).
        args: a `DistillationConfig`.
        **kwargs: everything `transformers.Trainer` takes (datasets, collator, processing_class, callbacks...).

    The teacher is frozen, kept in eval mode, runs without autograd on the student's device, is never
    given to the optimizer and never saved. Each loss component, unweighted, is logged with `loss`.
    """

    def __init__(
        self, model=None, teacher_model=None, args: DistillationConfig | None = None, teacher_tokenizer=None, **kwargs
    ):
        if not isinstance(args, DistillationConfig):
            raise TypeError(
                "DistillationTrainer needs args=DistillationConfig(...) (a TrainingArguments subclass with the "
                f"distillation settings), got {type(args).__name__}."
            )
        if model is None or (teacher_model is None) == (args.teacher_cache is None):
            raise ValueError(
                "DistillationTrainer needs model (the student) and either teacher_model or args.teacher_cache "
                "(with teacher_cache, pass teacher_model=None: the cache replaces the teacher)."
            )
        if kwargs.get("model_init") is not None:
            raise ValueError("model_init is not supported by DistillationTrainer: pass the student as model.")
        # Everything is checked before Trainer.__init__, which creates output_dir.
        problem = distributed.launch_problem(args.world_size)  # args.world_size sets up the processes
        if problem:
            raise InputError(problem)
        hint = distributed.single_cpu_launch_hint(args.world_size)
        if hint:
            logger.warning(hint)
        failure = None
        sources = list(teacher_model) if isinstance(teacher_model, (list, tuple)) else [teacher_model]
        self._cache_meta = None
        self._minilm_modules, self.minilm_relation_heads = {}, None  # set by _check_pair when MiniLM is used
        self.decoder_hidden_pairs, self.decoder_attention_pairs, self._encoder_decoder = [], [], False
        self._use_cache_arg: bool | None = None  # whether the forward passes get use_cache=False (decoders)
        loaded, teacher = [], None
        try:
            self.task = detect_task(model)
            model = self._prepare_student(model, args)
            if args.teacher_cache is not None:  # the teacher's outputs are read from disk: no teacher at all
                self._init_from_cache(unwrap(model), args, kwargs.get("train_dataset"))
            else:
                loaded = self._load_teachers(sources, args)
            for source, teacher in reversed(list(zip(sources, loaded))):  # the first last: its pairs stay
                self._check_pair(unwrap(model), unwrap(teacher), args)
                self._check_placement(unwrap(model), unwrap(teacher))
                tokenizer = teacher_tokenizer
                if tokenizer is None and self._teacher_folder(source):
                    tokenizer = load_tokenizer(self._teacher_folder(source))
                check_tokenizers(kwargs.get("processing_class"), tokenizer)
                self._check_dataset(kwargs.get("train_dataset"), unwrap(model), unwrap(teacher))
        except Exception as err:  # noqa: BLE001 - re-raised below, on every process
            failure = err
        # A check that fails on one process only (a teacher folder missing on one node, weights on the meta
        # device on all but the first) must stop every process, or the others wait in their first collective.
        _fail_together(failure, args.world_size)
        for t in loaded:
            t.eval()
            t.requires_grad_(False)
        self.teacher = teacher  # the first teacher (None with teacher_cache): layer pairs, evaluation, the card
        self.teachers = loaded
        self.teacher_weights = teachers.normalise_weights(args.teacher_weights, max(len(loaded), 1))
        self._teacher_sources = [str(t) if isinstance(t, (str, os.PathLike)) else None for t in sources]
        if teacher is not None:
            self._teacher_class = type(teacher).__name__  # FSDP renames the class of a module it shards
        self.projections = self._build_projections(unwrap(model), teacher, args)
        self._window_counts: dict[str, torch.Tensor] | None = None
        self._component_sums: dict[str, torch.Tensor] = {}
        self._steps_since_log = 0  # optimizer steps whose components are in _component_sums (also after a resume)
        self._projections_in_optimizer = False
        # Publishing (hf_kd.hub): the teacher as named by the caller, evaluations for the card, cached facts.
        self._teacher_source = self._teacher_sources[0]
        self._evaluating_teacher = False
        self._evaluations: dict[str, tuple[int, str, dict]] = {}
        self._card_cache: dict = {}
        if self._cache_meta is not None:  # what the card says of a teacher that is not loaded
            t = self._cache_meta["teacher"]
            self._card_cache.update(teacher_sha256=t["weights_sha256"], teacher_parameters=t["parameters"],
                                    teacher_size=(None, f"not loaded: read from the cache {args.teacher_cache}"))

        super().__init__(model=model, args=args, **kwargs)

        # Our losses are sums divided by counts over the whole accumulation window (and all
        # processes), so Trainer must not divide them again by the accumulation steps.
        self.loss_is_scaled_for_ga = True
        if self.teacher is None:
            from .teacher_cache import CacheCollator

            self.data_collator = CacheCollator(self.data_collator)
            self._teacher_runners, self._teacher_runner = [], None
        else:
            if self._backend.shards_models:  # read the whole teacher once, before it is split over the processes
                self._remember_teacher()
                self._teacher_records()
            # What the teacher's forward passes call: the teacher, or the DeepSpeed engine that partitions it.
            self._teacher_runners = [
                distributed.place_teacher(t, self._backend, self.accelerator, self.args, self._teacher_dtype(unwrap(model)))
                for t in self.teachers
            ]
            self._teacher_runner = self._teacher_runners[0]
        self.projections.to(self.args.device)
        self.skipped_steps: list[tuple[int, str]] = []  # (step, components) dropped by nonfinite_loss="skip"
        self._head_route: bool | None = None  # logit losses through the heads: None = not verified yet

    # ------------------------------------------------------------------ checks and set-up
    def create_accelerator_and_postprocess(self) -> None:
        """Trainer's accelerator, then the backend checks (still before anything is written to output_dir)."""
        super().create_accelerator_and_postprocess()
        self._backend = distributed.backend_of(self.accelerator)
        problems = distributed.backend_problems(self._backend, self.accelerator, self.args, len(self.projections))
        if problems:  # the launcher's configuration, the same on every process: every process refuses
            raise InputError(f"Cannot distil under {self._backend.name}:\n  - " + "\n  - ".join(problems))

    def _init_from_cache(self, student, args: DistillationConfig, train_dataset) -> None:
        """teacher_cache: the checks of `_check_pair` / `_check_dataset` against the cache's metadata."""
        from . import teacher_cache

        meta = self._cache_meta = teacher_cache.read_cache_metadata(args.teacher_cache)
        self.hidden_pairs = teacher_cache.check_cache(meta, args.teacher_cache, args, self.task, student, train_dataset)
        self.attention_pairs = []
        self._check_dataset(train_dataset, student, None)
        t = meta["teacher"]
        self._teacher_class = t["class"]
        self._teacher_width = t["hidden_size"]

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._cache_meta is not None:  # remove_unused_columns must keep the cached teacher columns
            from .teacher_cache import cache_columns

            self._signature_columns += [c for c in cache_columns(self._cache_meta) if c not in self._signature_columns]

    def _remember_teacher(self) -> None:
        """Hash, size and count the teacher's weights while one process can still read them all (see `hub`)."""
        from .measure import size_on_disk_mb

        teacher = self.teacher
        state = distributed.GatheredState(teacher) if distributed.is_partitioned(teacher) else teacher
        self._card_cache["teacher_sha256"] = hub.weights_sha256(state)
        self._card_cache["teacher_parameters"] = count_parameters(teacher)
        source = teacher.config.name_or_path
        if source and Path(source).is_dir() and size_on_disk_mb(source) > 0:
            self._card_cache["teacher_size"] = (size_on_disk_mb(source), "the weight files of its folder")
        elif not distributed.is_partitioned(teacher):
            self._card_cache["teacher_size"] = (hub.weights_size_mb(teacher), "its weights in their dtype")

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
        if s_cfg.is_encoder_decoder and (args.uses_relations or (args.uses_attention and args.attention_loss == "minilm")):
            problems.append(
                "MiniLM relations and sample relations for encoder-decoder models are not supported yet; set "
                "relation_weight=0 and use attention_loss='mse' or 'kl' (hidden and attention losses cover both stacks)."
            )
        ls, lt = _depth(s_cfg), _depth(t_cfg)  # the encoders of encoder-decoder models
        problems += self._resolve_decoder_maps(s_cfg, t_cfg, args)
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
        self._minilm_modules, self.minilm_relation_heads = {}, None
        if args.uses_attention and args.attention_loss == "minilm" and self.attention_pairs:
            problems.extend(self._check_minilm(student, teacher, args))
        if args.uses_attention_maps:
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
            raise InputError("Cannot distil this teacher into this student:\n  - " + "\n  - ".join(problems))

    def _check_minilm(self, student, teacher, args: DistillationConfig) -> list[str]:
        """attention_loss="minilm": find the q/k/v projections of the mapped layers and fix the relation heads."""
        try:
            for who, m, layers in (("student", student, [s for s, _ in self.attention_pairs]),
                                   ("teacher", teacher, [t for _, t in self.attention_pairs])):
                found = relations.find_qkv_modules(m, _depth(m.config), layers, who=who)
                missing = sorted(set(layers) - set(found))
                if missing:
                    return [f"no query/key/value projections found in layers {missing} of the {who}; "
                            "attention_loss='minilm' needs them. Use attention_loss='mse' or 'kl'."]
                self._minilm_modules[who] = found
        except ValueError as err:
            return [str(err)]
        widths = {
            who: sorted({w for trio in found.values() for w in map(relations.projection_width, trio) if w})
            for who, found in self._minilm_modules.items()
        }
        heads = args.minilm_relation_heads
        if heads is None:
            heads = _num_heads(teacher.config)
            if any(w % heads for ws in widths.values() for w in ws):
                return [f"attention_loss='minilm' splits the q/k/v vectors into relation heads; the default, the "
                        f"teacher's {heads} heads, does not divide every width (student {widths['student']}, teacher "
                        f"{widths['teacher']}). Set minilm_relation_heads to a common divisor of them."]
        elif any(w % heads for ws in widths.values() for w in ws):
            return [f"minilm_relation_heads={heads} does not divide every q/k/v width (student {widths['student']}, "
                    f"teacher {widths['teacher']}); set it to a common divisor of them."]
        self.minilm_relation_heads = heads
        return []

    def _resolve_decoder_maps(self, s_cfg, t_cfg, args: DistillationConfig) -> list[str]:
        """Encoder-decoder models: the decoders' own layer pairs (`decoder_layer_map`, default `layer_map`).

        Sets `decoder_hidden_pairs` and `decoder_attention_pairs` (empty for other models) and returns problems.
        """
        self.decoder_hidden_pairs, self.decoder_attention_pairs = [], []
        self._encoder_decoder = bool(s_cfg.is_encoder_decoder)
        if not self._encoder_decoder:
            if args.decoder_layer_map is not None:
                return [
                    f"decoder_layer_map is set but the student {type(s_cfg).__name__} has a single stack of layers "
                    "(not an encoder-decoder model); use layer_map alone."
                ]
            return []
        layer_map = args.decoder_layer_map if args.decoder_layer_map is not None else args.layer_map
        ls, lt = _decoder_depth(s_cfg), _decoder_depth(t_cfg)
        try:
            if args.uses_hidden:
                self.decoder_hidden_pairs = resolve_layer_map(layer_map, ls, lt, what="decoder hidden")
            if args.uses_attention:
                self.decoder_attention_pairs = resolve_layer_map(
                    layer_map, ls, lt, allow_embeddings=False, what="decoder attention"
                )
        except ValueError as err:
            return [f"{err} (decoder_layer_map maps the decoders; layer_map the encoders)"]
        return []

    def _layer_stacks(self, inputs, s_out, t_out, counts) -> list[dict]:
        """The stacks whose hidden states and attention maps are distilled, each with its own pairs and mask.

        One stack for encoder-only and decoder-only models; for encoder-decoder models the encoder (masked by
        attention_mask, pairs from layer_map) then the decoder (masked like its logits: labels != -100, else
        decoder_attention_mask; pairs from decoder_layer_map). Cross-attention maps are not distilled.
        """
        if not self._encoder_decoder:
            return [dict(
                name="", s_hidden=getattr(s_out, "hidden_states", None), t_hidden=getattr(t_out, "hidden_states", None),
                s_attn=getattr(s_out, "attentions", None), t_attn=getattr(t_out, "attentions", None),
                hidden_pairs=self.hidden_pairs, attention_pairs=self.attention_pairs, mask=self._token_mask(inputs),
                token=counts["token"], pair=counts["pair"],
            )]
        stacks = []
        for side, hidden_pairs, attention_pairs, mask, key in (
            ("encoder", self.hidden_pairs, self.attention_pairs, self._token_mask(inputs), ""),
            ("decoder", self.decoder_hidden_pairs, self.decoder_attention_pairs, self._decoder_mask(inputs), "decoder_"),
        ):
            stacks.append(dict(
                name=side + " ", s_hidden=getattr(s_out, f"{side}_hidden_states", None),
                t_hidden=getattr(t_out, f"{side}_hidden_states", None), s_attn=getattr(s_out, f"{side}_attentions", None),
                t_attn=getattr(t_out, f"{side}_attentions", None), hidden_pairs=hidden_pairs,
                attention_pairs=attention_pairs, mask=mask, token=counts[key + "token"], pair=counts[key + "pair"],
            ))
        return stacks

    @staticmethod
    def _teacher_folder(teacher_model) -> str | None:
        if not isinstance(teacher_model, (str, os.PathLike)):
            return None
        path = os.path.expanduser(str(teacher_model))
        return path if os.path.isdir(path) else None

    def _prepare_student(self, model, args: DistillationConfig):
        """The student as trained: wrapped with ``args.peft_config`` when set (see `hf_kd.adapters`)."""
        if args.peft_config is not None and adapters.is_peft_model(model):
            raise InputError(
                "the student is already a peft.PeftModel and peft_config is set too: unset peft_config to train the "
                "model's own adapter, or pass the plain transformers model to have peft_config's adapter added."
            )
        if args.merge_adapter_on_save and args.peft_config is None and not adapters.is_peft_model(model):
            logger.warning("merge_adapter_on_save=True has no effect: the student has no adapter (no peft_config).")
        return adapters.wrap_student(model, args.peft_config, self.task)

    def _load_teachers(self, sources: list, args: DistillationConfig) -> list:
        """Every teacher loaded, and the refusals that concern several teachers (before any model check)."""
        if not sources:
            raise InputError("teacher_model is an empty list; give at least one teacher.")
        if args.teacher_weights is not None and len(args.teacher_weights) != len(sources):
            raise InputError(
                f"teacher_weights has {len(args.teacher_weights)} values for {len(sources)} teachers; give one weight "
                "per teacher, in the order of teacher_model (or leave it unset for equal weights)."
            )
        if len(sources) > 1 and (args.uses_hidden or args.uses_attention or args.uses_relations):
            raise InputError(
                f"hidden_weight, attention_weight and relation_weight need a single teacher, and {len(sources)} are "
                "given: the layers and embeddings of several teachers do not average (depths and widths differ). Set "
                "hidden_weight=0, attention_weight=0 and relation_weight=0 (the logits of all teachers are "
                "averaged), or distil from one teacher."
            )
        loaded = [teachers.load_teacher(source, self.task) for source in sources]
        if len(loaded) > 1:
            names = [str(s) if isinstance(s, (str, os.PathLike)) else type(unwrap(t)).__name__
                     for s, t in zip(sources, loaded)]
            problems = teachers.compatibility_problems([unwrap(t) for t in loaded], self.task, names)
            if problems:
                raise InputError("Cannot average these teachers:\n  - " + "\n  - ".join(problems))
        return loaded

    def _check_placement(self, student, teacher) -> None:
        """Weights that were never loaded cannot be moved; say so here rather than deep inside `.to()`."""
        for name, m in (("teacher", teacher), ("student", student)):
            if any(p.is_meta for p in m.parameters()):
                raise InputError(
                    f"the {name}'s weights are on the 'meta' device (created without data, e.g. under "
                    "init_empty_weights or device_map='meta'). Load it with from_pretrained(path) (optionally "
                    "device_map='cpu' or 'cuda'); DistillationTrainer moves the teacher to the student's device."
                )

    def _teacher_dtype(self, student) -> torch.dtype | None:
        """`teacher_dtype`: "auto" follows the student's floating dtype (under DeepSpeed, the dtype its engine gives
        the student), else the named dtype."""
        if getattr(self.teacher, "is_quantized", False):  # quantized weights cannot be cast; keep them
            return None
        if self.args.teacher_dtype != "auto":
            return getattr(torch, self.args.teacher_dtype)
        if self._backend.kind == distributed.DEEPSPEED:
            return distributed.PRECISION_DTYPES.get(distributed.run_precision(self.accelerator), torch.float32)
        floats = [p.dtype for p in student.parameters() if p.is_floating_point()]
        return floats[0] if floats else torch.float32

    def _check_dataset(self, dataset, student, teacher) -> None:
        """Empty data, labels outside the head, sequences longer than either model's positions.

        Cheap by design: the first `SCAN_ROWS` rows of a `datasets.Dataset` are read (its label and input_ids
        columns alone), the first `SCAN_ROWS // 10` rows of another map-style dataset; an IterableDataset or a
        dataset without len() is not scanned. Rows past those are not checked.
        """
        if dataset is None:
            return
        try:
            n = len(dataset)
        except TypeError:
            return
        if n == 0:
            raise InputError(
                "train_dataset is empty (0 rows). Check the split name and any filtering or max_train_samples."
            )
        rows = min(n, SCAN_ROWS)
        columns = getattr(dataset, "column_names", None)
        if columns is not None:  # datasets.Dataset: read columns, not rows
            head = dataset.select(range(rows)) if rows < n else dataset
            get = lambda name: head[name] if name in columns else None  # noqa: E731
        else:
            sample = [dataset[i] for i in range(min(rows, SCAN_ROWS // 10))]  # __getitem__ may tokenize: fewer
            if not all(isinstance(r, dict) for r in sample):
                return
            get = lambda name: [r[name] for r in sample] if all(name in r for r in sample) else None  # noqa: E731
        problems = []
        limits = []
        for who, m in (("student", student), ("teacher", teacher)):
            if m is None:  # teacher_cache: the teacher saw this data already
                continue
            limit = getattr(m.config.get_text_config(), "max_position_embeddings", None)
            if limit:
                limits.append((limit, who))
        ids = get("input_ids")
        if ids is not None and limits:
            longest = max(len(x) for x in ids)
            limit, who = min(limits)
            if longest > limit:
                problems.append(
                    f"train_dataset has sequences of {longest} tokens, longer than the {who}'s "
                    f"max_position_embeddings={limit}. Tokenize with truncation=True, max_length={limit} (or less)."
                )
        labels = get("labels")
        if labels is None and self.task in ("sequence_classification", "token_classification"):
            labels = get("label")
        if labels is not None and self.task in ("sequence_classification", "token_classification", "masked_lm", "causal_lm",
                                                "seq2seq_lm"):
            flat = []
            for v in labels:
                v = v.tolist() if torch.is_tensor(v) else v
                flat.extend(v if isinstance(v, (list, tuple)) else [v])
            values = [int(v) for v in flat if v is not None and int(v) != -100]
            if self.task in ("masked_lm", "causal_lm", "seq2seq_lm"):
                high, what = student.config.get_text_config().vocab_size, "vocabulary size"
            else:
                high, what = student.config.num_labels, "num_labels"
            bad = sorted({v for v in values if not 0 <= v < high})
            if bad:
                problems.append(
                    f"train_dataset has labels {bad[:5]} outside 0..{high - 1} (the student's {what} is {high}; "
                    "-100 marks ignored positions). Map the labels to 0..N-1, or build the student and the teacher "
                    "with num_labels covering them."
                )
        if problems:
            raise InputError("Cannot train on this data:\n  - " + "\n  - ".join(problems))

    def _build_projections(self, student, teacher, args) -> nn.ModuleList:
        """One learned linear map (student width -> teacher width) per hidden pair when widths differ."""
        ds, dt = _width(student.config), _width(teacher.config) if teacher is not None else self._teacher_width
        n_pairs = len(self.hidden_pairs) + len(self.decoder_hidden_pairs)  # encoder's first, then decoder's
        if not n_pairs or ds == dt:
            return nn.ModuleList()
        # Seeded so that two runs with the same seed start from the same projections.
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(args.seed)
        projections = nn.ModuleList(nn.Linear(ds, dt) for _ in range(n_pairs))
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
        # A finite loss can still give non-finite weights (e.g. an overflowing backward pass): such weights must
        # not become the newest checkpoint, which a resume or load_best_model_at_end would pick.
        for name, p in [*unwrap(self.accelerator.unwrap_model(model)).named_parameters(),
                        *(("projections." + n, p) for n, p in self.projections.named_parameters())]:
            if not torch.isfinite(p).all():
                raise NonFiniteLossError(
                    f"the weights hold NaN/inf after step {self.state.global_step} (first: {name}); the checkpoint "
                    "of this step is not written and the earlier ones are kept. Lower learning_rate, keep "
                    "max_grad_norm > 0, or use bf16 instead of fp16; then resume from the last checkpoint."
                )
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            if len(self.projections):
                from safetensors.torch import save_file

                state = {k: v.detach().cpu().contiguous() for k, v in self.projections.state_dict().items()}
                save_file(state, os.path.join(folder, PROJECTIONS_NAME))
            with open(os.path.join(folder, KD_CONFIG_NAME), "w") as f:
                json.dump(self._run_signature(), f, indent=1)

    def _run_signature(self) -> dict:
        """What a checkpoint was made with and must be resumed with: teacher weights, student architecture, loss."""
        args: DistillationConfig = self.args
        student = unwrap(self.accelerator.unwrap_model(self.model))
        text = student.config.get_text_config()
        return {
            "teacher": {
                "class": self._teacher_class, "weights_sha256": self._teacher_sha256(),
                **({"all_weights_sha256": [r["weights_sha256"] for r in self._teacher_records()],
                    "weights": self.teacher_weights} if len(self.teachers) > 1 else {}),
            },
            "student": {
                "class": type(student).__name__,
                "config_class": type(student.config).__name__,
                **{k: getattr(text, k, None) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")},
                "num_labels": getattr(student.config, "num_labels", None),
            },
            "loss": {
                "kd_loss": args.kd_loss, "temperature": args.temperature, "alpha": args.alpha, "jsd_beta": args.jsd_beta,
                "hidden_weight": args.hidden_weight, "hidden_loss": args.hidden_loss,
                "attention_weight": args.attention_weight, "attention_loss": args.attention_loss,
                "hidden_pairs": [list(p) for p in self.hidden_pairs],
                "attention_pairs": [list(p) for p in self.attention_pairs],
                "projections": len(self.projections),
                **self._relation_settings(),
                # Only when scheduled, so that checkpoints made before schedules existed still resume.
                **{f"{name}_{key}": getattr(args, f"{name}_{key}") for name in ("temperature", "alpha")
                   if getattr(args, f"{name}_schedule") != "constant" for key in ("schedule", "end")},
                **self._decoder_pairs_record(),
            },
        }

    def _relation_settings(self) -> dict:
        """The relation fields in use (none when unused, so records and checkpoints from before them still match)."""
        args: DistillationConfig = self.args
        out = {}
        if self._minilm_modules and args.uses_attention:
            out["minilm_relation_heads"] = self.minilm_relation_heads
        if args.uses_relations:
            out.update(relation_weight=args.relation_weight, relation_loss=args.relation_loss,
                       relation_pooling=args.relation_pooling)
        return out

    def _decoder_pairs_record(self) -> dict:
        if not (self.decoder_hidden_pairs or self.decoder_attention_pairs):
            return {}
        return {"decoder_hidden_pairs": [list(p) for p in self.decoder_hidden_pairs],
                "decoder_attention_pairs": [list(p) for p in self.decoder_attention_pairs]}

    def _check_resume(self, checkpoint) -> None:
        path = os.path.join(checkpoint, KD_CONFIG_NAME)
        if not os.path.isfile(path):
            logger.warning(
                "%s has no %s (written by hf_kd since it records teacher, student and loss): resuming without "
                "checking that they match.", checkpoint, KD_CONFIG_NAME,
            )
            return
        with open(path) as f:
            saved = json.load(f)
        now = json.loads(json.dumps(self._run_signature()))  # tuples -> lists, as read back
        diffs = [
            f"{group}.{key}: checkpoint {saved.get(group, {}).get(key)!r}, now {fields.get(key)!r}"
            for group, fields in now.items()
            for key in {**saved.get(group, {}), **fields}  # a key on one side only differs too
            if saved.get(group, {}).get(key) != fields.get(key)
        ]
        if diffs:
            raise InputError(
                f"Cannot resume from {checkpoint}: it was made with another set-up ({KD_CONFIG_NAME}):\n  - "
                + "\n  - ".join(diffs)
                + "\nResume with the checkpoint's teacher, student and loss settings, or start a new run (a new "
                "output_dir) that loads the checkpoint's weights as the student."
            )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        self._check_resume(resume_from_checkpoint)  # before any weight is loaded
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
        return logit_row_mask(self.task, inputs)

    def _token_mask(self, inputs) -> torch.Tensor:
        return batch_token_mask(inputs)  # (B, T)

    def _decoder_mask(self, inputs) -> torch.Tensor:
        """Valid decoder positions of a seq2seq batch: those of its logits (B, T_decoder)."""
        return self._logit_mask(inputs)

    def _count_items(self, inputs) -> dict[str, torch.Tensor]:
        """What each loss divides by, for one batch (summed over a window by `get_batch_samples`)."""
        device = self.args.device
        logit_mask = self._logit_mask(inputs)
        if logit_mask is None:
            batch = next(v for v in inputs.values() if torch.is_tensor(v)).shape[0]
            logit_rows = torch.tensor(batch, device=device)
        else:
            logit_rows = logit_mask.sum().to(device)
        # The hard-label CE of sequence classification averages over labelled rows: rows whose label
        # is -100 (an unlabelled transfer set) train on the teacher's targets alone.
        labels = inputs.get("labels")
        if self.task == "sequence_classification" and labels is not None and labels.dim() == 1:
            label_rows = (labels != -100).sum().to(device)
        else:
            label_rows = logit_rows
        token_mask = self._token_mask(inputs)
        lengths = token_mask.sum(-1)
        counts = {
            "logit": logit_rows.float(),
            "label": label_rows.float(),
            "token": lengths.sum().to(device).float(),
            "pair": (lengths.float() ** 2).sum().to(device),
            # Batch-level losses (sample relations) are averaged over the micro-batches of all processes.
            "micro_batch": torch.ones((), device=device),
        }
        if self.task == "seq2seq_lm":  # the decoder's hidden and attention losses average over its own positions
            decoder_lengths = self._decoder_mask(inputs).sum(-1)
            counts["decoder_token"] = decoder_lengths.sum().to(device).float()
            counts["decoder_pair"] = (decoder_lengths.float() ** 2).sum().to(device)
        return counts

    def _clip_grad_norm(self, model):
        """Clip the student's and the projections' gradients together (Trainer sees the student alone).

        Projections exist only in one process or under DDP (GPUs or CPU processes); FSDP and DeepSpeed refuse them.
        """
        if not len(self.projections) or self._backend.kind not in (distributed.SINGLE, distributed.DDP):
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
        self._steps_since_log += 1
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
    def _scheduled(self, name: str, step: int | None = None) -> float:
        """`temperature` or `alpha` at optimizer step `step` (default: the step being computed), per its schedule.

        Outside a training loop (no max_steps yet) this is the start value."""
        step = self.state.global_step if step is None else step
        return self.args.scheduled(name, step, self.state.max_steps or 1)

    def _current_temperature(self) -> float:
        return self._scheduled("temperature")

    def _current_alpha(self) -> float:
        return self._scheduled("alpha")

    def _split_inputs(self, inputs):
        model_inputs = {k: v for k, v in inputs.items() if k not in TARGET_KEYS and not k.startswith("kd_teacher_")}
        if self.task == "seq2seq_lm" and "labels" in inputs and "decoder_input_ids" not in model_inputs:
            model_inputs["decoder_input_ids"] = unwrap(self.model).prepare_decoder_input_ids_from_labels(
                labels=inputs["labels"]
            )
        return model_inputs

    def _cached_kd_loss(self, inputs, targets: _Targets, counts) -> torch.Tensor:
        """The logit term against the teacher targets read from `teacher_cache` (see `hf_kd.teacher_cache`)."""
        from .teacher_cache import cached_logit_loss

        return cached_logit_loss(inputs, targets.student[0], targets.mask, self.args, counts["logit"])

    def _cached_hidden(self, inputs, token_mask) -> dict[int, torch.Tensor]:
        from .teacher_cache import cached_hidden_states

        return cached_hidden_states(inputs, sorted({kt for _, kt in self.hidden_pairs}), token_mask)

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

    def _teacher_target(self, inputs, model_inputs, extra):
        """The teacher's outputs; with several teachers, one output whose logits are their mixture target
        (`hf_kd.teachers.combine_outputs`), the first teacher's other fields."""
        with torch.no_grad(), self.accelerator.autocast():  # mixed precision reaches the teacher too
            outputs = [runner(**model_inputs, **extra) for runner in self._teacher_runners]
        if len(outputs) == 1:
            return outputs[0]
        class_mask = self._token_mask(inputs) if self.task == "question_answering" else None
        return teachers.combine_outputs(
            outputs, self.teacher_weights, kind=self.args.kd_loss, temperature=self._current_temperature(),
            class_mask=class_mask,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            # Evaluation reports the student's own task loss; the teacher is not run.
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        args: DistillationConfig = self.args
        for teacher in self.teachers:
            if teacher.training:  # someone called .train() on it: the teacher stays in eval mode
                teacher.eval()
        if self._window_counts is not None:
            counts = self._window_counts
        else:  # called outside Trainer's loop: normalise over this batch alone
            counts = {k: v.clamp_min(1) for k, v in self._count_items(inputs).items()}
        model_inputs = self._split_inputs(inputs)
        need_hidden, need_attn = bool(self.hidden_pairs), bool(self.attention_pairs) and args.uses_attention_maps
        need_qkv = bool(self._minilm_modules) and args.uses_attention
        extra = {"use_cache": False} if self._takes_use_cache(model) else {}
        if need_hidden or args.uses_relations:
            extra["output_hidden_states"] = True
        if need_attn:
            extra["output_attentions"] = True

        # MiniLM relations read q/k/v through forward hooks that live for one forward pass each; the head taps
        # (hf_kd.chunked) keep what enters the output layers when the logit losses start from there.
        s_tap, t_tap = self._head_taps(model)
        s_cap, t_cap = (relations.QKVCapture(self._minilm_modules[who]) if need_qkv else contextlib.nullcontext()
                        for who in ("student", "teacher"))
        with s_cap, s_tap or contextlib.nullcontext():
            s_out = model(**model_inputs, **extra)
        t_out = None
        if self.teacher is not None and (
            args.uses_teacher_logits or need_hidden or need_attn or need_qkv or args.uses_relations
        ):
            # the first teacher's q/k/v (several teachers refuse MiniLM and relations)
            with t_cap, t_tap or contextlib.nullcontext():
                t_out = self._teacher_target(inputs, model_inputs, extra)
        heads = self._verified_heads(s_tap, t_tap, s_out, t_out)

        components: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.args.device, dtype=torch.float32)

        targets = self._targets(inputs, s_out, t_out)
        n_heads = len(targets.student)
        temperature, alpha = self._current_temperature(), self._current_alpha()
        chunk = self._logit_chunk_size()
        kd_loss = chunked_logit_distillation_loss if chunk else logit_distillation_loss
        ce_loss = chunked_cross_entropy_loss if chunk else cross_entropy_loss
        chunking = {"chunk_size": chunk} if chunk else {"class_mask": targets.class_mask}  # token tasks: no class mask
        if heads is not None:  # the logits are never made: the losses start from what enters the heads
            total = total + self._head_logit_terms(heads, inputs, targets, counts, components, temperature, alpha)
        elif args.uses_teacher_logits and self.teacher is None:
            kd = self._cached_kd_loss(inputs, targets, counts)  # at the cache's temperature (no T schedule)
            components["kd_loss"] = kd
            total = total + alpha * temperature**2 * kd
        elif args.uses_teacher_logits:
            kd = sum(
                kd_loss(
                    s, t, targets.mask, kind=args.kd_loss, temperature=temperature,
                    jsd_beta=args.jsd_beta, normalizer=counts["logit"], **chunking,
                )
                for s, t in zip(targets.student, targets.teacher)
            ) / n_heads
            scale = 1.0 if args.kd_loss == "mse" else temperature**2
            components["kd_loss"] = kd
            total = total + alpha * scale * kd
        if heads is None and all(label is not None for label in targets.labels) and alpha < 1:
            ce = sum(
                ce_loss(s, label, normalizer=counts["label"], **chunking)
                for s, label in zip(targets.student, targets.labels)
            ) / n_heads
            components["ce_loss"] = ce
            total = total + (1 - alpha) * ce

        token_mask = self._token_mask(inputs)
        stacks = self._layer_stacks(inputs, s_out, t_out, counts) if need_hidden or need_attn else []
        if need_hidden and t_out is None:  # teacher_cache: the teacher's hidden states saved beside its logits
            stacks[0]["t_hidden"] = self._cached_hidden(inputs, token_mask)
        if need_hidden:  # the mean over every mapped pair (encoder-decoder: the encoder's and the decoder's)
            losses = []
            for stack in stacks:
                for ks, kt in stack["hidden_pairs"]:
                    hs = stack["s_hidden"][ks]
                    if len(self.projections):
                        hs = self.projections[len(losses)](hs)  # (B, T, D_teacher)
                    losses.append(hidden_state_loss(
                        hs, stack["t_hidden"][kt], stack["mask"], kind=args.hidden_loss, normalizer=stack["token"]
                    ))
            hidden = torch.stack(losses).mean()
            components["hidden_loss"] = hidden
            total = total + args.hidden_weight * hidden
        if need_attn:
            losses = []
            for stack in stacks:
                s_attn, t_attn = stack["s_attn"], stack["t_attn"]
                if stack["attention_pairs"] and (
                    not s_attn or not t_attn or any(a is None for a in (*s_attn, *t_attn))
                ):
                    raise RuntimeError(
                        f"the models returned no {stack['name']}attention maps although attention_weight > 0. Load "
                        "both with attn_implementation='eager' (sdpa and flash attention do not return them)."
                    )
                norm = stack["pair"] if args.attention_loss == "mse" else stack["token"]
                losses += [
                    attention_loss(s_attn[ks - 1], t_attn[kt - 1], stack["mask"], kind=args.attention_loss, normalizer=norm)
                    for ks, kt in stack["attention_pairs"]
                ]
            attn = torch.stack(losses).mean()
            components["attention_loss"] = attn
            total = total + args.attention_weight * attn
        if need_qkv:
            attn = torch.stack(
                [
                    relations.minilm_relation_loss(s_cap.get(ks), t_cap.get(kt), token_mask,
                                                   self.minilm_relation_heads, normalizer=counts["token"])
                    for ks, kt in self.attention_pairs
                ]
            ).mean()
            components["attention_loss"] = attn
            total = total + args.attention_weight * attn
        if args.uses_relations:
            relation = self._sample_relation_loss(s_out, t_out, token_mask) / counts["micro_batch"]
            components["relation_loss"] = relation
            total = total + args.relation_weight * relation

        # One sync per micro-batch, as Trainer's own logging_nan_inf_filter check already costs.
        finite = bool(torch.isfinite(total))
        if args.nonfinite_loss == "stop" and self.args.world_size > 1:
            # Stopping is collective: a process that raised alone would leave the others waiting in the
            # backward pass's all-reduce. One scalar all-reduce per micro-batch.
            if distributed.any_process(not finite, self.accelerator):
                self._stop_nonfinite(components, s_out, t_out, here=not finite)
        elif not finite:
            return self._nonfinite(model, components, s_out, t_out, return_outputs)
        for name, value in components.items():
            self._component_sums[name] = self._component_sums.get(name, 0.0) + value.detach().float()
        # Counts are summed over every process; DDP averages gradients, so the sum is restored here.
        total = total * self.args.world_size
        return (total, s_out) if return_outputs else total

    def _takes_use_cache(self, model) -> bool:
        """Decoders build a KV cache unless told not to: memory no training step reads, and with a cache
        Transformers does not separate the examples of a padding-free (packed) batch. True when every model
        run here takes `use_cache`."""
        if self._use_cache_arg is None:
            import inspect

            models = [unwrap(self.accelerator.unwrap_model(model)), *(unwrap(t) for t in self.teachers)]
            self._use_cache_arg = all(
                "use_cache" in inspect.signature(m.forward).parameters and getattr(m.config, "use_cache", None) is not None
                for m in models
            )
        return self._use_cache_arg

    def _sample_relation_loss(self, s_out, t_out, token_mask) -> torch.Tensor:
        """`relation_loss` between the examples of this micro-batch, on one embedding per example.

        The embedding is the last hidden state at the first valid token or averaged over valid tokens
        (`relation_pooling`; token-level tasks always average). Relations are batch-level: with gradient
        accumulation (and several processes) each micro-batch gives its own relation loss and the trainer
        averages them, which cannot equal the relation loss of the larger batch (other pairs, another mean
        distance); accumulation stays exact for every other loss.
        """
        pooling = "mean" if self.task in TOKEN_TASKS else self.args.relation_pooling
        s_emb = relations.pool_examples(s_out.hidden_states[-1], token_mask, pooling)  # (B, Ds)
        t_emb = relations.pool_examples(t_out.hidden_states[-1], token_mask, pooling)  # (B, Dt)
        return relations.sample_relation_loss(s_emb, t_emb, token_mask.any(-1), kind=self.args.relation_loss)

    # ------------------------------------------------------------------ chunked logit losses (hf_kd.chunked)
    def _logit_chunk_size(self) -> int:
        """Positions per chunk of the logit losses (`logit_chunk_size`); 0 = unchunked."""
        size = self.args.logit_chunk_size
        if size == -1 or self.task not in TOKEN_TASKS:
            return 0
        if size > 0:
            return size
        config = unwrap(self.accelerator.unwrap_model(self.model)).config
        classes = config.num_labels if self.task == "token_classification" else config.get_text_config().vocab_size
        return auto_chunk_size(classes, self.args.device) if classes >= AUTO_CHUNK_MIN_VOCAB else 0

    def _head_route_problem(self, student, teacher) -> str | None:
        """Why the logit losses cannot start from the heads' inputs, or None."""
        if self._backend.kind != distributed.SINGLE:
            # Under DDP, FSDP and DeepSpeed the heads' weights are read outside the wrapped forward pass, which
            # is untested (FSDP and ZeRO-3 even hold them in shards): the full logits are chunked instead.
            return f"the run is distributed ({self._backend.name})"
        models = [("student", student), ("teacher", teacher)][: 2 if self.args.uses_teacher_logits else 1]
        models = [(name, m) for name, m in models if m is not None]  # teacher_cache: no teacher
        for name, m in models:
            head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
            if type(head) is not nn.Linear:  # an adapter (LoRA) or any other module is not a plain x @ W.T + b
                return f"the {name}'s output layer is {type(head).__name__}, not a plain torch.nn.Linear"
            text = m.config.get_text_config()
            for field in LOGIT_POSTPROCESSING:
                value = getattr(text, field, None)
                if value not in (None, 1, 1.0):
                    return f"the {name} changes its logits after the head ({field}={value})"
        return None

    def _head_taps(self, model) -> tuple[HeadTap | None, HeadTap | None]:
        """Hooks on the student's and the teacher's output layers when the logit losses go through them.

        The first batch runs the full heads, to check that ``head(hidden)`` is the model's logits; later
        batches let each head compute one position only. A teacher whose logits no loss reads (alpha=0) computes
        one position from the first batch on, whatever the chunking.
        """
        cached = self.teacher is None  # teacher_cache: top-k targets read from disk, through the student's head
        if not cached and len(self.teachers) != 1:
            # Several teachers (a mixture target): the full logits, chunked.
            return None, None
        trim = None if cached or self.args.uses_teacher_logits else self._unused_teacher_head()
        if self._head_route is False or self.task not in HEAD_TASKS or not self._logit_chunk_size():
            return None, trim
        student = unwrap(self.accelerator.unwrap_model(model))
        if self._head_route is None:
            problem = self._head_route_problem(student, self.teacher)
            if problem:
                logger.info("Chunked logit losses start from the full logits: %s.", problem)
                self._head_route = False
                return None, trim
        keep = None if self._head_route is None else 1
        s_tap = HeadTap(student.get_output_embeddings(), keep)
        if cached:
            return s_tap, None
        t_tap = HeadTap(self.teacher.get_output_embeddings(), keep) if self.args.uses_teacher_logits else trim
        return s_tap, t_tap

    def _unused_teacher_head(self) -> HeadTap | None:
        """A tap that stops the teacher's head from making logits nobody reads (its hidden states still are)."""
        if self.task not in HEAD_TASKS or self._teacher_runner is not self.teacher:
            return None
        head = self.teacher.get_output_embeddings()
        return HeadTap(head, keep=1) if type(head) is nn.Linear else None

    def _verified_heads(self, s_tap, t_tap, s_out, t_out) -> tuple[HeadTap, HeadTap | None] | None:
        """The taps when the route is on; on the first batch, after checking that they reproduce the logits."""
        if s_tap is None:
            return None
        if not self.args.uses_teacher_logits:
            t_tap = None  # the teacher's tap only trims its unused logits (with a cache `_head_taps` gives none)
        if self._head_route is None:
            ok = s_tap.reproduces(s_out.logits) and (t_tap is None or t_tap.reproduces(t_out.logits))
            self._head_route = ok
            if not ok:
                logger.info(
                    "Chunked logit losses start from the full logits: the output layer applied to its input does not "
                    "give the model's logits (something happens after the head, or it runs more than once)."
                )
                return None
        return s_tap, t_tap

    def _head_logit_terms(self, heads, inputs, targets: _Targets, counts, components, temperature, alpha) -> torch.Tensor:
        """The weighted KD and CE terms from the hidden states entering the heads, chunked (no logits made)."""
        args: DistillationConfig = self.args
        s_tap, t_tap = heads
        hs, ht = s_tap.hidden, t_tap.hidden if t_tap is not None else None  # (B, T, D)
        if self.task == "causal_lm":  # position i predicts token i+1, as in `_targets`
            hs, ht = hs[:, :-1], ht[:, :-1] if ht is not None else None  # (B, T-1, D)
        labels = targets.labels[0]
        scale = 1.0 if args.kd_loss == "mse" else temperature**2
        kd_weight = alpha * scale if args.uses_teacher_logits else None
        ce_weight = 1 - alpha if labels is not None and alpha < 1 else None
        if kd_weight is None and ce_weight is None:
            return torch.zeros((), device=hs.device)
        topk = None
        if kd_weight is not None and self.teacher is None:  # teacher_cache: its rows of this batch, checked
            from .teacher_cache import cached_topk

            topk = cached_topk(inputs, targets.mask)
            temperature = args.temperature  # the cache's (temperature schedules are refused with a cache)
        out = linear_head_loss(
            hs, s_tap.head.weight, ht, t_tap.head.weight if t_tap is not None else None, targets.mask, labels,
            teacher_topk=topk,
            student_bias=s_tap.head.bias, teacher_bias=t_tap.head.bias if t_tap is not None else None,
            kd_weight=kd_weight, ce_weight=ce_weight, kind=args.kd_loss, temperature=temperature,
            jsd_beta=args.jsd_beta, normalizer=counts["logit"], ce_normalizer=counts["label"],
            chunk_size=self._logit_chunk_size(), student_dtype=s_tap.dtype,
            teacher_dtype=t_tap.dtype if t_tap is not None else None,
        )
        if out.kd is not None:
            components["kd_loss"] = out.kd
        if out.ce is not None:
            components["ce_loss"] = out.ce
        return out.loss

    def _nonfinite_message(self, components, s_out, t_out) -> tuple[str, list[str]]:
        """What was not finite at which step, and where it came from."""
        step = self.state.global_step + 1  # the optimizer step being computed
        bad = [name for name, v in components.items() if not torch.isfinite(v).all()] or ["loss (total)"]
        sources = []
        for who, out in (("student", s_out), ("teacher", t_out)):
            if out is None:
                continue
            for key in ("logits", "start_logits", "end_logits", "hidden_states", "attentions", "encoder_hidden_states",
                        "decoder_hidden_states", "encoder_attentions", "decoder_attentions"):
                value = getattr(out, key, None)
                tensors = value if isinstance(value, (tuple, list)) else [value]
                if any(torch.is_tensor(t) and not torch.isfinite(t).all() for t in tensors):
                    sources.append(f"the {who}'s {key}")
        where = f" ({', '.join(sources)} hold NaN/inf)" if sources else ""
        return f"non-finite {', '.join(bad)} at step {step}{where}", bad

    def _stop_nonfinite(self, components, s_out, t_out, here: bool = True):
        """nonfinite_loss="stop": raise, on every process with the same message when there are several."""
        message = self._nonfinite_message(components, s_out, t_out)[0] if here else None
        world = self.args.world_size
        if world > 1:
            reports = distributed.gather_messages(message, world)
            message = "; ".join(f"{m} on process {rank} of {world}" for rank, m in enumerate(reports) if m)
        raise NonFiniteLossError(
            f"{message}. Training stopped before this step's backward pass"
            + (" on every process" if world > 1 else "")
            + "; no checkpoint was written after it. Lower learning_rate or the temperature, check the data of "
            "this step, use bf16 instead of fp16, or set nonfinite_loss='skip' to drop such batches."
        )

    def _nonfinite(self, model, components, s_out, t_out, return_outputs):
        """A NaN/inf loss: stop with the step and the component, or drop this micro-batch's gradient."""
        if self.args.nonfinite_loss == "stop":
            self._stop_nonfinite(components, s_out, t_out)
        message, bad = self._nonfinite_message(components, s_out, t_out)
        step = self.state.global_step + 1
        # Not collective: the zero below reaches every student parameter, so DDP's all-reduce still runs here,
        # and the projections' gradients are averaged whether or not this process has any.
        logger.warning("%s: this batch's gradient is dropped (nonfinite_loss='skip').", message)
        self.skipped_steps.append((step, ", ".join(bad)))
        # A zero connected to every trainable parameter: backward gives exact zero gradients (and DDP sees them all).
        params = [p for p in model.parameters() if p.requires_grad]
        zero = sum((p.reshape(-1)[:1] * 0).sum() for p in params) if params else torch.zeros((), device=self.args.device)
        zero = zero.float()
        return (zero, s_out) if return_outputs else zero

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: Trainer logs it on every process at the same step
            steps = max(self._steps_since_log, 1)
            device = self.args.device
            sums = [torch.as_tensor(self._component_sums.get(name, 0.0), dtype=torch.float32, device=device)
                    for name in COMPONENTS]
            seen = [float(name in self._component_sums) for name in COMPONENTS]
            # One all-reduce of a fixed-size vector: every process takes part even where a component is absent
            # (a micro-batch skipped as non-finite). Each process holds its items' share of the whole batch's
            # mean (the normalisers count every process's items), so the sum over processes is that mean:
            # the number one process with the whole batch logs.
            totals = distributed.sum_over_processes(torch.cat([torch.stack(sums), torch.tensor(seen, device=device)]),
                                                    self.accelerator).tolist()
            for i, name in enumerate(COMPONENTS):
                if totals[len(COMPONENTS) + i] > 0:
                    logs[name] = totals[i] / steps
            # A scheduled temperature / alpha: the value the window's last optimizer step used.
            for name in ("temperature", "alpha"):
                if getattr(self.args, f"{name}_schedule") != "constant":
                    logs[name] = self._scheduled(name, self.state.global_step - 1)
            self._component_sums = {}
            self._steps_since_log = 0
        super().log(logs, start_time)

    # ------------------------------------------------------------------ publishing (see hf_kd.hub)
    #: What the trainer cannot know about the run (command, dataset, split, student initialisation...),
    #: for the model card and the provenance record: set ``trainer.card_info = hf_kd.CardInfo(...)``.
    card_info: hub.CardInfo | None = None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if eval_dataset is None and self.eval_dataset is not None and not isinstance(self.eval_dataset, dict):
            # Results on the trainer's own evaluation split are the ones the model card reports.
            role = "teacher" if self._evaluating_teacher else "student"
            self._evaluations[role] = (self.state.global_step, metric_key_prefix, dict(metrics))
        return metrics

    def recorded_evaluation(self, role: str = "student") -> tuple[int, str, dict] | None:
        """The last evaluation of `role` ("student" or "teacher") on the trainer's eval_dataset, as
        ``(global_step, metric_key_prefix, metrics)``, or None."""
        return self._evaluations.get(role)

    def evaluate_teacher(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "teacher_eval"):
        """The teacher's metrics through the student's evaluation loop: same data, collator, batches, `compute_metrics`.

        Returns `evaluate`'s dict with keys ``teacher_eval_*``; they are logged like the student's.
        """
        if self.teacher is None:
            raise InputError(
                f"there is no teacher to evaluate: this trainer reads its targets from teacher_cache="
                f"{self.args.teacher_cache}. Load the teacher and evaluate it with transformers.Trainer."
            )
        self._evaluating_teacher = True
        try:
            return self.evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._evaluating_teacher = False

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self._evaluating_teacher:
            model = self._teacher_runner
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:  # every save, checkpoints too: what made these weights
            hub.write_provenance(output_dir if output_dir is not None else self.args.output_dir, self._provenance())

    @contextlib.contextmanager
    def _student_as_saved(self, final: bool):
        """``merge_adapter_on_save``: during a final save (not a checkpoint), ``self.model`` is a copy of the PEFT
        student with its adapter merged, so the folder holds a plain Transformers model; training is unaffected."""
        student = self.accelerator.unwrap_model(self.model)
        if not (final and self.args.merge_adapter_on_save and adapters.is_peft_model(student)):
            yield
            return
        if self._backend.shards_models:
            logger.warning("merge_adapter_on_save is not supported under %s: the adapter is saved.", self._backend.name)
            yield
            return
        self._evaluate_for_card()  # on the student being trained; the merged copy computes the same function
        model, self.model = self.model, adapters.merged_copy(student)
        try:
            yield
        finally:
            self.model = model

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the student (config, safetensors, tokenizer) with its provenance, and, when called by the user
        (not for a checkpoint), its model card.

        For the card, the student and the teacher are evaluated on ``eval_dataset`` unless that was done
        at this step already, and both are timed on one evaluation batch (see `hf_kd.hub.CardInfo`).
        With ``push_to_hub`` the folder is then pushed, as Trainer does. Call it on every process, as Trainer
        asks (evaluation is collective); only the main process writes.
        """
        with self._student_as_saved(final=not _internal_call):
            super().save_model(output_dir, _internal_call=True)
            if _internal_call:
                return
            self._evaluate_for_card()
            if self.args.should_save:
                self._write_card(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def create_model_card(
        self,
        language=None,
        license=None,
        tags=None,
        model_name=None,
        finetuned_from=None,
        tasks=None,
        dataset_tags=None,
        dataset=None,
        dataset_args=None,
        output_dir: str | None = None,
    ) -> None:
        """Write hf_kd's model card (README.md) and provenance into ``output_dir`` (default ``args.output_dir``).

        Trainer's arguments override `card_info` (``finetuned_from`` is the ``base_model``); ``tasks``,
        ``dataset_tags`` and ``dataset_args`` are not used: the task comes from the model. Uses the
        evaluations already run (see `save_model`), so it may be called on the main process alone.
        """
        if not self.is_world_process_zero():
            return
        if isinstance(dataset, (list, tuple)):
            dataset = dataset[0] if dataset else None
        if isinstance(tags, str):
            tags = [tags]
        self._write_card(
            output_dir if output_dir is not None else self.args.output_dir,
            language=language, license=license, tags=tags, model_name=model_name, base_model=finetuned_from,
            dataset=dataset,
        )

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, token=None,
                    revision=None, private=None, **kwargs):
        """Publish the student alone to ``args.hub_model_id``: save it with its provenance and card first, then
        upload `hf_kd.hub.publishable_files` (no pickles, no projection heads, no checkpoints) in one commit.

        When the Hub cannot be reached this raises `hf_kd.hub.PushError`; the saved folder stays complete
        and ``hf-kd push --model OUTPUT_DIR --repo_id NAME`` publishes it later. ``kwargs`` go to
        `create_model_card`.
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        repo_id = self.hub_model_id or self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        model_name = kwargs.pop("model_name", None) or repo_id.split("/")[-1]
        token = token if token is not None else self.args.hub_token
        model_tags = getattr(unwrap(self.model), "model_tags", None)
        if model_tags:
            tags = kwargs.get("tags") or []
            tags = [tags] if isinstance(tags, str) else list(tags)
            kwargs["tags"] = tags + [t for t in model_tags if t not in tags]
        # Everything is on disk before the Hub is contacted: a failed push loses nothing.
        with self._student_as_saved(final=True):
            self.save_model(_internal_call=True)
            self._evaluate_for_card()
            if not self.is_world_process_zero():
                return None
            self.create_model_card(model_name=model_name, **kwargs)
        self._finish_current_push()
        return hub.push_student(
            self.args.output_dir,
            repo_id,
            create_repo=self.hub_model_id is None,  # else init_hf_repo made it
            token=token,
            private=private if private is not None else self.args.hub_private_repo,
            revision=revision if revision is not None else self.args.hub_revision,
            commit_message=commit_message or "Upload a student distilled with hf_kd",
            run_as_future=not blocking,
        )

    def init_hf_repo(self, token=None, private=None) -> None:
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            raise hub.PushError(
                f"hub_strategy={self.args.hub_strategy.value!r} uploads whole checkpoints (optimizer state and "
                "training arguments as pickles, projection heads); hf_kd publishes the student alone. Use "
                "hub_strategy='every_save' or 'end', and resume from the local checkpoints."
            )
        try:
            # `private` only when given: Trainer.init_hf_repo of transformers 5.17 and older takes no such argument
            super().init_hf_repo(token=token, **({} if private is None else {"private": private}))
        except Exception as err:  # noqa: BLE001 - every Hub failure becomes one clear message
            reason, hint = hub.failure_reason(err)
            repo = self.args.hub_model_id or "NAME"
            raise hub.PushError(
                f"push_to_hub is set, but the Hub repository {repo} could not be created: {reason}\n  {hint}\n"
                "  Training has not started. Train with push_to_hub=False (the student is saved in "
                f"{self.args.output_dir}) and publish it later with: hf-kd push --model {self.args.output_dir} "
                f"--repo_id {repo}"
            ) from err

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Trainer's push at each save (hub_strategy every_save), limited to the student's files."""
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        from transformers.utils.hub import PushInProgress

        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        output_dir = self.args.output_dir
        for name in hub.publishable_files(checkpoint_folder):
            shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(output_dir, name))
        repo_id = self.hub_model_id or self.args.hub_model_id
        self._write_card(output_dir, measure=False, model_name=repo_id.split("/")[-1] if repo_id else None)
        if self.args.save_strategy == "steps":
            message = f"Training in progress, step {self.state.global_step}"
        else:
            message = f"Training in progress, epoch {int(self.state.epoch or 0)}"
        job = hub.push_student(
            output_dir, repo_id, token=self.args.hub_token, revision=self.args.hub_revision, commit_message=message,
            create_repo=False, run_as_future=True,
        )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress([job])
        else:
            self.push_in_progress.jobs.append(job)

    # ---------------------------------------------------- the record behind provenance and card
    def _evaluate_for_card(self) -> None:
        """Evaluate student (at this step) and teacher (once) on eval_dataset, unless already done. All processes."""
        info = self.card_info or hub.CardInfo()
        if not info.evaluate or self.eval_dataset is None or isinstance(self.eval_dataset, dict):
            return
        student = self._evaluations.get("student")
        if student is None or student[0] != self.state.global_step:
            self.evaluate()
        if "teacher" not in self._evaluations and self.teacher is not None:  # frozen: one evaluation serves all
            self.evaluate_teacher()

    def _teacher_sha256(self) -> str:
        if "teacher_sha256" not in self._card_cache:  # filled at start-up when the teacher is sharded
            self._card_cache["teacher_sha256"] = hub.weights_sha256(self.teacher)
        return self._card_cache["teacher_sha256"]

    def _teacher_parameters(self) -> int:
        if "teacher_parameters" not in self._card_cache:
            self._card_cache["teacher_parameters"] = count_parameters(self.teacher)
        return self._card_cache["teacher_parameters"]

    def _teacher_records(self) -> list[dict]:
        """Name, class, parameters, weights hash and weight of every teacher (cached; computed before sharding)."""
        if "teachers" not in self._card_cache:
            records = []
            for i, (teacher, source, weight) in enumerate(zip(self.teachers, self._teacher_sources, self.teacher_weights)):
                records.append({
                    "name_or_path": source or unwrap(teacher).config.name_or_path or type(unwrap(teacher)).__name__,
                    "class": type(teacher).__name__,
                    "parameters": self._teacher_parameters() if i == 0 else count_parameters(teacher),
                    "weights_sha256": self._teacher_sha256() if i == 0 else hub.weights_sha256(teacher),
                    "weight": weight,
                })
            self._card_cache["teachers"] = records
        return self._card_cache["teachers"]

    def _provenance(self, overrides: dict | None = None) -> dict:
        """What made the student: versions, command, teacher (name, revision, weights hash), settings, config."""
        import datetime

        import transformers

        from . import __version__

        info = self.card_info or hub.CardInfo()
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        args: DistillationConfig = self.args
        wrapped = self.accelerator.unwrap_model(self.model)
        student = unwrap(wrapped)
        cached = self._cache_meta["teacher"] if self._cache_meta is not None else None
        loaded_from = self.teacher.config.name_or_path if cached is None else cached["name_or_path"]
        teacher_name = info.teacher or self._teacher_source or loaded_from
        base_model = overrides.get("base_model") or info.base_model
        if base_model is None and hub.is_hub_id(teacher_name):
            base_model = teacher_name
        kd = {"kd_loss": args.kd_loss, "temperature": args.temperature, "alpha": args.alpha}
        for name in ("temperature", "alpha"):  # a schedule: from the value above to *_end
            if getattr(args, f"{name}_schedule") != "constant":
                kd.update({f"{name}_schedule": getattr(args, f"{name}_schedule"), f"{name}_end": getattr(args, f"{name}_end")})
        if args.kd_loss == "jsd":
            kd["jsd_beta"] = args.jsd_beta
        kd.update(hidden_weight=args.hidden_weight, hidden_loss=args.hidden_loss,
                  attention_weight=args.attention_weight, attention_loss=args.attention_loss,
                  layer_map=args.layer_map, hidden_pairs=[list(p) for p in self.hidden_pairs],
                  attention_pairs=[list(p) for p in self.attention_pairs], projections=len(self.projections),
                  **({"decoder_layer_map": args.decoder_layer_map} if args.decoder_layer_map is not None else {}),
                  **self._decoder_pairs_record())
        kd.update(self._relation_settings())
        eval_split = info.eval_split or getattr(self.eval_dataset, "split", None)
        command = info.command or (
            f"{hub.command_line()}  # Python API (hf_kd.DistillationTrainer): the settings are in {hub.PROVENANCE_NAME}"
        )
        return {
            "hf_kd_version": __version__,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model_name": overrides.get("model_name") or info.model_name,
            "task": self.task,
            "command": command,
            "license": overrides.get("license") or info.license,
            "language": overrides.get("language") or info.language,
            "tags": list(dict.fromkeys([*info.tags, *overrides.get("tags", [])])),
            "teacher": {
                "name_or_path": teacher_name,
                "note": info.teacher_note if cached is None else "; ".join(filter(None, [
                    info.teacher_note, f"its outputs were read from the cache {args.teacher_cache} "
                    f"(top-{self._cache_meta['top_k']} logits at temperature {self._cache_meta['temperature']})"])),
                "loaded_from": loaded_from,
                "revision": getattr(self.teacher.config, "_commit_hash", None) if cached is None else None,
                "class": self._teacher_class,
                "parameters": self._teacher_parameters(),
                "weights_sha256": self._teacher_sha256(),
            },
            **({"teachers": self._teacher_records()} if len(self.teachers) > 1 else {}),
            "student": {
                "init": info.student_init or f"the given model {student.config.name_or_path or type(student).__name__}",
                "class": type(student).__name__,
                "adapter": student is not wrapped,  # a PEFT model: the folder holds the adapter only
                "base_model": base_model,
                "parameters": count_parameters(student),
            },
            "distillation": kd,
            "data": {
                "dataset": overrides.get("dataset") or info.dataset,
                "dataset_config": info.dataset_config,
                "train_split": info.train_split,
                "eval_split": str(eval_split) if eval_split is not None else None,
                "train_rows": _length(self.train_dataset),
                "eval_rows": _length(self.eval_dataset),
            },
            "training": {
                "global_step": self.state.global_step,
                "epoch": self.state.epoch,
                "learning_rate": args.learning_rate,
                "per_device_train_batch_size": args.per_device_train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "world_size": args.world_size,
                "seed": args.seed,
            },
            "config": args.to_dict(),  # tokens are masked by TrainingArguments.to_dict
            "extra": info.extra,
        }

    def _card_evaluation(self, split) -> dict | None:
        out = {}
        student, teacher = self._evaluations.get("student"), self._evaluations.get("teacher")
        if student is not None and student[0] == self.state.global_step:  # an older step describes other weights
            out["student"] = hub.card_metrics(student[2], student[1])
        if teacher is not None:
            out["teacher"] = hub.card_metrics(teacher[2], teacher[1])
        return {"split": split, "rows": _length(self.eval_dataset), **out} if out else None

    def _latency_batch(self) -> dict | None:
        """One evaluation batch (training rows when there is no eval_dataset), collated and on the device."""
        dataset = self.eval_dataset if not isinstance(self.eval_dataset, dict) else None
        dataset = dataset if dataset is not None else self.train_dataset
        n = min(self.args.eval_batch_size, _length(dataset) or 0)
        if n == 0:
            return None
        collate = self._get_collator_with_removed_columns(self.data_collator, "latency")
        batch = self._prepare_inputs(collate([dataset[i] for i in range(n)]))
        return {k: v for k, v in self._split_inputs(batch).items() if torch.is_tensor(v)}

    def _measurements(self, folder, latency: bool) -> dict:
        from .measure import measure_latency_ms, size_on_disk_mb

        student = unwrap(self.accelerator.unwrap_model(self.model))
        if "teacher_size" not in self._card_cache and not self._backend.shards_models:
            source = self.teacher.config.name_or_path
            if source and Path(source).is_dir() and size_on_disk_mb(source) > 0:
                self._card_cache["teacher_size"] = (size_on_disk_mb(source), "the weight files of its folder")
            else:
                self._card_cache["teacher_size"] = (hub.weights_size_mb(self.teacher), "its weights in their dtype")
        t_size, t_source = self._card_cache.get("teacher_size", (None, "unknown: the teacher was partitioned at load"))
        out = {
            "device": str(self.args.device),
            "threads": torch.get_num_threads(),
            "batch_sizes": [],
            "student": {"parameters": count_parameters(student), "size_mb": size_on_disk_mb(folder)},
            "teacher": {"parameters": self._teacher_parameters(), "size_mb": t_size, "size_source": t_source},
        }
        cached = self._card_cache.get("latency")
        if latency and (cached is None or cached[0] != self.state.global_step):
            batch = self._latency_batch()
            if batch is not None:
                sizes = sorted({1, next(iter(batch.values())).shape[0]})
                timings = {
                    role: {str(b): measure_latency_ms(model, {k: v[:b] for k, v in batch.items()},
                                                      repeats=5 if b == 1 else 3, warmup=1) for b in sizes}
                    for role, model in (("student", student), ("teacher", self.teacher)) if model is not None
                }
                cached = self._card_cache["latency"] = (self.state.global_step, sizes, timings)
        if latency and cached is not None and cached[0] == self.state.global_step:
            out["batch_sizes"] = cached[1]
            out["method"] = "median of 5 forward passes at batch 1, of 3 at larger batches, after a warm-up"
            for role in cached[2]:
                out[role]["latency_ms"] = cached[2][role]
        return out

    def _write_card(self, folder, measure: bool = True, **overrides) -> None:
        """Write the full record to the provenance file and render the model card from it (main process)."""
        info = self.card_info or hub.CardInfo()
        record = self._provenance(overrides)
        record["model_name"] = record["model_name"] or Path(folder).absolute().name
        record["evaluation"] = self._card_evaluation(record["data"]["eval_split"])
        # Only the main process writes the card: models split over the processes cannot run a forward pass
        # on it alone (the others would never join), so their latency is not measured.
        latency = measure and info.measure_latency and not self._backend.shards_models
        record["measurements"] = self._measurements(folder, latency=latency)
        hub.write_provenance(folder, record)
        hub.render_card(record).save(Path(folder) / hub.CARD_NAME)


def _length(dataset) -> int | None:
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:  # an IterableDataset
        return None
