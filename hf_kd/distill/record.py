"""The run record: one description of what made a student, read by the checkpoint signature and the provenance.

`RunRecord.signature(student)` is what a checkpoint must be resumed with (teacher weights, student
architecture, loss); `RunRecord.provenance(...)` is the full record behind ``hf_kd_provenance.json`` and the
model card (versions, command, teacher, student, distillation settings, data, training). Both read the same
teacher facts (`TeacherSet`) and the same loss record (`LossPlan.record`).
"""

from __future__ import annotations

import datetime

import torch
import transformers

from .. import hub
from ..config import DistillationConfig
from ..measure import count_parameters
from ..version import __version__
from .plan import LossPlan
from .teacher_set import TeacherSet


def length(dataset) -> int | None:
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:  # an IterableDataset
        return None


class RunRecord:
    """Built once per trainer from the config, the task, the loss plan, the teachers and the projections."""

    def __init__(self, args: DistillationConfig, task: str, plan: LossPlan, teachers: TeacherSet, projections: int):
        self.args, self.task, self.plan, self.teachers, self.projections = args, task, plan, teachers, projections

    def teacher_signature(self) -> dict:
        out = {"class": self.teachers.class_name, "weights_sha256": self.teachers.sha256()}
        if len(self.teachers.models) > 1:
            out.update(all_weights_sha256=[r["weights_sha256"] for r in self.teachers.records()],
                       weights=self.teachers.weights)
        return out

    def signature(self, student) -> dict:
        """What a checkpoint was made with and must be resumed with: teacher weights, student architecture, loss."""
        text = student.config.get_text_config()
        return {
            "teacher": self.teacher_signature(),
            "student": {
                "class": type(student).__name__,
                "config_class": type(student.config).__name__,
                **{k: getattr(text, k, None) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")},
                "num_labels": getattr(student.config, "num_labels", None),
            },
            "loss": self.plan.record(self.projections),
        }

    def distillation(self) -> dict:
        """The loss record with the layer maps as given (jsd_beta only for the JSD)."""
        args = self.args
        out = {**self.plan.record(self.projections), "layer_map": args.layer_map}
        if args.decoder_layer_map is not None:
            out["decoder_layer_map"] = args.decoder_layer_map
        if args.kd_loss != "jsd":
            del out["jsd_beta"]
        return out

    def teacher(self, info: hub.CardInfo) -> dict:
        """The provenance's teacher: as named by the caller, where it was loaded from, its weights."""
        meta, args = self.teachers.cache_meta, self.args
        cached = meta["teacher"] if meta is not None else None
        first = self.teachers.first
        loaded_from = first.config.name_or_path if cached is None else cached["name_or_path"]
        note = info.teacher_note
        if cached is not None:
            note = "; ".join(filter(None, [
                info.teacher_note, f"its outputs were read from the cache {args.teacher_cache} "
                f"(top-{meta['top_k']} logits at temperature {meta['temperature']})"]))
        return {
            "name_or_path": info.teacher or self.teachers.sources[0] or loaded_from,
            "note": note,
            "loaded_from": loaded_from,
            "revision": getattr(first.config, "_commit_hash", None) if cached is None else None,
            "class": self.teachers.class_name,
            "parameters": self.teachers.parameters(),
            "weights_sha256": self.teachers.sha256(),
        }

    def provenance(self, *, wrapped, student, info: hub.CardInfo, overrides: dict, state, datasets: tuple) -> dict:
        """What made the student: versions, command, teacher (name, revision, weights hash), settings, config.

        `wrapped` is the student as trained (a PEFT model or the model), `student` the transformers model in it;
        `datasets` the (train, eval) datasets."""
        args = self.args
        overrides = {k: v for k, v in overrides.items() if v is not None}
        teacher = self.teacher(info)
        base_model = overrides.get("base_model") or info.base_model
        if base_model is None and hub.is_hub_id(teacher["name_or_path"]):
            base_model = teacher["name_or_path"]
        train, evaluation = datasets
        eval_split = info.eval_split or getattr(evaluation, "split", None)
        return {
            "hf_kd_version": __version__,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model_name": overrides.get("model_name") or info.model_name,
            "task": self.task,
            "command": info.command or (f"{hub.command_line()}  # Python API (hf_kd.DistillationTrainer): the "
                                        f"settings are in {hub.PROVENANCE_NAME}"),
            "license": overrides.get("license") or info.license,
            "language": overrides.get("language") or info.language,
            "tags": list(dict.fromkeys([*info.tags, *overrides.get("tags", [])])),
            "teacher": teacher,
            **({"teachers": self.teachers.records()} if len(self.teachers.models) > 1 else {}),
            "student": {
                "init": info.student_init or f"the given model {student.config.name_or_path or type(student).__name__}",
                "class": type(student).__name__,
                "adapter": student is not wrapped,  # a PEFT model: the folder holds the adapter only
                "base_model": base_model,
                "parameters": count_parameters(student),
            },
            "distillation": self.distillation(),
            "data": {
                "dataset": overrides.get("dataset") or info.dataset, "dataset_config": info.dataset_config,
                "train_split": info.train_split, "eval_split": str(eval_split) if eval_split is not None else None,
                "train_rows": length(train), "eval_rows": length(evaluation),
            },
            "training": {
                "global_step": state.global_step, "epoch": state.epoch, "learning_rate": args.learning_rate,
                "per_device_train_batch_size": args.per_device_train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "world_size": args.world_size, "seed": args.seed,
            },
            "config": args.to_dict(),  # tokens are masked by TrainingArguments.to_dict
            "extra": info.extra,
        }
