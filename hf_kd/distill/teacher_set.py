"""The teachers of a run: loaded, frozen, placed, run without autograd, mixed, and described.

A `TeacherSet` holds one or several teachers (or none, when a teacher cache replaces them), their weights
(normalised, see `hf_kd.teachers`), what runs their forward passes (the module, or the DeepSpeed engine that
partitions it) and the facts the checkpoint and the model card record of them (class, parameters, weights
hash, size), computed once, before sharding when the backend shards models.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import distributed, hub, teachers
from ..config import DistillationConfig
from ..errors import InputError
from ..measure import count_parameters, size_on_disk_mb
from ..tasks import unwrap
from .vocab import VocabPlan


def load_teachers(sources: list, args: DistillationConfig, task: str) -> list:
    """Every teacher loaded, and the refusals that concern several teachers (before any model check)."""
    if not sources:
        raise InputError("teacher_model is an empty list; give at least one teacher.")
    if args.teacher_weights is not None and len(args.teacher_weights) != len(sources):
        raise InputError(
            f"teacher_weights has {len(args.teacher_weights)} values for {len(sources)} teachers; give one weight "
            "per teacher, in the order of teacher_model (or leave it unset for equal weights)."
        )
    if len(sources) > 1 and (args.uses_hidden or args.uses_attention or args.uses_relations):
        raise InputError(
            f"hidden_weight, attention_weight and relation_weight need a single teacher, and {len(sources)} are "
            "given: the layers and embeddings of several teachers do not average (depths and widths differ). Set "
            "hidden_weight=0, attention_weight=0 and relation_weight=0 (the logits of all teachers are "
            "averaged), or distil from one teacher."
        )
    loaded = [teachers.load_teacher(source, task) for source in sources]
    if len(loaded) > 1:
        names = [str(s) if isinstance(s, (str, os.PathLike)) else type(unwrap(t)).__name__
                 for s, t in zip(sources, loaded)]
        problems = teachers.compatibility_problems([unwrap(t) for t in loaded], task, names)
        if problems:
            raise InputError("Cannot average these teachers:\n  - " + "\n  - ".join(problems))
    return loaded


def teacher_folder(source) -> str | None:
    """The local folder a teacher was named by, or None (a model object, a Hub id)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = os.path.expanduser(str(source))
    return path if os.path.isdir(path) else None


class TeacherSet:
    """The teachers of one run (``models`` empty when their outputs are read from a teacher cache)."""

    def __init__(self, models: list, sources: list, weights, cache_meta: dict | None = None, cache_path=None):
        self.models = models
        self.sources = [str(s) if isinstance(s, (str, os.PathLike)) else None for s in sources]
        self.weights = teachers.normalise_weights(weights, max(len(models), 1))
        self.cache_meta = cache_meta
        self.runners = list(models)  # replaced by `place`
        self.facts: dict = {}  # what the record says of the teacher; filled lazily or before sharding
        self.vocab = VocabPlan()  # what the teachers read of each batch (set by the start-up checks)
        for m in models:
            m.eval()
            m.requires_grad_(False)
        if cache_meta is not None:
            t = cache_meta["teacher"]
            self.class_name, self.width = t["class"], t["hidden_size"]
            self.facts.update(sha256=t["weights_sha256"], parameters=t["parameters"],
                              size=(None, f"not loaded: read from the cache {cache_path}"))
        else:
            self.class_name = type(models[0]).__name__  # before FSDP renames the class of a module it shards
            self.width = None

    def hidden_size(self) -> int:
        """The width of the first teacher's hidden states (read from the cache's metadata with a cache)."""
        return self.width if self.first is None else self.first.config.get_text_config().hidden_size

    @property
    def first(self):
        """The first teacher (layer pairs, evaluation, the card), or None with a teacher cache."""
        return self.models[0] if self.models else None

    @property
    def reads_student_batches(self):
        """The first teacher when it can run on the student's batches as they are (evaluation, latency), else None:
        no teacher (a cache), or a teacher with its own tokenizer (`hf_kd.distill.cross_tokenizer`)."""
        return self.first if self.vocab.cross is None else None

    def place(self, backend, accelerator, args: DistillationConfig, dtype) -> None:
        """Move (or partition) every teacher for `backend`; read its facts first if the backend shards it."""
        if backend.shards_models:  # read the whole teacher once, before it is split over the processes
            self.sha256(), self.parameters(), self.remember_size(), self.records()
        self.runners = [distributed.place_teacher(t, backend, accelerator, args, dtype) for t in self.models]

    def dtype(self, args: DistillationConfig, backend, accelerator, student) -> torch.dtype | None:
        """`teacher_dtype`: "auto" follows the student's floating dtype (under DeepSpeed, the dtype its engine gives
        the student), else the named dtype; None for quantized weights, which cannot be cast."""
        if getattr(self.first, "is_quantized", False):
            return None
        if args.teacher_dtype != "auto":
            return getattr(torch, args.teacher_dtype)
        if backend.kind == distributed.DEEPSPEED:
            return distributed.PRECISION_DTYPES.get(distributed.run_precision(accelerator), torch.float32)
        floats = [p.dtype for p in student.parameters() if p.is_floating_point()]
        return floats[0] if floats else torch.float32

    def keep_eval(self) -> None:
        for teacher in self.models:
            if teacher.training:  # someone called .train() on it: the teacher stays in eval mode
                teacher.eval()

    def forward(self, model_inputs: dict, extra: dict, autocast, *, kind: str, temperature: float, class_mask=None,
                labels=None):
        """The teachers' outputs without autograd; several teachers give one output whose logits are their mixture
        target (`hf_kd.teachers.combine_outputs`) and the first teacher's other fields. `labels`: the batch's (a
        seq2seq teacher with its own tokenizer reads the target text from them)."""
        model_inputs = self.vocab.teacher_inputs(model_inputs, labels)  # its own tokens, or the student's once checked
        with torch.no_grad(), autocast:  # mixed precision reaches the teacher too
            outputs = [runner(**model_inputs, **extra) for runner in self.runners]
        if len(outputs) == 1:
            return outputs[0]
        return teachers.combine_outputs(outputs, self.weights, kind=kind, temperature=temperature,
                                        class_mask=class_mask)

    # ------------------------------------------------------------ what the records say of the teachers
    def sha256(self) -> str:
        if "sha256" not in self.facts:
            teacher = self.first
            state = distributed.GatheredState(teacher) if distributed.is_partitioned(teacher) else teacher
            self.facts["sha256"] = hub.weights_sha256(state)
        return self.facts["sha256"]

    def parameters(self) -> int:
        if "parameters" not in self.facts:
            self.facts["parameters"] = count_parameters(self.first)
        return self.facts["parameters"]

    def remember_size(self) -> None:
        """The first teacher's size: its folder's weight files, else its weights in memory (unless partitioned)."""
        if "size" in self.facts:
            return
        teacher = self.first
        source = teacher.config.name_or_path
        if source and Path(source).is_dir() and size_on_disk_mb(source) > 0:
            self.facts["size"] = (size_on_disk_mb(source), "the weight files of its folder")
        elif not distributed.is_partitioned(teacher):
            self.facts["size"] = (hub.weights_size_mb(teacher), "its weights in their dtype")

    def size(self) -> tuple:
        return self.facts.get("size", (None, "unknown: the teacher was partitioned at load"))

    def records(self) -> list[dict]:
        """Name, class, parameters, weights hash and weight of every teacher (cached; computed before sharding)."""
        if "records" not in self.facts:
            self.facts["records"] = [
                {
                    "name_or_path": source or unwrap(teacher).config.name_or_path or type(unwrap(teacher)).__name__,
                    "class": type(teacher).__name__,
                    "parameters": self.parameters() if i == 0 else count_parameters(teacher),
                    "weights_sha256": self.sha256() if i == 0 else hub.weights_sha256(teacher),
                    "weight": weight,
                }
                for i, (teacher, source, weight) in enumerate(zip(self.models, self.sources, self.weights))
            ]
        return self.facts["records"]
