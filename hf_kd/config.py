"""`DistillationConfig`: `transformers.TrainingArguments` plus the distillation settings.

Every Trainer flag keeps its meaning; the fields below add the loss. The total loss is

    alpha * T^2 * D(teacher || student, softened by T) + (1 - alpha) * CE(student, labels)
    + hidden_weight * hidden + attention_weight * attention + relation_weight * relation

where the CE term is present only when the batch has labels. For ``kd_loss="mse"`` D is the mean
squared error of the raw logits and neither T nor T^2 applies (T^2 only compensates for the 1/T^2
that softening puts on the gradients of the softened distributions).

T and alpha may change from step to step (``temperature_schedule`` / ``alpha_schedule``, see
`hf_kd.schedules`); the formula then uses each optimizer step's values.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, TrainingArguments

from .adapters import peft_config_dict
from .losses import ATTENTION_LOSSES, HIDDEN_LOSSES, KD_LOSSES
from .relations import RELATION_LOSSES, RELATION_POOLINGS
from .schedules import SCHEDULES, schedule_value
from .teachers import weight_problems

#: attention_loss values: the attention-map losses of hf_kd.losses, and MiniLM q/k/v relations (hf_kd.relations).
ATTENTION_CHOICES = (*ATTENTION_LOSSES, "minilm")
LAYER_MAP_NAMES = ("uniform", "last")
NONFINITE_ACTIONS = ("stop", "skip")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
#: cross_tokenizer_loss values (causal LM across tokenizers, see hf_kd.cross_losses).
CROSS_TOKENIZER_LOSSES = ("uld", "hybrid")


#: Generation of completions when generation_config is not set: the student's own distribution, sampled.
DEFAULT_GENERATION = {"max_new_tokens": 128, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}


def generation_config_of(value: Any) -> GenerationConfig:
    """A `GenerationConfig` from one, a dict, JSON text, a folder/file holding generation_config.json, or None."""
    if isinstance(value, GenerationConfig):
        return value
    if value is None:
        return GenerationConfig(**DEFAULT_GENERATION)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            value = json.loads(text)
        else:
            folder, name = (os.path.dirname(text), os.path.basename(text)) if os.path.isfile(text) else (text, None)
            if not os.path.exists(os.path.join(folder, name or "generation_config.json")):
                raise ValueError(f"{value!r} is neither JSON nor a file or folder holding generation_config.json.")
            return GenerationConfig.from_pretrained(folder, config_file_name=name)
    if not isinstance(value, dict):
        raise ValueError(f"{value!r} is not a GenerationConfig, dict, JSON text or path.")
    merged = {**DEFAULT_GENERATION, **value}
    if not merged["do_sample"]:  # greedy: the sampling defaults do not apply
        merged = {k: v for k, v in merged.items() if k in value or k not in ("temperature", "top_p", "top_k")}
    return GenerationConfig(**merged)


def parse_layer_map(value: Any) -> str | list[list[int]]:
    """Normalise a `layer_map` value: "uniform", "last", or explicit [[student, teacher], ...].

    A string holding JSON (as it arrives from the command line) is decoded. Raises ValueError with
    the accepted forms when the value is none of them, has duplicates or negative layers.
    """
    if isinstance(value, str):
        stripped = value.strip()
        if stripped in LAYER_MAP_NAMES:
            return stripped
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            raise ValueError(
                f"layer_map={value!r} is not understood. Use 'uniform', 'last', or explicit pairs "
                "such as [[1, 2], [2, 4]] (student layer, teacher layer; layers count from 1, "
                "0 is the embedding output)."
            ) from None
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not value:
        raise ValueError(
            f"layer_map={value!r} must be 'uniform', 'last' or a non-empty list of "
            "[student_layer, teacher_layer] pairs, e.g. [[1, 2], [2, 4]]."
        )
    pairs = []
    for pair in value:
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
        ):
            raise ValueError(
                f"layer_map entry {pair!r} is not a [student_layer, teacher_layer] pair of integers; "
                "write the map as [[1, 2], [2, 4]]."
            )
        if pair[0] < 0 or pair[1] < 0:
            raise ValueError(f"layer_map entry {list(pair)} has a negative layer; layers count from 0 (embeddings).")
        pairs.append([int(pair[0]), int(pair[1])])
    seen: set[tuple[int, int]] = set()
    students: set[int] = set()
    for s, t in pairs:
        if (s, t) in seen:
            raise ValueError(f"layer_map has the pair [{s}, {t}] twice; list each pair once.")
        if s in students:
            raise ValueError(
                f"layer_map maps student layer {s} more than once; give each student layer one teacher layer."
            )
        seen.add((s, t))
        students.add(s)
    return pairs


def _has_accelerator() -> bool:
    """A device that runs fp16 mixed precision: CUDA (or ROCm), XPU, NPU, MPS."""
    checks = (torch.cuda, getattr(torch, "xpu", None), getattr(torch, "npu", None), getattr(torch.backends, "mps", None))
    return any(c is not None and c.is_available() for c in checks)


def _unknown(name: str, value, choices: tuple, use: str | None = None) -> list[str]:
    """[the problem] when ``value`` is none of ``choices``, else []."""
    if value in choices:
        return []
    return [f"{name}={value!r} is unknown; use {use or 'one of ' + ', '.join(choices)}."]


@dataclass
class DistillationConfig(TrainingArguments):
    """Training arguments for `DistillationTrainer`.

    The distillation fields come first in `--help`; all of `TrainingArguments` follows unchanged.
    """

    temperature: float = field(
        default=2.0,
        metadata={"help": "Softmax temperature T applied to teacher and student logits (> 0); the start value under a "
        "temperature_schedule."},
    )
    alpha: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the logit distillation term; (1 - alpha) weighs the hard-label cross-entropy. The "
            "start value under an alpha_schedule."
        },
    )
    temperature_schedule: str = field(
        default="constant",
        metadata={
            "help": "How T moves over training: constant, linear or cosine from `temperature` at the first "
            "optimizer step to `temperature_end` at the last (see hf_kd.schedules).",
            "choices": list(SCHEDULES),
        },
    )
    temperature_end: float | None = field(
        default=None, metadata={"help": "T at the last optimizer step (> 0); only with a temperature_schedule."}
    )
    alpha_schedule: str = field(
        default="constant",
        metadata={
            "help": "How alpha moves over training: constant, linear or cosine from `alpha` at the first "
            "optimizer step to `alpha_end` at the last.",
            "choices": list(SCHEDULES),
        },
    )
    alpha_end: float | None = field(
        default=None, metadata={"help": "alpha at the last optimizer step, in [0, 1]; only with an alpha_schedule."}
    )
    kd_loss: str = field(
        default="forward_kl",
        metadata={
            "help": "Logit divergence: forward_kl = KL(teacher||student), reverse_kl = KL(student||teacher), "
            "jsd (see jsd_beta), mse (raw logits).",
            "choices": list(KD_LOSSES),
        },
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={"help": "JSD mixture weight of the teacher, in (0, 1); 0.5 is the symmetric JS divergence."},
    )
    hidden_weight: float = field(default=0.0, metadata={"help": "Weight of the hidden-state loss (>= 0)."})
    hidden_loss: str = field(
        default="mse",
        metadata={"help": "Hidden-state loss per token: mse or cosine.", "choices": list(HIDDEN_LOSSES)},
    )
    attention_weight: float = field(default=0.0, metadata={"help": "Weight of the attention loss (>= 0)."})
    attention_loss: str = field(
        default="mse",
        metadata={
            "help": "Attention loss: mse on attention probabilities (TinyBERT), kl between attention rows, or minilm: "
            "KL between query-query, key-key and value-value relations (MiniLMv2; see minilm_relation_heads).",
            "choices": list(ATTENTION_CHOICES),
        },
    )
    minilm_relation_heads: int | None = field(
        default=None,
        metadata={
            "help": "attention_loss=minilm: number of relation heads R the q/k/v vectors are split into (R must divide "
            "the widths of both models). Default: the teacher's number of attention heads, when it divides them."
        },
    )
    relation_weight: float = field(
        default=0.0, metadata={"help": "Weight of the sample-relation loss between the examples of a batch (>= 0)."}
    )
    relation_loss: str = field(
        default="rkd",
        metadata={
            "help": "Sample relations on one embedding per example: rkd_distance, rkd_angle (Park et al. 2019), "
            "rkd = distance + 2 * angle, similarity (Tung & Mori 2019). Computed per micro-batch.",
            "choices": list(RELATION_LOSSES),
        },
    )
    relation_pooling: str = field(
        default="first",
        metadata={
            "help": "Embedding of an example for relation_loss, from the last hidden state, for sequence "
            "classification and question answering: first (the first valid token, [CLS]) or mean over valid "
            "tokens. Token-level tasks always use the mean.",
            "choices": list(RELATION_POOLINGS),
        },
    )
    layer_map: str | None = field(
        default="uniform",
        metadata={
            "help": "Student-to-teacher layer map for hidden and attention losses: 'uniform' (student layer k "
            "to teacher layer round(k*Lt/Ls)), 'last', or JSON pairs such as [[1,2],[2,4]]. Layers count "
            "from 1; 0 (embedding output) is allowed for the hidden loss only. Encoder-decoder models: the encoders' map "
            "(see decoder_layer_map)."
        },
    )

    decoder_layer_map: str | None = field(
        default=None,
        metadata={
            "help": "Encoder-decoder models (T5, BART...) only: the layer map of the decoders, in the forms of "
            "layer_map, which then maps the encoders. Default (None): the value of layer_map, resolved against "
            "the decoders' depths."
        },
    )

    nonfinite_loss: str = field(
        default="stop",
        metadata={
            "help": "What a non-finite (NaN/inf) loss component does: stop = raise with the step and the component, "
            "before any backward pass or checkpoint; skip = drop that micro-batch's gradient and log a warning.",
            "choices": list(NONFINITE_ACTIONS),
        },
    )
    peft_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "Train the student through a PEFT adapter (only the adapter and the task head train): a dict or "
            'JSON such as {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}, or a peft.LoraConfig. '
            "peft_type defaults to LORA, task_type to the student's task. See hf_kd.adapters."
        },
    )
    merge_adapter_on_save: bool = field(
        default=False,
        metadata={
            "help": "With a PEFT student: save_model() writes a plain Transformers model with the adapter merged "
            "(loadable without peft); default False saves the adapter alone. Checkpoints always hold the adapter."
        },
    )
    teacher_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "With several teachers: one weight per teacher (>= 0, normalised to sum 1; default equal). The "
            "logit target is the weighted mixture of the teachers' softened distributions (see hf_kd.teachers)."
        },
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype the teacher runs in: auto = the student's dtype; float32, bfloat16 or float16 to keep a "
            "teacher in another dtype than the student (e.g. bfloat16 to halve its memory). Losses are fp32 anyway.",
            "choices": list(TEACHER_DTYPES),
        },
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "A folder made by `hf-kd cache-teacher`: read the teacher's top-k logits (and hidden states) "
            "from it instead of running the teacher; train on the dataset saved there, with teacher_model=None."
        },
    )

    logit_chunk_size: int = field(
        default=0,
        metadata={
            "help": "Token-level tasks: compute the logit losses this many positions at a time, so no "
            "tokens x vocabulary fp32 tensor exists (causal/masked/seq2seq LM: from the hidden states through the "
            "head, the full logits are never made). 0 = auto (when the vocabulary has >= 8192 entries, chunks "
            "of 2^24 / vocabulary positions: 512 for 32k), -1 = never chunk. Same loss and gradients either way.",
        },
    )


    # ---- generated completions (hf_kd.distill.rollout, hf_kd.prompts, docs/generation.md)
    lmbda: float = field(
        default=0.0,
        metadata={"help": "Prompt-completion data: the share of accumulation windows whose completions the student "
                  "generates (on-policy distillation, GKD's lambda), in [0, 1]; the start value under an lmbda_schedule."},
    )
    lmbda_schedule: str = field(
        default="constant",
        metadata={"help": "How lmbda moves over training, like temperature_schedule.", "choices": list(SCHEDULES)},
    )
    lmbda_end: float | None = field(
        default=None, metadata={"help": "lmbda at the last optimizer step, in [0, 1]; only with an lmbda_schedule."}
    )
    seq_kd: bool = field(
        default=False,
        metadata={"help": "Windows the student does not generate for get completions generated by the teacher "
                  "(sequence-level KD, Kim & Rush 2016) instead of the dataset's."},
    )
    generation_config: dict | str | None = field(
        default=None,
        metadata={"help": "How completions are generated: a transformers.GenerationConfig, a dict or JSON of its fields "
                  "(max_new_tokens, do_sample, top_p, top_k and its own sampling temperature; `temperature` above "
                  "stays the distillation's), or a folder/file holding generation_config.json. Default: "
                  f"{{{', '.join(f'{k!r}: {v!r}' for k, v in DEFAULT_GENERATION.items())}}}."},
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Prompt-completion data: keep the last this many prompt tokens (None = whole prompts)."},
    )
    eval_generation: bool = field(
        default=False,
        metadata={"help": "evaluate() also lets the student generate on the evaluation prompts and logs eval_gen_* "
                  "metrics (teacher NLL per token, reverse KL per token, agreement with the teacher's greedy "
                  "completions, length, EOS rate, distinct-2); see docs/generation.md."},
    )

    # ---- across tokenizers (hf_kd.distill.vocab, hf_kd.distill.cross_tokenizer, docs/cross-tokenizer.md)
    teacher_tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Folder or Hub name of the teacher's tokenizer when it is not the student's: the teacher reads its "
            "own tokenization of each batch's text (decoded from the student's ids) and the losses are aligned by "
            "character offsets. Unset: both models read the same input_ids (one tokenizer padded to two sizes is cut "
            "to the shared vocabulary automatically)."
        },
    )
    cross_tokenizer_loss: str = field(
        default="hybrid",
        metadata={
            "help": "Causal LM with teacher_tokenizer: uld = distance between the sorted probability vectors "
            "(Boizard et al. 2024); hybrid = KL on the tokens whose strings both vocabularies hold, uld on the rest "
            "(as TRL's GOLD).",
            "choices": list(CROSS_TOKENIZER_LOSSES),
        },
    )

    def _cross_tokenizer_problems(self) -> list[str]:
        problems = _unknown("cross_tokenizer_loss", self.cross_tokenizer_loss, CROSS_TOKENIZER_LOSSES)
        if self.teacher_tokenizer is None:
            return problems
        if not isinstance(self.teacher_tokenizer, str) or not self.teacher_tokenizer.strip():
            problems.append(f"teacher_tokenizer={self.teacher_tokenizer!r} must be a folder or Hub name.")
        if self.teacher_cache:
            problems.append("teacher_tokenizer and teacher_cache cannot go together: a cache holds the teacher's "
                            "outputs on the student's tokens. Unset one of them.")
        weights = [n for n in ("hidden_weight", "attention_weight", "relation_weight") if getattr(self, n) > 0]
        if weights:
            problems.append(f"{', '.join(weights)} > 0 with teacher_tokenizer: hidden states, attention maps and "
                            "relations have no alignment across tokenizers here. Set them to 0 (logits are aligned).")
        return problems

    def __post_init__(self):
        super().__post_init__()
        problems = [*self._training_problems(), *self._setting_problems(), *self._schedule_problems()]
        if not isinstance(self.logit_chunk_size, int) or self.logit_chunk_size < -1:
            problems.append(
                f"logit_chunk_size={self.logit_chunk_size!r} must be an int >= -1 (0 = auto, -1 = never chunk, "
                "N > 0 = N positions per chunk)."
            )
        for name in ("hidden_weight", "attention_weight", "relation_weight"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} is negative; weights must be >= 0.")
        if not problems and not self.uses_teacher_logits and self.hidden_weight == 0 and self.attention_weight == 0 \
                and self.relation_weight == 0:
            problems.append(
                "every distillation weight is zero (alpha=0, hidden_weight=0, attention_weight=0, relation_weight=0), "
                "so the teacher would be unused. Set alpha > 0 (e.g. 0.5) or a hidden/attention weight > 0; for "
                "label-only training use transformers.Trainer."
            )
        if self.peft_config is not None:
            try:
                self.peft_config = peft_config_dict(self.peft_config)
            except ValueError as err:
                problems.append(str(err))
        problems += weight_problems(self.teacher_weights)
        problems += self._cache_problems()
        problems += self._cross_tokenizer_problems()
        problems += self._parse_layer_maps()
        problems += self._generation_problems()
        if problems:
            raise ValueError("Invalid DistillationConfig:\n  - " + "\n  - ".join(problems))

    def _training_problems(self) -> list[str]:
        """Trainer settings that would fail later with a traceback, or run and mean nothing."""
        problems = []
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1.")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            problems.append(
                f"num_train_epochs={self.num_train_epochs} (with max_steps={self.max_steps}) trains nothing, and the "
                "untrained student would be saved as if distilled; set num_train_epochs > 0 or max_steps > 0."
            )
        if self.learning_rate < 0:
            problems.append(f"learning_rate={self.learning_rate} is negative; use a positive rate such as 5e-5.")
        if self.fp16 and (self.use_cpu or not _has_accelerator()):
            problems.append(
                "fp16=True needs a GPU and this run is on the CPU (fp16 mixed precision does not run there); leave "
                "fp16 off, or use bf16=True with use_cpu=True on a CPU that supports it."
            )
        if self.load_best_model_at_end and self.save_strategy == "no":
            problems.append(
                "load_best_model_at_end=True needs checkpoints to pick the best from, but save_strategy is 'no'; set "
                "save_strategy (and eval_strategy) to 'steps' or 'epoch', or drop load_best_model_at_end."
            )
        if self.save_strategy == "steps" and self.save_steps <= 0:
            problems.append(f"save_steps={self.save_steps} must be > 0 with save_strategy 'steps'.")
        return problems

    def _setting_problems(self) -> list[str]:
        """The loss settings out of their range, and names that are none of their choices."""
        problems = []
        if not (self.temperature > 0):
            problems.append(f"temperature={self.temperature} must be > 0 (2.0 is a common choice).")
        if not (0.0 <= self.alpha <= 1.0):
            problems.append(f"alpha={self.alpha} must be in [0, 1] (1 = distillation only, 0 = labels only).")
        problems += _unknown("kd_loss", self.kd_loss, KD_LOSSES)
        if not (0.0 < self.jsd_beta < 1.0):
            problems.append(f"jsd_beta={self.jsd_beta} must be strictly between 0 and 1 (0.5 is symmetric JSD).")
        problems += _unknown("hidden_loss", self.hidden_loss, HIDDEN_LOSSES)
        problems += _unknown("attention_loss", self.attention_loss, ATTENTION_CHOICES)
        if self.minilm_relation_heads is not None and not self.minilm_relation_heads > 0:
            problems.append(
                f"minilm_relation_heads={self.minilm_relation_heads} must be a positive integer (or unset: the "
                "teacher's number of heads)."
            )
        problems += _unknown("relation_loss", self.relation_loss, RELATION_LOSSES)
        problems += _unknown("relation_pooling", self.relation_pooling, RELATION_POOLINGS, "'first' or 'mean'")
        problems += _unknown("nonfinite_loss", self.nonfinite_loss, NONFINITE_ACTIONS, "'stop' or 'skip'")
        problems += _unknown("teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
        return problems

    def _generation_problems(self) -> list[str]:
        """lmbda in range; generation_config normalised to a GenerationConfig (in place) and sensible."""
        problems = []
        if not (0.0 <= self.lmbda <= 1.0):
            problems.append(f"lmbda={self.lmbda} must be in [0, 1] (the share of windows the student generates for).")
        if self.max_prompt_length is not None and not self.max_prompt_length > 0:
            problems.append(f"max_prompt_length={self.max_prompt_length} must be a positive number of tokens (or None).")
        try:
            self.generation_config = generation_config_of(self.generation_config)
        except (ValueError, OSError, TypeError) as err:
            problems.append(f"generation_config: {err}")
            return problems
        gc = self.generation_config
        if not (isinstance(gc.max_new_tokens, int) and gc.max_new_tokens > 0):
            problems.append(f"generation_config.max_new_tokens={gc.max_new_tokens!r} must be a positive int: completions "
                            "are generated up to this many tokens.")
        if gc.do_sample and not (gc.temperature is None or gc.temperature > 0):
            problems.append(f"generation_config.temperature={gc.temperature} must be > 0 when sampling.")
        return problems

    def to_dict(self):
        d = super().to_dict()
        if isinstance(d.get("generation_config"), GenerationConfig):  # JSON-able, as Seq2SeqTrainingArguments does
            d["generation_config"] = d["generation_config"].to_diff_dict()
        return d

    def _schedule_problems(self) -> list[str]:
        """A schedule of T or alpha needs its end value, in range; a constant one has none."""
        problems = []
        for name, low, high, example in (("temperature", 0.0, None, "1.0"), ("alpha", 0.0, 1.0, "0.1"),
                                         ("lmbda", 0.0, 1.0, "1.0")):
            kind, end = getattr(self, f"{name}_schedule"), getattr(self, f"{name}_end")
            if kind not in SCHEDULES:
                problems += _unknown(f"{name}_schedule", kind, SCHEDULES)
            elif kind == "constant" and end is not None:
                problems.append(
                    f"{name}_end={end} is set but {name}_schedule is 'constant'; set {name}_schedule to linear or "
                    f"cosine, or drop {name}_end."
                )
            elif kind != "constant" and end is None:
                problems.append(f"{name}_schedule={kind!r} needs {name}_end, the value at the last step (e.g. {example}).")
            elif kind != "constant" and not (end > low if high is None else low <= end <= high):
                where = f"> {low}" if high is None else f"in [{low}, {high}]"
                problems.append(f"{name}_end={end} must be {where}.")
        return problems

    def _cache_problems(self) -> list[str]:
        """What a teacher cache (top-k logits at one T, hidden states) cannot serve."""
        if not self.teacher_cache:
            return []
        problems = []
        if self.temperature_schedule != "constant":
            problems.append("teacher_cache holds the teacher's distribution at one temperature; use "
                            "temperature_schedule='constant' or distil with the live teacher.")
        if self.attention_weight > 0:
            problems.append("teacher_cache holds no attention maps; set attention_weight=0 or distil with the live teacher.")
        if self.relation_weight > 0:
            problems.append("teacher_cache holds no per-example embeddings for sample relations; set relation_weight=0 "
                            "or distil with the live teacher.")
        if self.alpha > 0 and self.kd_loss == "mse":
            problems.append("kd_loss='mse' compares every raw logit and teacher_cache keeps the top k; use forward_kl, "
                            "reverse_kl or jsd, or distil with the live teacher.")
        return problems

    def _parse_layer_maps(self) -> list[str]:
        """Normalise layer_map (None = "uniform") and decoder_layer_map in place; the problems with them."""
        problems = []
        if self.layer_map is None:
            self.layer_map = "uniform"
        try:
            self.layer_map = parse_layer_map(self.layer_map)
        except ValueError as err:
            problems.append(str(err))
        if self.decoder_layer_map is not None:
            try:
                self.decoder_layer_map = parse_layer_map(self.decoder_layer_map)
            except ValueError as err:
                problems.append(str(err).replace("layer_map", "decoder_layer_map"))
        return problems

    @property
    def uses_teacher_logits(self) -> bool:
        """alpha > 0 at some step (a schedule may start or end at 0)."""
        return self.alpha > 0 or (self.alpha_schedule != "constant" and (self.alpha_end or 0) > 0)

    def scheduled(self, name: str, step: int, total_steps: int) -> float:
        """`temperature` or `alpha` at optimizer step `step` (0-based) of `total_steps`, after its schedule."""
        return schedule_value(
            getattr(self, f"{name}_schedule"), getattr(self, name), getattr(self, f"{name}_end"), step, total_steps
        )

    @property
    def uses_hidden(self) -> bool:
        return self.hidden_weight > 0

    @property
    def uses_attention(self) -> bool:
        return self.attention_weight > 0

    @property
    def uses_attention_maps(self) -> bool:
        """Attention probabilities are needed (eager attention); MiniLM relations read q/k/v instead."""
        return self.uses_attention and self.attention_loss != "minilm"

    @property
    def uses_relations(self) -> bool:
        return self.relation_weight > 0
