"""`DistillationConfig`: `transformers.TrainingArguments` plus the distillation settings.

Every Trainer flag keeps its meaning; the fields below add the loss. The total loss is

    alpha * T^2 * D(teacher || student, softened by T) + (1 - alpha) * CE(student, labels)
    + hidden_weight * hidden + attention_weight * attention

where the CE term is present only when the batch has labels. For ``kd_loss="mse"`` D is the mean
squared error of the raw logits and neither T nor T^2 applies (T^2 only compensates for the 1/T^2
that softening puts on the gradients of the softened distributions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .losses import ATTENTION_LOSSES, HIDDEN_LOSSES, KD_LOSSES

LAYER_MAP_NAMES = ("uniform", "last")
NONFINITE_ACTIONS = ("stop", "skip")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")


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


@dataclass
class DistillationConfig(TrainingArguments):
    """Training arguments for `DistillationTrainer`.

    The distillation fields come first in `--help`; all of `TrainingArguments` follows unchanged.
    """

    temperature: float = field(
        default=2.0,
        metadata={"help": "Softmax temperature T applied to teacher and student logits (> 0)."},
    )
    alpha: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the logit distillation term; (1 - alpha) weighs the hard-label cross-entropy."
        },
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
            "help": "Attention loss: mse on attention probabilities (TinyBERT) or kl between attention rows.",
            "choices": list(ATTENTION_LOSSES),
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
    teacher_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype the teacher runs in: auto = the student's dtype; float32, bfloat16 or float16 to keep a "
            "teacher in another dtype than the student (e.g. bfloat16 to halve its memory). Losses are fp32 anyway.",
            "choices": list(TEACHER_DTYPES),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        problems = []
        if not (self.temperature > 0):
            problems.append(f"temperature={self.temperature} must be > 0 (2.0 is a common choice).")
        if not (0.0 <= self.alpha <= 1.0):
            problems.append(f"alpha={self.alpha} must be in [0, 1] (1 = distillation only, 0 = labels only).")
        if self.kd_loss not in KD_LOSSES:
            problems.append(f"kd_loss={self.kd_loss!r} is unknown; use one of {', '.join(KD_LOSSES)}.")
        if not (0.0 < self.jsd_beta < 1.0):
            problems.append(f"jsd_beta={self.jsd_beta} must be strictly between 0 and 1 (0.5 is symmetric JSD).")
        if self.hidden_loss not in HIDDEN_LOSSES:
            problems.append(f"hidden_loss={self.hidden_loss!r} is unknown; use one of {', '.join(HIDDEN_LOSSES)}.")
        if self.attention_loss not in ATTENTION_LOSSES:
            problems.append(
                f"attention_loss={self.attention_loss!r} is unknown; use one of {', '.join(ATTENTION_LOSSES)}."
            )
        if self.nonfinite_loss not in NONFINITE_ACTIONS:
            problems.append(f"nonfinite_loss={self.nonfinite_loss!r} is unknown; use 'stop' or 'skip'.")
        if self.teacher_dtype not in TEACHER_DTYPES:
            problems.append(f"teacher_dtype={self.teacher_dtype!r} is unknown; use one of {', '.join(TEACHER_DTYPES)}.")
        for name in ("hidden_weight", "attention_weight"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} is negative; weights must be >= 0.")
        if not problems and self.alpha == 0 and self.hidden_weight == 0 and self.attention_weight == 0:
            problems.append(
                "every distillation weight is zero (alpha=0, hidden_weight=0, attention_weight=0), so the "
                "teacher would be unused. Set alpha > 0 (e.g. 0.5) or a hidden/attention weight > 0; for "
                "label-only training use transformers.Trainer."
            )
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
        if problems:
            raise ValueError("Invalid DistillationConfig:\n  - " + "\n  - ".join(problems))

    @property
    def uses_teacher_logits(self) -> bool:
        return self.alpha > 0

    @property
    def uses_hidden(self) -> bool:
        return self.hidden_weight > 0

    @property
    def uses_attention(self) -> bool:
        return self.attention_weight > 0
