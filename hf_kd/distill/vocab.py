"""The student's and the teacher's vocabularies: compared at start-up, cut when padded, guarded at each batch.

Three cases, decided once by `plan_vocab`:

* **One tokenizer** (or none known) and equal output sizes: nothing to do.
* **One tokenizer, embeddings padded to different sizes** (Qwen2.5: 151,936 vs 152,064 rows for 151,665
  tokens): the logit losses read the first ``classes`` logits of both models, the tokenizer's real
  vocabulary, and the log says so. Ids past it are never produced by the tokenizer.
* **Two tokenizers**: refused, naming both and the option, unless ``teacher_tokenizer`` is set; then the
  teacher reads its own tokenization of the text (`hf_kd.distill.cross_tokenizer`).

In every case the ids a batch gives the teacher are checked against the rows of its input embeddings
before its forward pass (`VocabPlan.teacher_inputs`): an id it cannot embed is a clear error, not an
``IndexError: index out of range in self`` from inside the embedding.
"""

from __future__ import annotations

import logging

import torch
from transformers import AutoTokenizer

from ..errors import InputError
from ..tasks import TOKEN_TASKS
from .cross_tokenizer import CrossTokenizer

logger = logging.getLogger(__name__)

#: Keys of the model inputs that hold token ids the teacher embeds.
ID_KEYS = ("input_ids", "decoder_input_ids")


def text_tokenizer(tokenizer):
    """The tokenizer of a processor (``processor.tokenizer``), or the tokenizer itself; None stays None."""
    return getattr(tokenizer, "tokenizer", tokenizer)


def tokenizer_name(tokenizer) -> str:
    """How a message names a tokenizer: its folder or Hub name, else its class."""
    name = getattr(tokenizer, "name_or_path", None)
    return repr(name) if name else f"a {type(tokenizer).__name__}"


def vocabulary_difference(student_tokenizer, teacher_tokenizer) -> str | None:
    """How two tokenizers number their tokens differently (entry by entry, not by size), or None when they agree.

    None also when either tokenizer is unknown or has no vocabulary to compare."""
    s, t = text_tokenizer(student_tokenizer), text_tokenizer(teacher_tokenizer)
    if not (hasattr(s, "get_vocab") and hasattr(t, "get_vocab")):
        return None
    sv, tv = s.get_vocab(), t.get_vocab()
    if sv == tv:
        return None
    moved = sorted(tok for tok in sv.keys() & tv.keys() if sv[tok] != tv[tok])
    only = sorted(sv.keys() ^ tv.keys())
    detail = []
    if moved:
        tok = moved[0]
        detail.append(f"{len(moved)} tokens have other ids (e.g. {tok!r} is {sv[tok]} for the student, {tv[tok]} "
                      "for the teacher)")
    if only:
        detail.append(f"{len(only)} tokens are in one vocabulary only (e.g. {only[0]!r})")
    return (f"the student's tokenizer ({tokenizer_name(s)}, {len(sv)} tokens) and the teacher's ({tokenizer_name(t)}, "
            f"{len(tv)} tokens) differ: " + "; ".join(detail))


def embedding_rows(model) -> int | None:
    """How many token ids `model` can embed (rows of its input embeddings), or None when it does not say."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    rows = getattr(emb, "num_embeddings", None)
    return int(rows) if rows else None


def id_problem(ids, rows: int | None, where: str) -> str | None:
    """The message when `ids` (a tensor, or lists of ints) hold an id `rows` embeddings cannot take, else None."""
    if ids is None or rows is None:
        return None
    if torch.is_tensor(ids):
        high = int(ids.max()) if ids.numel() else -1
    else:
        values = [int(v) for row in ids for v in (row.tolist() if torch.is_tensor(row) else row)]
        high = max(values, default=-1)
    if high < rows:
        return None
    return (f"{where} holds token id {high} but the teacher embeds only {rows} tokens (ids 0..{rows - 1}): the text "
            "was tokenized with another tokenizer than the teacher's. Tokenize with the teacher's tokenizer, or set "
            "teacher_tokenizer=<the teacher's tokenizer> in DistillationConfig to distil across tokenizers (the "
            "teacher then re-tokenizes the text; see docs/cross-tokenizer.md).")


class VocabPlan:
    """What the vocabularies of one student-teacher pair mean for a run.

    ``classes``: LM tasks with one tokenizer padded to two sizes, the logits both models keep (None: all);
    ``teacher_rows``: ids the teacher embeds (the guard); ``cross``: the `CrossTokenizer` when the teacher reads
    its own tokenization (then the student's ids never reach it), else None.
    """

    def __init__(self, classes: int | None = None, teacher_rows: int | None = None, cross=None):
        self.classes, self.teacher_rows, self.cross = classes, teacher_rows, cross

    def teacher_inputs(self, model_inputs: dict, labels=None) -> dict:
        """What the teacher's forward pass takes for this batch: its own tokenization across tokenizers (seq2seq: of
        the target text in `labels` too), else the student's inputs, once checked against its embeddings."""
        if self.cross is not None:
            return self.cross.teacher_inputs(model_inputs, labels)
        for key in ID_KEYS:
            problem = id_problem(model_inputs.get(key), self.teacher_rows, f"this batch's {key}")
            if problem:
                raise InputError(problem)
        return model_inputs

    def terms(self, batch, targets, counts, temperature, alpha):
        """Across tokenizers, the logit terms on the aligned logits (`CrossTokenizer.terms`); else None."""
        return None if self.cross is None else self.cross.terms(batch, targets, counts, temperature, alpha)


def load_teacher_tokenizer(name: str):
    """``teacher_tokenizer``: a folder or Hub name, loaded with AutoTokenizer; a clear error when it cannot be."""
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # noqa: BLE001 - every failure becomes one message
        raise InputError(f"teacher_tokenizer={name!r} could not be loaded ({type(err).__name__}: {err}). Give the "
                         "folder or Hub name of the teacher's tokenizer (a folder holding tokenizer.json).") from err


def _output_sizes(student, teacher) -> tuple[int, int]:
    return student.config.get_text_config().vocab_size, teacher.config.get_text_config().vocab_size


def plan_vocab(student, teacher, args, task: str, student_tokenizer, teacher_tokenizer) -> VocabPlan:
    """The `VocabPlan` of a pair, or the refusal: two tokenizers without ``teacher_tokenizer``; LM logits of two
    sizes whose tokenizers are unknown; ids past the teacher's embeddings.

    `student_tokenizer`: the trainer's processing class; `teacher_tokenizer`: the one given to the trainer or saved
    in the teacher's folder (None when unknown). ``args.teacher_tokenizer`` turns the cross-tokenizer mode on.
    """
    s_tok, t_tok = text_tokenizer(student_tokenizer), text_tokenizer(teacher_tokenizer)
    if args.teacher_tokenizer is not None:
        t_tok = t_tok if t_tok is not None else load_teacher_tokenizer(args.teacher_tokenizer)
        return VocabPlan(cross=CrossTokenizer.start(student, teacher, args, task, s_tok, t_tok))
    difference = vocabulary_difference(s_tok, t_tok)
    if difference:
        raise InputError(
            f"{difference}. Both models would read the same input_ids. Either tokenize with the teacher's tokenizer "
            "and build the student from it (e.g. hf_kd.student.student_from_teacher), or set "
            f"teacher_tokenizer={getattr(t_tok, 'name_or_path', None) or '<the teacher tokenizer>'!r} in "
            "DistillationConfig to distil across tokenizers (see docs/cross-tokenizer.md)."
        )
    rows, classes = embedding_rows(teacher), None
    if args.uses_teacher_logits and task in TOKEN_TASKS and task != "token_classification":
        sv, tv = _output_sizes(student, teacher)
        if sv != tv:
            known = s_tok if s_tok is not None else t_tok
            if known is None or not hasattr(known, "__len__"):
                raise InputError(
                    f"the student's vocabulary has {sv} tokens and the teacher's {tv}, and their tokenizers are "
                    "unknown. One tokenizer with embeddings padded to two sizes is cut to the shared vocabulary "
                    "automatically: pass processing_class=<tokenizer> (and teacher_tokenizer=<its tokenizer> to "
                    "DistillationTrainer unless the teacher's folder holds it). Two different tokenizers: set "
                    "teacher_tokenizer in DistillationConfig; or set alpha=0 and distil hidden states only."
                )
            classes = min(len(known), sv, tv)
            logger.warning(
                "Student and teacher share one tokenizer (%d tokens) but their output layers have %d and %d rows "
                "(embeddings padded to different sizes): the logit losses use the first %d logits of both.",
                len(known), sv, tv, classes)
    return VocabPlan(classes=classes, teacher_rows=rows)
