"""Start-up refusals: what must hold of the models, tokenizers and data before a training step runs."""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoTokenizer

from .. import adapters, distributed, teacher_cache
from ..config import DistillationConfig
from ..errors import InputError
from ..tasks import unwrap
from . import vocab
from .plan import LossPlan, build_plan
from .teacher_set import TeacherSet, load_teachers, teacher_folder

logger = logging.getLogger(__name__)


def load_tokenizer(folder: str):
    """The tokenizer saved in a model folder, or None when the folder holds none."""
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001 - an unreadable tokenizer only disables the comparison
        logger.warning("Could not load the tokenizer in %s; the tokenizer check is skipped.", folder)
        return None


def check_tokenizers(student_tokenizer, teacher_tokenizer) -> None:
    """Teacher and student read the same input_ids, so their vocabularies must map tokens to the same ids
    (compared entry by entry, not by size; see `hf_kd.distill.vocab`, which also names the cross-tokenizer option)."""
    difference = vocab.vocabulary_difference(student_tokenizer, teacher_tokenizer)
    if difference:
        raise InputError(
            f"{difference}. Both models read the same input_ids, so they need the same tokenizer: tokenize with the "
            "teacher's and build the student from it (e.g. hf_kd.student.student_from_teacher), or distil across "
            "tokenizers with teacher_tokenizer=<the teacher's tokenizer> (see docs/cross-tokenizer.md)."
        )


#: Rows of a training set scanned for labels and lengths before training (the checks stay cheap on big data).
SCAN_ROWS = 10_000


def check_arguments(model, teacher_model, args, kwargs: dict) -> None:
    """What DistillationTrainer must be given: a DistillationConfig, a student (or model_init), and a teacher or a
    teacher cache."""
    if not isinstance(args, DistillationConfig):
        raise TypeError(
            "DistillationTrainer needs args=DistillationConfig(...) (a TrainingArguments subclass with the "
            f"distillation settings), got {type(args).__name__}."
        )
    model_init = kwargs.get("model_init")
    if model is not None and model_init is not None:
        raise ValueError("DistillationTrainer takes model (the student) or model_init (a function that builds one, "
                         "e.g. for hyperparameter_search), not both.")
    if (model is None and model_init is None) or (teacher_model is None) == (args.teacher_cache is None):
        raise ValueError(
            "DistillationTrainer needs model (the student) or model_init, and either teacher_model or "
            "args.teacher_cache (with teacher_cache, pass teacher_model=None: the cache replaces the teacher)."
        )


def check_launch(world_size: int) -> None:
    """Processes that would each train alone are refused; a single CPU process that could be several gets a hint."""
    problem = distributed.launch_problem(world_size)  # args.world_size sets up the processes
    if problem:
        raise InputError(problem)
    hint = distributed.single_cpu_launch_hint(world_size)
    if hint:
        logger.warning(hint)


def fail_together(error: BaseException | None, world_size: int) -> None:
    """Raise on every process when one failed: the first failure's message, this process's own error where it has one.

    A check that fails on one process only (a teacher folder missing on one node, weights on the meta device on
    all but the first) must stop every process, or the others wait in their first collective."""
    messages = distributed.gather_messages(None if error is None else str(error), world_size)
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if failed:
        rank, message = failed[0]
        raise InputError(f"process {rank} of {world_size} refused to start, so every process stops: {message}")


def prepare_student(model, args, task: str):
    """The student as trained: wrapped with ``args.peft_config`` when set (see `hf_kd.adapters`)."""
    if args.peft_config is not None and adapters.is_peft_model(model):
        raise InputError(
            "the student is already a peft.PeftModel and peft_config is set too: unset peft_config to train the "
            "model's own adapter, or pass the plain transformers model to have peft_config's adapter added."
        )
    if args.merge_adapter_on_save and args.peft_config is None and not adapters.is_peft_model(model):
        logger.warning("merge_adapter_on_save=True has no effect: the student has no adapter (no peft_config).")
    return adapters.wrap_student(model, args.peft_config, task)


def check_placement(student, teacher) -> None:
    """Weights that were never loaded cannot be moved; say so here rather than deep inside `.to()`."""
    for name, m in (("teacher", teacher), ("student", student)):
        if m is not None and any(p.is_meta for p in m.parameters()):
            raise InputError(
                f"the {name}'s weights are on the 'meta' device (created without data, e.g. under "
                "init_empty_weights or device_map='meta'). Load it with from_pretrained(path) (optionally "
                "device_map='cpu' or 'cuda'); DistillationTrainer moves the teacher to the student's device."
            )


def _columns_reader(dataset, n: int):
    """A function name -> values of the first rows (None when absent), or None when the rows are not dicts."""
    rows = min(n, SCAN_ROWS)
    columns = getattr(dataset, "column_names", None)
    if columns is not None:  # datasets.Dataset: read columns, not rows
        head = dataset.select(range(rows)) if rows < n else dataset
        return lambda name: head[name] if name in columns else None
    sample = [dataset[i] for i in range(min(rows, SCAN_ROWS // 10))]  # __getitem__ may tokenize: fewer
    if not all(isinstance(r, dict) for r in sample):
        return None
    return lambda name: [r[name] for r in sample] if all(name in r for r in sample) else None


def _length_problem(get, student, teacher) -> str | None:
    limits = []
    for who, m in (("student", student), ("teacher", teacher)):
        if m is None:  # teacher_cache: the teacher saw this data already
            continue
        limit = getattr(m.config.get_text_config(), "max_position_embeddings", None)
        if limit:
            limits.append((limit, who))
    ids = get("input_ids")
    if ids is None or not limits:
        return None
    longest, (limit, who) = max(len(x) for x in ids), min(limits)
    if longest > limit:
        return (f"train_dataset has sequences of {longest} tokens, longer than the {who}'s "
                f"max_position_embeddings={limit}. Tokenize with truncation=True, max_length={limit} (or less).")
    return None


def _label_problem(get, student, task: str) -> str | None:
    labels = get("labels")
    if labels is None and task in ("sequence_classification", "token_classification"):
        labels = get("label")
    if labels is None or task == "question_answering":
        return None
    flat = []
    for v in labels:
        v = v.tolist() if torch.is_tensor(v) else v
        flat.extend(v if isinstance(v, (list, tuple)) else [v])
    values = [int(v) for v in flat if v is not None and int(v) != -100]
    if task in ("masked_lm", "causal_lm", "seq2seq_lm"):
        high, what = student.config.get_text_config().vocab_size, "vocabulary size"
    else:
        high, what = student.config.num_labels, "num_labels"
    bad = sorted({v for v in values if not 0 <= v < high})
    if bad:
        return (f"train_dataset has labels {bad[:5]} outside 0..{high - 1} (the student's {what} is {high}; "
                "-100 marks ignored positions). Map the labels to 0..N-1, or build the student and the teacher "
                "with num_labels covering them.")
    return None


def check_dataset(dataset, student, teacher, task: str, teacher_rows: int | None = None) -> None:
    """Empty data, labels outside the head, sequences longer than either model's positions.

    `teacher_rows`: how many ids the teacher embeds when it reads the student's input_ids (else None).
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
        raise InputError("train_dataset is empty (0 rows). Check the split name and any filtering or max_train_samples.")
    get = _columns_reader(dataset, n)
    if get is None:
        return
    ids = vocab.id_problem(get("input_ids"), teacher_rows, f"train_dataset's input_ids (first {min(n, SCAN_ROWS)} rows)")
    problems = [p for p in (_length_problem(get, student, teacher), _label_problem(get, student, task), ids) if p]
    if problems:
        raise InputError("Cannot train on this data:\n  - " + "\n  - ".join(problems))


def start(student, sources: list, args: DistillationConfig, task: str, teacher_tokenizer, train_dataset,
          processing_class) -> tuple[TeacherSet, LossPlan]:
    """The teachers and the loss plan of a run, after every start-up check; `student` is the transformers model."""
    if args.teacher_cache is not None:  # the teacher's outputs are read from disk: no teacher at all
        meta = teacher_cache.read_cache_metadata(args.teacher_cache)
        pairs = teacher_cache.check_cache(meta, args.teacher_cache, args, task, student, train_dataset)
        check_dataset(train_dataset, student, None, task)
        return TeacherSet([], sources, args.teacher_weights, meta, args.teacher_cache), LossPlan(args, pairs)
    loaded = load_teachers(sources, args, task)
    if args.teacher_tokenizer is not None and len(loaded) > 1:
        raise InputError(f"teacher_tokenizer is set and {len(loaded)} teachers are given: the alignment across "
                         "tokenizers serves one teacher. Distil from one teacher, or unset teacher_tokenizer.")
    for source, teacher in reversed(list(zip(sources, loaded))):  # the first last: its plan is kept
        plan = build_plan(student, unwrap(teacher), args, task)
        check_placement(student, unwrap(teacher))
        folder = teacher_folder(source)
        named = args.teacher_tokenizer is not None  # the tokenizer object given > teacher_tokenizer's name > the folder's
        tokenizer = teacher_tokenizer if teacher_tokenizer is not None or not folder or named else load_tokenizer(folder)
        vocab_plan = vocab.plan_vocab(student, unwrap(teacher), args, task, processing_class, tokenizer)
        if vocab_plan.cross is None:  # every teacher reads the student's ids: the fewest rows bound them
            rows = [r for r in (vocab.embedding_rows(unwrap(t)) for t in loaded) if r is not None]
            vocab_plan.teacher_rows = min(rows, default=None)
        check_dataset(train_dataset, student, unwrap(teacher), task, vocab_plan.teacher_rows)
    teacher_set = TeacherSet(loaded, sources, args.teacher_weights)
    teacher_set.vocab = vocab_plan  # the first teacher's: the ids each batch gives it, the logits kept
    return teacher_set, plan
