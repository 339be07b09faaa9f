"""The data of a run, for every task: splits from a Hub id or a local csv/json/jsonl/parquet file or folder
(offline stand-ins resolved by `hf_kd.apps.offline`), the labels, the unlabelled transfer set, the
tokenisation per task and the collators.

- sequence_classification: ``text_column`` (and ``text_pair_column``), ``label_column`` (a ClassLabel,
  integers named by ``class_names``, or any values, numbered in sorted order);
- token_classification: ``text_column`` holds a list of words, ``label_column`` a list of integer tags; a
  word's first sub-token carries its tag, the other sub-tokens and the special tokens -100;
- question_answering: ``question_column``, ``context_column`` and ``answers_column`` ({"text": [...],
  "answer_start": [...]}, SQuAD's format); the answer's first and last tokens become start/end positions
  (0, the first token, when truncation cut the answer off);
- masked_lm: ``text_column`` only. With ``mlm_probability`` > 0 the collator masks tokens and KD covers the
  masked positions; with 0 the text is not masked and KD covers every non-padding position;
- causal_lm: ``text_column`` (empty texts dropped); every text is tokenised with an end-of-sequence token
  appended. With ``block_size`` the training texts are packed into blocks of exactly that many tokens (the
  last, partial block dropped; labels = input ids); without it each text is truncated at ``max_length``.
  The held-out texts stay one per row (perplexity never spans two texts). With ``prompt_words`` (or a dataset with
  prompt/completion or messages columns) the training rows are prompt-completion rows instead, tokenized by
  `hf_kd.PromptCollator` (see docs/generation.md);
- seq2seq_lm: ``text_column`` (source) and ``target_column``; labels padded with -100.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from datasets import ClassLabel, Dataset, load_dataset
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    default_data_collator,
)

from .offline import resolve_dataset

LABELLED_TASKS = ("sequence_classification", "token_classification")


@dataclass
class RunData:
    train: Dataset  # tokenised labelled training rows
    unlabelled: Dataset | None  # tokenised training rows with their labels dropped (distillation only)
    held_out: Dataset | None  # tokenised held-out rows (causal_lm: one text per row, input_ids only)
    names: list | None  # label names (classification tasks)
    teacher_train: Dataset | None = None  # the teacher's fine-tune rows when not the labelled rows (teacher_train_samples)


#: Endings of the local data files `datasets` reads (`hf_kd.apps.offline` maps them to a builder).
DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt", ".gz", ".zst", ".bz2", ".xz")


def load_raw(data_args):
    """The `datasets.DatasetDict` named by dataset_name, with its train (and eval) split checked."""
    name = data_args.dataset_name
    local = os.path.exists(os.path.expanduser(name))
    if not local and (name.startswith((".", "/", "~")) or name.lower().endswith(DATA_SUFFIXES)):
        raise SystemExit(f"hf-kd: dataset_name={name!r} does not exist; give a csv/json/jsonl/parquet file, a folder "
                         "of them (train.csv, test.csv, ...), or a Hub dataset id.")
    kwargs = resolve_dataset(name)
    if data_args.dataset_config_name and not local:  # a Hub dataset's configuration; local files have none
        kwargs["name"] = data_args.dataset_config_name
    try:
        raw = load_dataset(**kwargs)
    except ValueError as err:
        if "corresponds to no data" not in str(err):
            raise SystemExit(_unreadable(name, err)) from None
        # datasets refuses a split file with no rows while building; say which fix applies.
        raise SystemExit(
            f"hf-kd: a split of {data_args.dataset_name} has no rows ({err}); give splits with data."
        ) from None
    except Exception as err:  # noqa: BLE001 - datasets' own errors (not found, offline, a malformed file) said plainly
        if not isinstance(err, (OSError, ImportError)) and not type(err).__module__.startswith(("datasets", "pyarrow")):
            raise
        raise SystemExit(_unreadable(name, err)) from None
    splits = {"train": data_args.train_split, "eval": data_args.eval_split}
    for role, split in splits.items():
        if split is not None and split not in raw:
            raise SystemExit(
                f"hf-kd: the dataset has no split {split!r} (it has {sorted(raw)}); set {role}_split to one of them."
            )
    for role, split in splits.items():
        if split is not None and len(raw[split]) == 0:
            raise SystemExit(f"hf-kd: the {split!r} split has no rows; point {role}_split at a split with data.")
    return raw


def _unreadable(name: str, err: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    local = os.path.exists(os.path.expanduser(name))
    cause = str(getattr(err, "__cause__", None) or err).strip().splitlines()
    hint = ("fix the file (every row with the header's columns, valid JSON per line)" if local
            else "check the name, or give a local file or folder" + (" (the Hub is offline)" if offline else ""))
    return f"hf-kd: dataset_name={name!r} could not be read ({type(err).__name__}: {cause[0] if cause else ''}); {hint}."


def raw_problems(task: str, data_args, raw) -> list[str]:
    """What is wrong with the rows of a loaded dataset for `task`: missing columns, empty texts, labels that
    class_names does not name. Reads columns only, before anything is tokenised."""
    problems = []
    splits = [s for s in (data_args.train_split, data_args.eval_split) if s is not None and s in raw]
    for split in splits:
        missing = [c for c in required_columns(task, data_args) if c not in raw[split].column_names]
        if missing:
            problems.append(
                f"the {split!r} split has no column {missing[0]!r} (it has {raw[split].column_names}); set "
                "text_column / label_column (or text_pair_column, question_column, context_column, answers_column, "
                f"target_column for {task}) to the right names."
            )
    if problems:
        return problems
    texts = {"question_answering": [data_args.question_column, data_args.context_column],
             "seq2seq_lm": [data_args.text_column, data_args.target_column],
             "causal_lm": []}.get(task, [data_args.text_column] + [c for c in [data_args.text_pair_column] if c])
    for split in splits:
        for column in texts:
            empty = [i for i, v in enumerate(raw[split][column]) if v is None or (isinstance(v, (str, list)) and not (
                v.strip() if isinstance(v, str) else v))]
            if empty:
                problems.append(
                    f"{len(empty)} rows of the {split!r} split have an empty {column!r} (first: row {empty[0]}); fill "
                    "them in or drop those rows."
                )
    if data_args.class_names and task not in LABELLED_TASKS:
        problems.append(f"class_names names the labels of a classification task; a {task} run has none. Drop it.")
    elif task in LABELLED_TASKS and not problems:
        problems += _label_problems(task, data_args, raw, splits)
    return problems


def _label_problems(task: str, data_args, raw, splits) -> list[str]:
    train = raw[data_args.train_split]
    given = json.loads(data_args.class_names) if data_args.class_names else None
    try:
        if task == "token_classification":
            names = tag_names(train, data_args)
        else:
            names, to_id = class_labels(train, data_args)
            for split in splits:
                check_labels(raw[split], data_args.label_column, names, to_id, split)
    except SystemExit as err:
        return [str(err.code).removeprefix("hf-kd: ")]
    if given is None:
        return []
    feature = train.features[data_args.label_column]
    feature = getattr(feature, "feature", feature)
    if isinstance(feature, ClassLabel) and len(given) != len(feature.names):
        return [f"class_names has {len(given)} names but the dataset's labels are {feature.names}; drop class_names "
                "(the dataset names its labels) or give one name per label."]
    values = set()
    for split in splits:
        for v in raw[split][data_args.label_column]:
            values.update(v if isinstance(v, list) else [v])
    values = {v for v in values if isinstance(v, int) and v >= 0}
    if values and max(values) >= len(given):
        return [f"the labels go up to {max(values)}, outside 0..{len(given) - 1} that class_names ({', '.join(given)}) "
                "names; give one name per label."]
    if values and len(given) > max(values) + 1:
        return [f"class_names has {len(given)} names ({', '.join(given)}) but the data has {max(values) + 1} labels "
                f"({', '.join(map(str, sorted(values)))}): a student with {len(given)} classes would name its labels "
                "wrongly. Give one name per label 0..N-1."]
    return []


def required_columns(task: str, data_args) -> list[str]:
    a = data_args
    return {
        "sequence_classification": [a.text_column, a.label_column] + ([a.text_pair_column] if a.text_pair_column else []),
        "token_classification": [a.text_column, a.label_column],
        "question_answering": [a.question_column, a.context_column, a.answers_column],
        "seq2seq_lm": [a.text_column, a.target_column],
    }.get(task, [a.text_column])


def load_data(task: str, data_args, tokenizer) -> RunData:
    """The tokenised training, unlabelled and held-out rows of the run, and the label names."""
    raw = load_raw(data_args)
    train = raw[data_args.train_split]
    limit = getattr(tokenizer, "model_max_length", None)
    name = "block_size" if task == "causal_lm" and data_args.block_size else "max_length"
    if limit and limit < 1_000_000 and getattr(data_args, name) > limit:  # huge values mean "not set"
        raise SystemExit(
            f"hf-kd: {name}={getattr(data_args, name)} is longer than the tokenizer's model_max_length={limit} "
            f"({getattr(tokenizer, 'name_or_path', '')}: the model's maximum positions); set {name} to {limit} or less."
        )
    missing = [c for c in required_columns(task, data_args) if c not in train.column_names]
    if missing:
        raise SystemExit(
            f"hf-kd: the dataset has no column {missing[0]!r} (it has {train.column_names}); set text_column / "
            "label_column (or text_pair_column, question_column, context_column, answers_column, target_column for "
            f"{task}) to the right names."
        )
    if data_args.unlabelled_samples and task != "sequence_classification":
        raise SystemExit(f"hf-kd: unlabelled_samples is for sequence_classification; a {task} run has no labels to drop.")
    held = raw[data_args.eval_split] if data_args.eval_split else None
    if task == "causal_lm":
        return _causal_lm_data(data_args, tokenizer, train, held)
    names, to_id = None, None
    if task == "sequence_classification":
        names, to_id = class_labels(train, data_args)
        for split in (data_args.train_split, data_args.eval_split):
            if split is not None:
                check_labels(raw[split], data_args.label_column, names, to_id, split)
    elif task == "token_classification":
        names = tag_names(train, data_args)
    tokenize = TOKENIZERS[task](data_args, tokenizer, to_id)
    unlabelled = None
    if data_args.unlabelled_samples:
        start = data_args.max_train_samples
        if start is None or start + data_args.unlabelled_samples > len(train):
            raise SystemExit(
                f"hf-kd: unlabelled_samples={data_args.unlabelled_samples} takes the training rows after the first "
                f"max_train_samples={start}, but the {data_args.train_split!r} split has {len(train)} rows; set "
                "max_train_samples + unlabelled_samples to at most that."
            )
        unlabelled = _prepare(train, data_args.unlabelled_samples, tokenize, start=start)
        unlabelled = unlabelled.map(lambda row: {"labels": -100}, desc="drop labels")
    teacher_train = None
    if data_args.teacher_train_samples is not None:
        if task not in LABELLED_TASKS:
            raise SystemExit(f"hf-kd: teacher_train_samples is for classification tasks; a {task} teacher is "
                             "fine-tuned on the training rows the student sees.")
        if data_args.teacher_train_samples > len(train):
            raise SystemExit(f"hf-kd: teacher_train_samples={data_args.teacher_train_samples}, but the "
                             f"{data_args.train_split!r} split has {len(train)} rows; set it to at most that.")
        teacher_train = _prepare(train, data_args.teacher_train_samples, tokenize)
    train = _prepare(train, data_args.max_train_samples, tokenize)
    held_out = _prepare(held, data_args.max_eval_samples, tokenize) if held is not None else None
    return RunData(train, unlabelled, held_out, names, teacher_train)


def _prepare(ds, limit, tokenize, start=0):
    end = len(ds) if limit is None else min(start + limit, len(ds))
    if start or end < len(ds):
        ds = ds.select(range(start, end))
    if len(ds) == 0:
        raise SystemExit("hf-kd: a split is empty after slicing; raise max_train_samples / max_eval_samples.")
    return ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="tokenize")


# ---------------------------------------------------------------------------- labels
def class_labels(train, data_args) -> tuple[list, dict | None]:
    """(label names, value -> id or None when the labels are already 0..N-1) of a classification split."""
    feature = train.features[data_args.label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names), None
    if data_args.class_names:
        names = list(json.loads(data_args.class_names))
        found = set(train[data_args.label_column]) - {None}
        if not all(isinstance(v, int) for v in found):
            raise SystemExit(
                f"hf-kd: class_names names integer labels 0..N-1, but the labels are {sorted(map(str, found))[:5]}; "
                "drop class_names (text labels are numbered in sorted order) or give integer labels."
            )
        if not found <= set(range(len(names))):
            raise SystemExit(
                f"hf-kd: class_names has {len(names)} names but the labels are {sorted(found)[:10]}; "
                "class_names must name the integer labels 0..N-1 in order."
            )
        return names, None
    values = sorted(set(train[data_args.label_column]) - {None})  # rows without a label: check_labels says so
    return [str(v) for v in values], {v: i for i, v in enumerate(values)}


def tag_names(train, data_args) -> list:
    """Token classification: the tag names (a ClassLabel's, class_names, or 0..max tag)."""
    inner = getattr(train.features[data_args.label_column], "feature", None)
    if isinstance(inner, ClassLabel):
        return list(inner.names)
    if data_args.class_names:
        return list(json.loads(data_args.class_names))
    return [str(i) for i in range(1 + max((max(tags) for tags in train[data_args.label_column] if tags), default=0))]


def check_labels(ds, column: str, names: list, to_id: dict | None, split: str) -> None:
    """Refuse rows without a label (None, or -1 as in unlabelled test splits) or outside the label set.

    Reads the label column alone (Arrow, no tokenization), so it stays cheap on large splits.
    """
    values = ds[column]
    missing = sum(v is None or v == -1 for v in values)
    if missing:
        raise SystemExit(
            f"hf-kd: {missing} rows of the {split!r} split have no label ({column} is None or -1, as in unlabelled "
            "test splits); pick a labelled split (e.g. eval_split: validation) or filter them out."
        )
    if to_id is not None:
        unknown = sorted({str(v) for v in values} - {str(k) for k in to_id})
        if unknown:
            raise SystemExit(
                f"hf-kd: the {split!r} split has labels {unknown[:5]} that the training split does not have "
                f"({names}); give class_names or use splits with the same labels."
            )
    else:
        bad = sorted({v for v in values if not (isinstance(v, int) and 0 <= v < len(names))}, key=str)
        if bad:
            raise SystemExit(
                f"hf-kd: the {split!r} split has labels {bad[:5]} outside 0..{len(names) - 1} ({len(names)} class "
                "names); fix the labels or class_names."
            )


# ---------------------------------------------------------------------------- tokenisation per task
def _sequence_classification(a, tokenizer, to_id):
    def tokenize(batch):
        texts = [batch[a.text_column]]
        if a.text_pair_column:
            texts.append(batch[a.text_pair_column])
        enc = tokenizer(*texts, truncation=True, max_length=a.max_length)
        labels = batch[a.label_column]
        enc["labels"] = [to_id[v] for v in labels] if to_id else labels
        return enc

    return tokenize


def _token_classification(a, tokenizer, _):
    def tokenize(batch):
        out = tokenizer(batch[a.text_column], is_split_into_words=True, truncation=True, max_length=a.max_length)
        labels = []
        for i, tags in enumerate(batch[a.label_column]):
            row, previous = [], None
            for word in out.word_ids(i):  # None for special tokens; a word's later sub-tokens repeat its id
                row.append(-100 if word is None or word == previous else int(tags[word]))
                previous = word
            labels.append(row)
        out["labels"] = labels
        return out

    return tokenize


def _question_answering(a, tokenizer, _):
    def tokenize(batch):
        out = tokenizer(batch[a.question_column], batch[a.context_column], truncation="only_second",
                        max_length=a.max_length, return_offsets_mapping=True)
        starts, ends = [], []
        for i, answer in enumerate(batch[a.answers_column]):
            first = answer["answer_start"][0]
            last = first + len(answer["text"][0])  # one past the answer's last character
            seq = out.sequence_ids(i)
            start = end = 0
            for k, (lo, hi) in enumerate(out["offset_mapping"][i]):
                if seq[k] != 1:
                    continue
                if lo <= first < hi:
                    start = k
                if lo < last <= hi:
                    end = k
            if end < start:  # the answer was cut off
                start = end = 0
            starts.append(start)
            ends.append(end)
        out.pop("offset_mapping")
        out["start_positions"], out["end_positions"] = starts, ends
        return out

    return tokenize


def _masked_lm(a, tokenizer, _):
    return lambda batch: tokenizer(batch[a.text_column], truncation=True, max_length=a.max_length)


def _seq2seq_lm(a, tokenizer, _):
    def tokenize(batch):
        out = tokenizer(batch[a.text_column], truncation=True, max_length=a.max_length)
        out["labels"] = tokenizer(text_target=batch[a.target_column], truncation=True,
                                  max_length=a.max_target_length)["input_ids"]
        return out

    return tokenize


TOKENIZERS = {
    "sequence_classification": _sequence_classification,
    "token_classification": _token_classification,
    "question_answering": _question_answering,
    "masked_lm": _masked_lm,
    "seq2seq_lm": _seq2seq_lm,
}


# ---------------------------------------------------------------------------- causal LM texts
def tokenize_texts(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each text (special tokens as the tokenizer adds them, then EOS), at most max_tokens."""
    eos = tokenizer.eos_token_id
    out = []
    for ids in tokenizer(list(texts))["input_ids"]:
        ids = list(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        out.append(ids[:max_tokens])
    return out


def pack_blocks(token_lists: list[list[int]], block_size: int) -> dict[str, list[list[int]]]:
    """Concatenate the texts' tokens and cut blocks of exactly block_size; the remainder is dropped."""
    stream = [t for ids in token_lists for t in ids]
    n = len(stream) // block_size
    blocks = [stream[i * block_size : (i + 1) * block_size] for i in range(n)]
    return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": [list(b) for b in blocks]}


def prompt_rows(texts: list[str], words: int) -> list[dict[str, str]]:
    """Prompt-completion rows from texts: the first `words` words, then the rest (with its leading space)."""
    rows = []
    for text in texts:
        split = text.split()
        if len(split) >= words + 2:
            rows.append({"prompt": " ".join(split[:words]), "completion": " " + " ".join(split[words:])})
    return rows


def _causal_lm_data(a, tokenizer, train, held) -> RunData:
    def texts(split, limit):
        column = [t for t in split[a.text_column] if t and t.strip()]
        return column[:limit] if limit is not None else column

    held_out = None
    if held is not None:
        ids = tokenize_texts(tokenizer, texts(held, a.max_eval_samples), a.block_size or a.max_length)
        held_out = Dataset.from_dict({"input_ids": ids})
    if "prompt" in train.column_names or "messages" in train.column_names:  # prompt-completion or chat data
        keep = [c for c in ("prompt", "completion", "messages") if c in train.column_names]
        rows = train.select_columns(keep)
        return RunData(rows.select(range(min(len(rows), a.max_train_samples or len(rows)))), None, held_out, None)
    train_texts = texts(train, a.max_train_samples)
    if a.prompt_words:
        rows = prompt_rows(train_texts, a.prompt_words)
        if not rows:
            raise SystemExit(f"hf-kd: no training text has prompt_words + 2 = {a.prompt_words + 2} words or more.")
        return RunData(Dataset.from_list(rows), None, held_out, None)
    if a.block_size:
        blocks = pack_blocks(tokenize_texts(tokenizer, train_texts, a.block_size), a.block_size)
        if not blocks["input_ids"]:
            raise SystemExit(f"hf-kd: the training texts hold fewer than block_size={a.block_size} tokens.")
        train_set = Dataset.from_dict(blocks)
    else:
        train_set = Dataset.from_dict(dict(tokenizer(train_texts, truncation=True, max_length=a.max_length)))
    return RunData(train_set, None, held_out, None)


# ---------------------------------------------------------------------------- collators
def collator_for(task: str, tokenizer, data_args, model=None, evaluation: bool = False):
    """The collator of `task` (`model`: seq2seq's decoder inputs). `evaluation`: for the held-out rows (masked LM
    always masks there, to measure; causal-LM texts are padded one per row)."""
    if task in ("masked_lm", "causal_lm") and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if task == "token_classification":
        return DataCollatorForTokenClassification(tokenizer)
    if task == "seq2seq_lm":
        return DataCollatorForSeq2Seq(tokenizer, model=model)
    if task == "masked_lm" and (data_args.mlm_probability or evaluation):
        return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=data_args.mlm_probability or 0.15)
    if task == "causal_lm" and not evaluation:
        if data_args.block_size:
            return default_data_collator  # blocks of one length: no padding
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return DataCollatorWithPadding(tokenizer)
