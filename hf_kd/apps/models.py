"""The models of a run: checked paths, the teacher(s) (fine-tuned first if asked), the student."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..distill.checks import check_tokenizers, load_tokenizer
from ..errors import InputError
from ..student import parse_student_config, resolve_student_layers, student_from_config, student_from_teacher
from ..tasks import TASKS, auto_class, tasks_of_class
from ..teachers import load_teacher
from .common import say
from .offline import resolve_model
from .prune import pruned_student
from .teacher import prepare_teacher


def check_model_paths(model_args, teacher_tokenizer: str | None = None) -> None:
    """A clear message for a teacher or student that is neither a readable model folder nor (online) a Hub id,
    and, unless `teacher_tokenizer` (the run's option) gives the teacher its own, for a student folder whose
    tokenizer numbers tokens otherwise than the teacher's."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    folders = {}
    for field_name in ("teacher_model_name_or_path", "student_model_name_or_path"):
        name = getattr(model_args, field_name)
        if not name:
            continue
        path = Path(os.path.expanduser(resolve_model(name)))
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise SystemExit(f"hf-kd: {field_name}={name!r} is a folder without config.json; point it at a folder "
                                 "saved with save_pretrained.")
            if not os.access(path / "config.json", os.R_OK):
                raise SystemExit(f"hf-kd: {field_name}={name!r}: {path / 'config.json'} is not readable; fix its "
                                 "permissions.")
            folders[field_name] = path
            _check_teacher_head(field_name, name, path, model_args)
        elif path.exists():
            raise SystemExit(f"hf-kd: {field_name}={name!r} is a file; give the model's folder.")
        elif offline or name.startswith((".", "/", "~")):
            raise SystemExit(
                f"hf-kd: {field_name}={name!r} does not exist"
                + (" and the Hub is offline (HF_HUB_OFFLINE=1)" if offline else "")
                + "; check the path, or give a Hub id while online."
            )
    if len(folders) == 2 and teacher_tokenizer is None:
        try:
            check_tokenizers(load_tokenizer(str(folders["student_model_name_or_path"])),
                             load_tokenizer(str(folders["teacher_model_name_or_path"])))
        except InputError as err:
            raise SystemExit(f"hf-kd: {err} On the command line: --teacher_tokenizer "
                             f"{model_args.teacher_model_name_or_path} (or teacher_tokenizer: in the recipe).") from None


def _check_teacher_head(field_name: str, name: str, path: Path, model_args) -> None:
    """A teacher used as is must have been saved with the task's head (a student may start from a base model:
    its new head is trained)."""
    if not field_name.startswith("teacher") or model_args.teacher_finetune_epochs > 0:
        return
    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    if architectures and not any(model_args.task in tasks_of_class(a) for a in architectures):
        what = {"sequence_classification": "sequence classifier"}.get(model_args.task,
                                                                     model_args.task.replace("_", " ") + " model")
        raise SystemExit(
            f"hf-kd: {field_name}={name!r} is a {architectures[0]}, not a {what} ({TASKS[model_args.task][1]}): "
            "its task head would be random or mean something else. Give a teacher fine-tuned for the task, or set "
            "teacher_finetune_epochs > 0 to fine-tune it first."
        )


def load_teachers(model_args, data_args, config, data, tokenizer) -> tuple[list, list, list]:
    """(teacher models, [(folder, fine-tune seconds)], seeds): one teacher per `teacher_seed`."""
    seeds = getattr(model_args, "teacher_seeds", [model_args.teacher_seed])
    if len(seeds) > 1 and config.teacher_cache:
        raise SystemExit("hf-kd: teacher_cache holds one teacher's outputs; give one teacher_seed.")
    prepared = [prepare_teacher(model_args, data_args, config, data, tokenizer, seed=s) for s in seeds]
    try:
        teachers = [load_teacher(folder, model_args.task) for folder, _ in prepared]
    except InputError as err:
        raise SystemExit(f"hf-kd: {err}") from None
    if len(teachers) > 1:  # teacher_seed: [a, b, ...]: one fine-tuned teacher per seed, distilled together
        say(f"teachers: {len(prepared)} fine-tunes (seeds {seeds}), distilled together")
    return teachers, prepared, seeds


def make_student(model_args, teacher, train=None, tokenizer=None) -> tuple:
    """(student, how it was made): the given one, teacher layers with their weights, the teacher pruned by importance
    measured on the training rows `train` (student_prune), or a fresh config."""
    if model_args.student_model_name_or_path:
        cls = auto_class(model_args.task)
        return cls.from_pretrained(resolve_model(model_args.student_model_name_or_path)), model_args.student_model_name_or_path
    try:
        if model_args.student_layers:
            depth = teacher.config.get_text_config().num_hidden_layers
            layers = resolve_student_layers(model_args.student_layers, depth)
            return student_from_teacher(teacher, layers), f"teacher layers {layers}"
        if model_args.student_config:
            changes = parse_student_config(model_args.student_config)
            return student_from_config(teacher, changes), f"fresh weights, the teacher's config with {json.dumps(changes)}"
        if model_args.student_prune:
            return pruned_student(model_args.student_prune, teacher, train, tokenizer)
    except ValueError as err:
        raise SystemExit(f"hf-kd: {err}") from None
    raise SystemExit("hf-kd: give student_model_name_or_path, student_layers (e.g. [1,3,5] or 3), student_config or "
                     "student_prune.")
