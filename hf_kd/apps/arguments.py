"""The fields of a recipe besides `DistillationConfig`'s: the models, the data, what else the run does.

`hf-kd distill --help` lists them (and every `DistillationConfig` / `TrainingArguments` field).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import yaml

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


def _yaml_value(text: str):
    """A command-line value as the recipes write it: JSON, YAML flow (`[neg, pos]`) or bare `a, b`; None when
    it is none of them."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if isinstance(value, str) and "," in value:  # `a, b` / `a,b`: a list written without brackets
        value = [yaml.safe_load(v) if v.strip() else "" for v in value.split(",")]
    return value


def parse_seeds(value) -> list[int]:
    """`teacher_seed`: one int, or a JSON/YAML list of distinct ints (one fine-tuned teacher each)."""
    if isinstance(value, str):
        value = _yaml_value(value)
    seeds = value if isinstance(value, list) else [value]
    if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"teacher_seed={value!r} must be an integer or a list of distinct integers, e.g. 42 or [42, 7].")
    return seeds


def parse_names(value, name: str = "class_names") -> list[str]:
    """`class_names`: a list of distinct, non-empty names, given as a list or as its text in any form a recipe or
    a shell writes it: JSON `["neg", "pos"]`, YAML `[neg, pos]`, or `neg,pos`."""
    names = _yaml_value(value) if isinstance(value, str) else value
    if isinstance(names, tuple):
        names = list(names)
    if not isinstance(names, list) or len(names) < 2 or any(isinstance(n, (list, dict)) or n is None for n in names):
        raise ValueError(f"{name}={value!r} is not a list of label names; write it as [negative, positive] "
                         "(or negative,positive), one name per label 0..N-1.")
    names = [str(n).strip() for n in names]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if "" in names or doubled:
        what = "an empty name" if "" in names else f"the name {doubled[0]!r} twice"
        raise ValueError(f"{name}={value!r} has {what}; give each label 0..N-1 its own name.")
    return names


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
        metadata={"help": "Names of integer labels 0..N-1, one per label: [negative, positive] (JSON, YAML or "
                  "negative,positive)."},
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
    prompt_words: int | None = field(
        default=None,
        metadata={
            "help": "causal_lm: train on prompt-completion pairs made from the texts: the first N words of each "
            "training text are the prompt, the rest its completion (texts of fewer than N + 2 words are dropped). "
            "Data with prompt/completion or messages columns is used as such. See docs/generation.md."
        },
    )
    mlm_probability: float = field(
        default=0.15, metadata={"help": "masked_lm: share of tokens masked; 0 = distil every position unmasked."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N held-out rows."})
    teacher_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Classification tasks: fine-tune the teacher on the first N training rows (default: the labelled "
            "rows, max_train_samples). Above max_train_samples, the teacher has seen labels the student never gets, "
            "as a teacher fine-tuned elsewhere would; the student and the baseline still see the labelled rows only."
        },
    )
    unlabelled_samples: int | None = field(
        default=None,
        metadata={
            "help": "sequence_classification: also distil on the next N training rows after the first "
            "max_train_samples, with their labels dropped: an unlabelled transfer set that only the teacher's "
            "targets train on. The teacher's fine-tune and the baseline see the labelled rows alone."
        },
    )

    def __post_init__(self):
        for name in ("class_names", "eval_split", "text_pair_column", "dataset_config_name"):  # `--eval_split null`
            if isinstance(getattr(self, name), str) and getattr(self, name).strip().lower() in ("", "null", "none"):
                setattr(self, name, None)
        if self.class_names is not None:  # kept as JSON text, the form the rest of the run reads
            self.class_names = json.dumps(parse_names(self.class_names))


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
