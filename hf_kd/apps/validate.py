"""One check of a run before anything happens: recipe values, flags, models, data, the folders it writes, the
optional packages it needs. Every problem found is reported at once, in one `InputError` whose lines name the
problem and the fix; nothing has been loaded into a model or written by then.

`hf-kd distill` and `hf-kd cache-teacher` call `validate_run`; `hf-kd init-student` calls
`init_student_problems` and `hf-kd push` `repo_id_problem`. What only a loaded model can tell (its labels against
the teacher's, a layer map against its depth) is checked by the trainer's start-up checks (`hf_kd.distill.checks`),
still before the first step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoConfig, Trainer
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

from ..errors import InputError
from ..student import parse_student_config, resolve_student_layers
from ..teacher_cache import METADATA_NAME
from .common import check_output_dir, say
from .data import load_raw, raw_problems
from .models import check_model_paths
from .offline import resolve_model
from .tokenizers import teacher_tokenizer_problems

#: A folder holds weights when it has one of these (sharded checkpoints have an index).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                "adapter_model.safetensors", "adapter_model.bin", "tf_model.h5", "flax_model.msgpack")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "spiece.model", "vocab.json")
#: report_to integrations whose package transformers looks for, and the pip name of each where it differs.
CHECKED_REPORTERS = ("azure_ml", "comet_ml", "dagshub", "dvclive", "mlflow", "neptune", "tensorboard", "wandb",
                     "codecarbon", "clearml", "swanlab", "trackio")
PIP_NAMES = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "neptune": "neptune"}
#: resume_from_checkpoint values that are no path.
RESUME_WORDS = ("auto", "true", "last", "latest")


def validate_run(model_args, data_args, run_args, config, *, command: str = "distill", top_k: int | None = None,
                 cache_hidden: bool = False) -> list[str]:
    """Every problem of a `hf-kd distill` / `cache-teacher` run, raised together as one `InputError`; the warnings
    (what can be meant, such as evaluating on the training rows) are printed, one line each, and returned."""
    problems, warnings = [], []
    problems += output_problems(config, run_args, model_args, command)
    problems += model_problems(model_args, command, cache_hidden, config.teacher_tokenizer)
    problems += flag_problems(model_args, data_args, config, command, top_k, warnings)
    problems += package_problems(config, command)
    problems += data_problems(model_args.task, data_args)
    for line in warnings:
        say(f"warning: {line}")
    if problems:
        raise InputError(render(problems, command))
    return warnings


def render(problems: list[str], command: str) -> str:
    problems = list(dict.fromkeys(p.removeprefix("hf-kd: ") for p in problems))  # each once, in order
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems with this {command} run; nothing was run or written:\n  - " + "\n  - ".join(problems)


def _collect(check, *args, **kwargs) -> list[str]:
    """The message of an existing check that stops at its first problem (SystemExit / InputError / ValueError)."""
    try:
        check(*args, **kwargs)
    except SystemExit as err:
        return [str(err.code)]
    except (InputError, ValueError) as err:
        return [str(err)]
    return []


# ---------------------------------------------------------------------------- folders written
def writable_problem(path, name: str) -> str | None:
    """None when `path` is, or can be made, a folder this process can write into; else the problem."""
    p = Path(os.path.expanduser(str(path)))
    if p.exists() and not p.is_dir():
        return f"{name} {p} is a file; give a folder."
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{name} {p} lies inside {existing}, which is a file; give a folder path."
    if not os.access(existing, os.W_OK | os.X_OK):
        return (f"{name} {p} cannot be written ({existing} is read-only for this user); give a folder you can write "
                f"to, e.g. --{name} ~/runs/NAME.")
    return None


def output_problems(config, run_args, model_args, command: str) -> list[str]:
    problems = [p for p in [writable_problem(config.output_dir, "output_dir")] if p]
    if command == "cache-teacher":
        problems += _collect(check_cache_output, config.output_dir, run_args.overwrite_output_dir)
    else:
        problems += _collect(check_output_dir, config.output_dir, run_args.overwrite_output_dir,
                             config.resume_from_checkpoint)
    if model_args.teacher_finetune_epochs > 0:  # the fine-tuned teacher is cached there
        problems += [p for p in [writable_problem(model_args.cache_dir, "cache_dir")] if p]
    return problems


def check_cache_output(output_dir, overwrite: bool) -> None:
    """`hf-kd cache-teacher` writes into an empty folder, or replaces an older cache when told to."""
    out = Path(output_dir)
    if out.is_dir() and any(out.iterdir()) and not (overwrite and (out / METADATA_NAME).is_file()):
        raise SystemExit(
            f"hf-kd: output_dir {out} is not empty. Give a new folder for the cache (or, to replace an older cache "
            "there, --overwrite_output_dir true)."
        )


# ---------------------------------------------------------------------------- models
def folder_problems(name: str, path: Path, needs_tokenizer: bool) -> list[str]:
    """A model folder with config.json: the config parses, it holds weights (and a tokenizer)."""
    problems = []
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return [f"{name}: {path / 'config.json'} is not readable JSON ({err}); save the model again with "
                "save_pretrained."]
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        problems.append(f"{name}={str(path)!r} holds a config but no weights (model.safetensors or pytorch_model.bin); "
                        "save the model with model.save_pretrained(folder), or point at the folder that has them.")
    if needs_tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
        problems.append(f"{name}={str(path)!r} has no tokenizer; save it there with tokenizer.save_pretrained(folder).")
    return problems


def _local_folder(name: str | None) -> Path | None:
    if not name:
        return None
    path = Path(os.path.expanduser(resolve_model(name)))
    return path if (path / "config.json").is_file() else None


def model_problems(model_args, command: str = "distill", cache_hidden: bool = False,
                   teacher_tokenizer: str | None = None) -> list[str]:
    """`teacher_tokenizer`: the run's option; then the student reads the tokenizer of its own folder (the teacher's
    folder needs none) and the teacher reads that one (`hf_kd.apps.tokenizers`)."""
    problems = []
    teacher = _local_folder(model_args.teacher_model_name_or_path)
    student = _local_folder(model_args.student_model_name_or_path)
    cross = teacher_tokenizer is not None
    if teacher is not None:
        problems += folder_problems("teacher_model_name_or_path", teacher, needs_tokenizer=not (cross and student))
    if student is not None:
        problems += folder_problems("student_model_name_or_path", student, needs_tokenizer=cross)
    if not any("not readable JSON" in p for p in problems):  # paths, the teacher's head, the two tokenizers
        problems += _collect(check_model_paths, model_args, teacher_tokenizer)  # (stops at its first problem)
    problems += teacher_tokenizer_problems(model_args, teacher_tokenizer)
    chosen = [n for n in ("student_model_name_or_path", "student_layers", "student_config", "student_prune")
              if getattr(model_args, n)]
    if len(chosen) > 1:
        problems.append(f"give one student, not {' and '.join(chosen)}; unset the other with --{chosen[-1]} null.")
    elif not chosen and (command == "distill" or cache_hidden):
        problems.append("no student: give student_model_name_or_path, student_layers (e.g. [1,3,5] or 3), "
                        "student_config or student_prune.")
    if model_args.student_layers and teacher is not None and not problems:
        try:
            problems += layers_problems(model_args.student_layers, teacher, "student_layers")
        except ValueError as err:
            problems.append(str(err))
    return problems


def layers_problems(value, teacher: Path, name: str) -> list[str]:
    """`student_layers` / `--layers` against the teacher's depth (read from its config.json alone)."""
    depth = AutoConfig.from_pretrained(teacher).get_text_config().num_hidden_layers
    layers = resolve_student_layers(value, depth)  # ValueError for a count outside 1..depth, a malformed list
    outside = [k for k in layers if not 1 <= k <= depth]
    if outside or len(set(layers)) != len(layers):
        why = f"{outside} is outside 1..{depth}" if outside else "a layer is named twice"
        return [f"{name}={layers} must be distinct teacher layers in 1..{depth}: {why} (the teacher has {depth} layers)."]
    return []


# ---------------------------------------------------------------------------- flags
def flag_problems(model_args, data_args, config, command, top_k, warnings: list) -> list[str]:
    """Values out of range, and settings that another setting makes meaningless."""
    problems, task, d = [], model_args.task, data_args
    if command == "cache-teacher" and top_k is not None and top_k < 1:
        problems.append(f"--top_k {top_k} must be >= 1 (the teacher logits kept per row).")
    if command == "cache-teacher" and config.teacher_tokenizer is not None:
        problems.append(f"teacher_tokenizer={config.teacher_tokenizer!r}: a teacher with its own tokenizer cannot be "
                        "cached (a cache holds the teacher's logits at the student's token positions, and distill "
                        "refuses teacher_cache with teacher_tokenizer); distill without a cache, or drop "
                        "teacher_tokenizer when teacher and student share a tokenizer.")
    if model_args.teacher_finetune_epochs < 0:
        problems.append(f"teacher_finetune_epochs={model_args.teacher_finetune_epochs} is negative; 0 uses the teacher "
                        "as it is, > 0 fine-tunes it first.")
    if model_args.teacher_finetune_epochs > 0 and not model_args.teacher_learning_rate > 0:
        problems.append(f"teacher_learning_rate={model_args.teacher_learning_rate} must be > 0 to fine-tune the teacher.")
    for name in ("max_length", "max_target_length", "block_size", "max_train_samples", "max_eval_samples",
                 "unlabelled_samples"):
        value = getattr(d, name)
        if value is not None and value < 1:
            problems.append(f"{name}={value} must be >= 1" + (" (or unset)." if name != "max_length" else "."))
    if d.block_size is not None and task != "causal_lm":
        problems.append(f"block_size packs causal_lm texts; a {task} run does not use it. Drop it (or max_length "
                        "truncates).")
    if d.block_size is not None and config.teacher_tokenizer is not None:
        problems.append("block_size packs several texts into a block, with end-of-text tokens between them; a teacher "
                        "with its own tokenizer reads one text per row. Unset block_size (each text truncated at "
                        "max_length) or teacher_tokenizer.")
    if not 0 <= d.mlm_probability < 1:
        problems.append(f"mlm_probability={d.mlm_probability} must be in [0, 1) (0.15 is BERT's).")
    if d.text_pair_column and task != "sequence_classification":
        problems.append(f"text_pair_column is for sequence_classification pairs; a {task} run does not read it.")
    if d.unlabelled_samples and task != "sequence_classification":
        problems.append(f"unlabelled_samples is for sequence_classification; a {task} run has no labels to drop.")
    elif d.unlabelled_samples and d.max_train_samples is None:
        problems.append("unlabelled_samples takes the rows after the first max_train_samples; set max_train_samples.")
    if d.eval_split is None and config.eval_strategy != "no":
        problems.append(f"eval_strategy={config.eval_strategy.value!r} evaluates on eval_split, which is unset; set "
                        "eval_split or eval_strategy no.")
    if d.eval_split is not None and d.eval_split == d.train_split:
        warnings.append(f"eval_split is the training split {d.train_split!r}: the held-out scores are on training rows.")
    resume = config.resume_from_checkpoint
    if isinstance(resume, str) and resume.strip().lower() not in RESUME_WORDS and not os.path.isdir(resume):
        problems.append(f"resume_from_checkpoint={resume!r} is not a folder; give a checkpoint folder "
                        "(output_dir/checkpoint-N).")
    if config.teacher_cache:
        if not os.path.isdir(config.teacher_cache):
            problems.append(f"teacher_cache={config.teacher_cache!r} is not a folder; make one with hf-kd cache-teacher.")
        elif not os.path.isfile(os.path.join(config.teacher_cache, METADATA_NAME)):
            problems.append(f"teacher_cache={config.teacher_cache!r} holds no {METADATA_NAME}: it was not written by "
                            "hf-kd cache-teacher (or is unfinished); make it again.")
    return problems


def package_problems(config, command: str = "distill") -> list[str]:
    """Optional packages a setting needs: a report_to integration's, an optimizer's."""
    problems = []
    reporters = [r for r in (config.report_to or []) if r not in ("none", "all")]
    available = set(get_available_reporting_integrations()) if reporters else set()
    for name in reporters:
        if name not in INTEGRATION_TO_CALLBACK:
            problems.append(f"report_to={name!r} is unknown; use none or one of {', '.join(INTEGRATION_TO_CALLBACK)}.")
        elif name in CHECKED_REPORTERS and name not in available:
            problems.append(f"report_to={name!r} needs the {PIP_NAMES.get(name, name)} package, which is not "
                            f"installed: pip install {PIP_NAMES.get(name, name)}, or --report_to none.")
    if command == "distill":
        try:
            Trainer.get_optimizer_cls_and_kwargs(config, torch.nn.Linear(1, 1))
        except ImportError as err:
            problems.append(f"optim={config.optim.value!r} needs a package that is not installed ({err}); install it, "
                            "or use --optim adamw_torch.")
        except ValueError as err:
            if any(w in str(err).lower() for w in ("install", "import")):
                problems.append(f"optim={config.optim.value!r} cannot be used here ({err}); use --optim adamw_torch.")
    return problems


# ---------------------------------------------------------------------------- data
def data_problems(task: str, data_args) -> list[str]:
    """The dataset loads, has the splits and columns the task reads, no empty texts, labels class_names fits."""
    try:
        raw = load_raw(data_args)
    except SystemExit as err:
        return [str(err.code)]
    return raw_problems(task, data_args, raw)


# ---------------------------------------------------------------------------- init-student, push
def init_student_problems(teacher: str, output_dir: str, layers=None, student_config=None) -> list[str]:
    """`hf-kd init-student`: the teacher folder, the output folder, the layers or config changes."""
    problems = [p for p in [writable_problem(output_dir, "output_dir")] if p]
    folder = Path(os.path.expanduser(resolve_model(teacher)))
    if not folder.exists():
        problems.append(f"--teacher {teacher!r} does not exist; give a folder saved with save_pretrained.")
    elif not folder.is_dir():
        problems.append(f"--teacher {teacher!r} is a file; give a folder saved with save_pretrained.")
    elif not (folder / "config.json").is_file():
        problems.append(f"--teacher {teacher!r} has no config.json; give a folder saved with save_pretrained.")
    else:
        problems += folder_problems("--teacher", folder, needs_tokenizer=False)
    try:
        if student_config is not None:
            parse_student_config(student_config)
        if layers is not None and not problems:
            problems += layers_problems(layers, folder, "--layers")
    except ValueError as err:
        problems.append(str(err))
    return problems


def repo_id_problem(repo_id: str) -> str | None:
    """A Hub repo name the Hub would refuse (checked locally, also for --dry_run)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return (f"--repo_id {repo_id!r} is not a valid Hub repo name: use NAME or ORG/NAME of letters, digits, '-', "
                "'_' and '.' (at most 96 characters, no spaces), e.g. my-student-model.")
    return None


__all__ = ["validate_run", "writable_problem", "model_problems", "flag_problems", "package_problems", "data_problems",
           "output_problems", "check_cache_output", "init_student_problems", "repo_id_problem"]
