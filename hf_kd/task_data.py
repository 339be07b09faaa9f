"""Data preparation for every task, and the entry that runs a task recipe (a recipe with a `task:` field):

    hf-kd distill --config recipes/tasks/NAME.yaml [--field value ...]
    (the same as: python -m hf_kd.task_data --config recipes/tasks/NAME.yaml [--field value ...])

A task recipe is a flat YAML of `TaskArguments` and `DistillationConfig` fields (command-line values override
it). The `hf-kd distill` pipeline stays the sequence-classification demo (teacher fine-tune, baseline, report);
this entry loads a teacher that already solves the task, makes or loads a student, prepares the data for the
task and distils. The data is a local csv/json(l) file or folder (or a Hub id while online):

- sequence_classification: ``text_column`` (and ``text_pair_column``), integer ``label_column``;
- token_classification: ``text_column`` holds a list of words, ``label_column`` a list of integer tags; a word's
  first sub-token carries its tag, the other sub-tokens and the special tokens -100;
- question_answering: ``question_column``, ``context_column`` and ``answers`` ({"text": [...], "answer_start":
  [...]}, SQuAD's format); the answer's first and last tokens become start/end positions (0, the first token,
  when truncation cut the answer off);
- masked_lm: ``text_column`` only. With ``mlm_probability`` > 0, DataCollatorForLanguageModeling masks tokens and
  KD covers the masked positions; with 0 the text is not masked and KD covers every non-padding position;
- causal_lm: ``text_column``; labels are the input ids (padding -100), the trainer shifts them;
- seq2seq_lm: ``text_column`` (source) and ``target_column``; DataCollatorForSeq2Seq pads labels with -100.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from .config import DistillationConfig
from .tasks import TASKS, auto_class


@dataclass
class TaskArguments:
    task: str = field(metadata={"help": "One of " + ", ".join(TASKS) + "."})
    teacher_model_name_or_path: str = field(metadata={"help": "A teacher that solves the task: Hub id or local folder."})
    dataset_name: str = field(metadata={"help": "A local csv/json/jsonl file or folder, or a Hub id while online."})
    student_model_name_or_path: str | None = field(default=None, metadata={"help": "An existing student."})
    student_layers: str | None = field(
        default=None, metadata={"help": "Else: keep these teacher layers (1-based JSON list, e.g. [1,3,5])."}
    )
    dataset_config_name: str | None = field(default=None)
    train_split: str = field(default="train")
    text_column: str = field(default="text", metadata={"help": "Input text (token classification: list of words)."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text (sequence classification)."})
    label_column: str = field(default="label", metadata={"help": "Label (token classification: list of tags)."})
    question_column: str = field(default="question")
    context_column: str = field(default="context")
    answers_column: str = field(default="answers")
    target_column: str = field(default="target", metadata={"help": "seq2seq target text."})
    max_length: int = field(default=128)
    max_target_length: int = field(default=64)
    max_train_samples: int | None = field(default=None)
    mlm_probability: float = field(
        default=0.15, metadata={"help": "masked_lm: share of tokens masked; 0 = distil every position unmasked."}
    )


def _load(args: TaskArguments):
    import datasets

    name = os.path.expanduser(args.dataset_name)
    suffix = name.rsplit(".", 1)[-1].lower() if os.path.isfile(name) else None
    if suffix in ("csv", "json", "jsonl", "parquet"):
        data = datasets.load_dataset("json" if suffix == "jsonl" else suffix, data_files={args.train_split: name})
    else:
        data = datasets.load_dataset(name, args.dataset_config_name)
    split = data[args.train_split]
    if args.max_train_samples is not None:
        split = split.select(range(min(args.max_train_samples, len(split))))
    return split


def _require(split, columns, args):
    missing = [c for c in columns if c not in split.column_names]
    if missing:
        raise SystemExit(
            f"hf_kd.task_data: the {args.task} data has no column {missing} (columns: {split.column_names}); "
            "name the right ones with --text_column / --label_column / --question_column / --context_column / "
            "--target_column."
        )


def prepare(args: TaskArguments, split, tokenizer, student):
    """(tokenised dataset, collator) for `args.task`."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, DataCollatorWithPadding

    task, cut = args.task, dict(truncation=True, max_length=args.max_length)
    drop = split.column_names
    if task == "sequence_classification":
        _require(split, [args.text_column, args.label_column] + ([args.text_pair_column] if args.text_pair_column else []), args)

        def fn(b):
            pair = b[args.text_pair_column] if args.text_pair_column else None
            out = tokenizer(b[args.text_column], pair, **cut)
            out["labels"] = b[args.label_column]
            return out

        return split.map(fn, batched=True, remove_columns=drop), DataCollatorWithPadding(tokenizer)
    if task == "token_classification":
        _require(split, [args.text_column, args.label_column], args)
        from transformers import DataCollatorForTokenClassification

        def fn(b):
            out = tokenizer(b[args.text_column], is_split_into_words=True, **cut)
            labels = []
            for i, tags in enumerate(b[args.label_column]):
                row, previous = [], None
                for word in out.word_ids(i):  # None for special tokens; a word's later sub-tokens repeat its id
                    row.append(-100 if word is None or word == previous else int(tags[word]))
                    previous = word
                labels.append(row)
            out["labels"] = labels
            return out

        return split.map(fn, batched=True, remove_columns=drop), DataCollatorForTokenClassification(tokenizer)
    if task == "question_answering":
        _require(split, [args.question_column, args.context_column, args.answers_column], args)

        def fn(b):
            out = tokenizer(b[args.question_column], b[args.context_column], truncation="only_second",
                            max_length=args.max_length, return_offsets_mapping=True)
            starts, ends = [], []
            for i, answer in enumerate(b[args.answers_column]):
                first = answer["answer_start"][0]
                last = first + len(answer["text"][0])  # one past the answer's last character
                seq = out.sequence_ids(i)
                start = end = 0
                for k, (a, z) in enumerate(out["offset_mapping"][i]):
                    if seq[k] != 1:
                        continue
                    if a <= first < z:
                        start = k
                    if a < last <= z:
                        end = k
                if end < start:  # the answer was cut off
                    start = end = 0
                starts.append(start)
                ends.append(end)
            out.pop("offset_mapping")
            out["start_positions"], out["end_positions"] = starts, ends
            return out

        return split.map(fn, batched=True, remove_columns=drop), DataCollatorWithPadding(tokenizer)
    if task in ("masked_lm", "causal_lm"):
        _require(split, [args.text_column], args)
        data = split.map(lambda b: tokenizer(b[args.text_column], **cut), batched=True, remove_columns=drop)
        if task == "masked_lm" and args.mlm_probability == 0:
            return data, DataCollatorWithPadding(tokenizer)  # no labels: KD over every non-padding position
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return data, DataCollatorForLanguageModeling(
            tokenizer, mlm=task == "masked_lm", mlm_probability=args.mlm_probability or 0.15
        )
    if task == "seq2seq_lm":
        _require(split, [args.text_column, args.target_column], args)

        def fn(b):
            out = tokenizer(b[args.text_column], **cut)
            out["labels"] = tokenizer(text_target=b[args.target_column], truncation=True,
                                      max_length=args.max_target_length)["input_ids"]
            return out

        return split.map(fn, batched=True, remove_columns=drop), DataCollatorForSeq2Seq(tokenizer, model=student)
    raise SystemExit(f"hf_kd.task_data: unknown task {task!r}; use one of {', '.join(TASKS)}.")


def parse(argv: list[str]) -> tuple[TaskArguments, DistillationConfig]:
    from .cli import parse_recipe_args

    return parse_recipe_args((TaskArguments, DistillationConfig), argv, "hf-kd distill")


def run(args: TaskArguments, config: DistillationConfig) -> dict:
    from .errors import InputError, NonFiniteLossError
    from .hub import PushError

    try:
        return _run(args, config)
    except (InputError, PushError, NonFiniteLossError) as err:  # a message, not a traceback
        raise SystemExit(f"hf-kd: {err}") from None


def _run(args: TaskArguments, config: DistillationConfig) -> dict:
    from transformers import AutoTokenizer

    from .offline import resolve_model
    from .student import student_from_teacher
    from .teachers import load_teacher
    from .trainer import DistillationTrainer

    if args.task not in TASKS:
        raise SystemExit(f"hf_kd.task_data: unknown task {args.task!r}; use one of {', '.join(TASKS)}.")
    cls = auto_class(args.task)
    teacher = load_teacher(resolve_model(args.teacher_model_name_or_path), args.task)  # refuses a teacher without the task head
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.teacher_model_name_or_path))
    if args.student_model_name_or_path:
        student = cls.from_pretrained(resolve_model(args.student_model_name_or_path))
    elif args.student_layers:
        student = student_from_teacher(teacher, json.loads(args.student_layers))
    else:
        raise SystemExit("hf_kd.task_data: give student_model_name_or_path, or student_layers (e.g. [1,3,5]).")
    data, collator = prepare(args, _load(args), tokenizer, student)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data,
                                  data_collator=collator, processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model()
    logs = [e for e in trainer.state.log_history if "kd_loss" in e]
    summary = {"task": args.task, "output_dir": config.output_dir, "steps": trainer.state.global_step,
               "train_loss": result.training_loss, "first": logs[0] if logs else None, "last": logs[-1] if logs else None}
    print(json.dumps(summary, indent=1), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    run(*parse(list(sys.argv[1:] if argv is None else argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
