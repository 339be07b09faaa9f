"""The fields of a recipe besides `DistillationConfig`'s: the models, the data, what else the run does.

`hf-kd distill --help` lists them (and every `DistillationConfig` / `TrainingArguments` field).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..config import DistillationConfig
from ..student import parse_student_config, parse_student_layers
from ..tasks import TASKS
from .prune import parse_student_prune


@dataclass
class ModelArguments:
    teacher_model_name_or_path: str = field(
        metadata={"help": "Teacher: a Hub id or local folder. Known Hub ids fall back to installed offline copies."}
    )
    task: str = field(
        default="sequence_classification",
        metadata={"help": "What teacher and student solve: " + ", ".join(TASKS) + "."},
    )
    student_model_name_or_path: str | None = field(
        default=None, metadata={"help": "An existing student (Hub id or folder). Else see student_layers."}
    )
    student_layers: str | None = field(
        default=None,
        metadata={
            "help": "Make the student from teacher layers, with their weights: a 1-based list (e.g. [1,3,5]) or a "
            "number N (N layers spread evenly, the last included; see hf_kd.student.uniform_layers)."
        },
    )
    student_config: str | None = field(
        default=None,
        metadata={
            "help": "Instead of student_layers: a fresh student of the teacher's architecture with these config "
            "fields changed, a mapping such as {hidden_size: 192, intermediate_size: 768, num_attention_heads: 6, "
            "num_hidden_layers: 3}."
        },
    )
    student_prune: str | None = field(
        default=None,
        metadata={
            "help": "Instead of student_layers / student_config: prune the (fine-tuned) teacher by importance measured "
            "on the run's training rows, a mapping such as {hidden_size: 192, num_attention_heads: 6, "
            "intermediate_size: 768, layers: 3, calibration_samples: 256} (docs/pruning.md)."
        },
    )
    teacher_finetune_epochs: float = field(
        default=0.0,
        metadata={
            "help": "If > 0, first fine-tune the teacher on the training split for this many epochs "
            "(cached under cache_dir, reused by later runs with the same settings)."
        },
    )
    teacher_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the teacher fine-tune."})
    teacher_seed: str = field(
        default="42",
        metadata={
            "help": "Seed of the teacher fine-tune, apart from `seed` so that student seeds share one teacher. A list "
            "such as [42, 7] fine-tunes one teacher per seed and distils from all of them (several teachers, "
            "weighted by teacher_weights)."
        },
    )
    cache_dir: str = field(default="~/.cache/hf_kd", metadata={"help": "Where fine-tuned teachers are cached."})

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; use one of {', '.join(TASKS)}.")
        for name in ("student_layers", "student_config", "student_prune"):  # `--student_layers null` unsets a recipe's value
            if isinstance(getattr(self, name), str) and getattr(self, name).strip().lower() in ("", "null", "none"):
                setattr(self, name, None)
        if self.student_layers is not None and self.student_config is not None:
            raise ValueError("give student_layers (teacher layers and weights) or student_config (fresh weights), "
                             "not both.")
        if self.student_prune is not None and (self.student_layers is not None or self.student_config is not None):
            raise ValueError("give student_prune (the teacher pruned by importance) alone, without student_layers or "
                             "student_config.")
        if self.student_layers is not None:
            parse_student_layers(self.student_layers)
        if self.student_config is not None:
            parse_student_config(self.student_config)
        if self.student_prune is not None:
            parse_student_prune(self.student_prune)
        self.teacher_seeds = parse_seeds(self.teacher_seed)
        self.teacher_seed = self.teacher_seeds[0]  # the (first) teacher's seed, an int


def parse_seeds(value) -> list[int]:
    """`teacher_seed`: one int, or a JSON/YAML list of distinct ints (one fine-tuned teacher each)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    seeds = value if isinstance(value, list) else [value]
    if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"teacher_seed={value!r} must be an integer or a list of distinct integers, e.g. 42 or [42, 7].")
    return seeds


@dataclass
class DataArguments:
    dataset_name: str = field(
        metadata={"help": "datasets.load_dataset path: a Hub id, a local folder or a csv/json/jsonl/parquet file."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default="test", metadata={"help": "Held-out split for the final evaluation."})
    text_column: str = field(
        default="text", metadata={"help": "Input text (token classification: a list of words; seq2seq: the source)."}
    )
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text column for pair tasks."})
    label_column: str = field(
        default="label", metadata={"help": "Class label (token classification: a list of integer tags)."}
    )
    class_names: str | None = field(
        default=None,
        metadata={"help": "Names of integer labels 0..N-1 as a JSON list, e.g. [negative, positive] in YAML."},
    )
    question_column: str = field(default="question", metadata={"help": "question_answering: the question."})
    context_column: str = field(default="context", metadata={"help": "question_answering: the context."})
    answers_column: str = field(
        default="answers", metadata={"help": "question_answering: SQuAD's {text: [...], answer_start: [...]}."}
    )
    target_column: str = field(default="target", metadata={"help": "seq2seq_lm: the target text."})
    max_length: int = field(default=128, metadata={"help": "Tokens per example after truncation."})
    max_target_length: int = field(default=64, metadata={"help": "seq2seq_lm: target tokens after truncation."})
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "causal_lm: pack the training texts (each with an end-of-sequence token) into blocks of exactly "
            "this many tokens, and measure perplexity on held-out texts of at most this many; unset: each text on "
            "its own, truncated at max_length."
        },
    )
    mlm_probability: float = field(
        default=0.15, metadata={"help": "masked_lm: share of tokens masked; 0 = distil every position unmasked."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N held-out rows."})
    unlabelled_samples: int | None = field(
        default=None,
        metadata={
            "help": "sequence_classification: also distil on the next N training rows after the first "
            "max_train_samples, with their labels dropped: an unlabelled transfer set that only the teacher's "
            "targets train on. The teacher's fine-tune and the baseline see the labelled rows alone."
        },
    )


@dataclass
class RunArguments:
    baseline: bool = field(
        default=False,
        metadata={"help": "Also train the same student from the same start on labels alone, for comparison."},
    )
    report: bool = field(default=False, metadata={"help": "Write report.md / report.png with latency and sizes."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that already holds a run."}
    )


PARSER_TYPES = (ModelArguments, DataArguments, RunArguments, DistillationConfig)
