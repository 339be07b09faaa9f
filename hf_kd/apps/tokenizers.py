"""The tokenizers of a run: the teacher folder's, read by both models; or, with ``teacher_tokenizer``, one per
model (docs/cross-tokenizer.md).

With ``teacher_tokenizer`` the student reads the tokenizer of its own folder (the teacher folder's when the student
is made from the teacher), the teacher reads ``teacher_tokenizer``'s: the run's data is tokenized twice, once for
the student (distillation, baseline, the student's scores) and once for the teacher (its fine-tune, its scores),
and the trainer is given the teacher's tokenizer to re-tokenize each batch's text for the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoTokenizer

from ..distill.cross_tokenizer import CROSS_TASKS
from ..distill.vocab import load_teacher_tokenizer
from ..errors import InputError
from .offline import resolve_model


@dataclass
class Tokenizers:
    """The student's and the teacher's tokenizer of a run: one object for both unless ``teacher_tokenizer`` is set."""

    student: object
    teacher: object

    @property
    def cross(self) -> bool:
        """Whether the teacher reads its own tokenization of the text."""
        return self.teacher is not self.student


def student_tokenizer_folder(model_args) -> str:
    """Where the student's tokenizer is read with ``teacher_tokenizer``: the student's folder, else (a student made
    from the teacher) the teacher's."""
    return model_args.student_model_name_or_path or model_args.teacher_model_name_or_path


def load_tokenizers(model_args, config) -> Tokenizers:
    if config.teacher_tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_args.teacher_model_name_or_path))
        return Tokenizers(tokenizer, tokenizer)
    try:
        teacher = load_teacher_tokenizer(resolve_model(config.teacher_tokenizer))
    except InputError as err:
        raise SystemExit(f"hf-kd: {err}") from None
    return Tokenizers(AutoTokenizer.from_pretrained(resolve_model(student_tokenizer_folder(model_args))), teacher)


def teacher_tokenizer_problems(model_args, teacher_tokenizer: str | None) -> list[str]:
    """``teacher_tokenizer`` of an app run: a task aligned across tokenizers, one teacher, a tokenizer that loads."""
    if teacher_tokenizer is None:
        return []
    problems, task = [], model_args.task
    if len(getattr(model_args, "teacher_seeds", [])) > 1:
        problems.append("teacher_tokenizer aligns one teacher's tokens; teacher_seed lists several teachers. Give one "
                        "teacher_seed, or unset teacher_tokenizer.")
    if task not in CROSS_TASKS:
        problems.append(f"teacher_tokenizer is set but a {task} run cannot distil across tokenizers (supported: "
                        f"{', '.join(CROSS_TASKS)}); give a student with the teacher's tokenizer and unset "
                        "teacher_tokenizer.")
    try:
        load_teacher_tokenizer(resolve_model(teacher_tokenizer))
    except InputError as err:
        problems.append(str(err))
    return problems
