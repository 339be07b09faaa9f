"""What the model card adds to the run record: the evaluations of student and teacher, sizes and latencies.

Helpers over values: the trainer gives them its recorded evaluations (`Evaluations`), its models and one collated
batch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .. import hub
from ..errors import InputError
from ..measure import count_parameters, measure_latency_ms, size_on_disk_mb
from .teacher_set import TeacherSet

LATENCY_METHOD = "median of 5 forward passes at batch 1, of 3 at larger batches, after a warm-up"


def card_evaluation(evaluations: dict, step: int, split, rows) -> dict | None:
    """The card's evaluation section: the student's metrics at this step (an older step describes other
    weights) and the teacher's; None when neither was evaluated."""
    out = {}
    student, teacher = evaluations.get("student"), evaluations.get("teacher")
    if student is not None and student[0] == step:
        out["student"] = hub.card_metrics(student[2], student[1])
    if teacher is not None:
        out["teacher"] = hub.card_metrics(teacher[2], teacher[1])
    return {"split": split, "rows": rows, **out} if out else None


def latencies(models: dict, batch: dict) -> tuple[list[int], dict]:
    """Batch sizes (1 and the batch's) and each model's median forward time at each, in ms."""
    sizes = sorted({1, next(iter(batch.values())).shape[0]})
    timings = {
        role: {str(b): measure_latency_ms(model, {k: v[:b] for k, v in batch.items()}, repeats=5 if b == 1 else 3,
                                          warmup=1) for b in sizes}
        for role, model in models.items() if model is not None
    }
    return sizes, timings


class Evaluations:
    """The last evaluation of each role ("student", "teacher") on the trainer's own evaluation split, as
    ``(global_step, metric_key_prefix, metrics)``: the ones the model card reports; `teacher`: whether the
    evaluation running now is the teacher's."""

    def __init__(self):
        self.records: dict[str, tuple[int, str, dict]] = {}
        self.teacher = False

    def record(self, step: int, prefix: str, metrics: dict) -> None:
        self.records["teacher" if self.teacher else "student"] = (step, prefix, dict(metrics))

    @contextlib.contextmanager
    def of_teacher(self, teacher, args):
        """An evaluation of `teacher` (`TeacherSet.reads_student_batches`) through the student's loop; refused
        when there is none that reads the student's batches."""
        if teacher is None:
            raise InputError(
                f"there is no teacher to evaluate on the student's batches: this trainer reads its targets from "
                f"teacher_cache={args.teacher_cache} or the teacher has its own tokenizer (teacher_tokenizer="
                f"{args.teacher_tokenizer}). Evaluate the teacher on its own data with transformers.Trainer."
            )
        self.teacher = True
        try:
            yield
        finally:
            self.teacher = False


class Latency:
    """Student and teacher latencies for the card, measured at most once per optimizer step."""

    def __init__(self):
        self.step, self.timed = None, None

    def measure(self, step: int, batch_fn, models: dict) -> tuple | None:
        """(batch sizes, timings) at `step`; `batch_fn()` gives one collated batch, or None (nothing timed)."""
        if self.step != step:
            batch = batch_fn()
            if batch is not None:
                self.step, self.timed = step, latencies(models, batch)
        return self.timed if self.step == step else None


def measurements(folder, student, teachers: TeacherSet, device, timed: tuple | None) -> dict:
    """Parameters, sizes and (when `timed` = (batch sizes, timings)) latencies of student and teacher."""
    teachers.remember_size()  # once; a teacher partitioned at load keeps "unknown" (its facts were read before)
    t_size, t_source = teachers.size()
    out = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_sizes": [],
        "student": {"parameters": count_parameters(student), "size_mb": size_on_disk_mb(folder)},
        "teacher": {"parameters": teachers.parameters(), "size_mb": t_size, "size_source": t_source},
    }
    if timed is not None:
        out["batch_sizes"], out["method"] = timed[0], LATENCY_METHOD
        for role, timing in timed[1].items():
            out[role]["latency_ms"] = timing
    return out


def write_card(folder, record: dict, evaluations: dict, step: int, eval_rows, student, teachers: TeacherSet, device,
               timed: tuple | None) -> None:
    """Complete the provenance `record` (name, evaluation, measurements), write it and render the card from it."""
    record["model_name"] = record["model_name"] or Path(folder).absolute().name
    record["evaluation"] = card_evaluation(evaluations, step, record["data"]["eval_split"], eval_rows)
    record["measurements"] = measurements(folder, student, teachers, device, timed)
    hub.write_provenance(folder, record)
    hub.render_card(record).save(Path(folder) / hub.CARD_NAME)
