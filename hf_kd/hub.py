"""Publishing a distilled student: provenance, the model card, and the push to the Hugging Face Hub.

A folder written by `DistillationTrainer.save_model()` is a plain Transformers folder (config,
safetensors weights, tokenizer) plus two files made here:

- `hf_kd_provenance.json`: the hf_kd version, the full configuration, the teacher's name, revision
  and weights hash, the distillation settings, and (after the final save) the evaluation results
  and measurements of student and teacher. Written on every save, checkpoints included.
- `README.md`: the model card, rendered from that record with huggingface_hub's `ModelCard` and
  `ModelCardData` (front matter with `base_model`, `datasets`, `library_name`, tags and a
  `model-index` the Hub reads; a body with the comparison tables and the command of the run).

What is published is the student alone (`publishable_files`): top-level files only (no
checkpoints, no baseline), no pickles (`training_args.bin`, `optimizer.pt`, ...), no projection
heads. `push_student` uploads exactly those files and never writes into the folder; when the Hub
cannot be reached it raises `PushError` with the reason and the command that retries.

`DistillationTrainer` uses this module: `_save` writes the provenance, `save_model` (a user's save)
and `push_to_hub` evaluate student and teacher for the card and write it, `push_to_hub` and the
per-save pushes of ``push_to_hub=True`` go through `push_student`. What the trainer cannot know
(the command, the data set's Hub id, the split) comes from ``trainer.card_info`` (`CardInfo`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import sys
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, constants
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .version import __version__

__all__ = [
    "CARD_NAME",
    "PROVENANCE_NAME",
    "PIPELINE_TAGS",
    "CardInfo",
    "PushError",
    "command_line",
    "weights_sha256",
    "weights_size_mb",
    "is_hub_id",
    "publishable_files",
    "check_student_folder",
    "card_metrics",
    "render_card",
    "write_provenance",
    "read_provenance",
    "push_student",
    "push_failure",
    "failure_reason",
]

PROVENANCE_NAME = "hf_kd_provenance.json"
CARD_NAME = "README.md"
TAGS = ("knowledge-distillation", "distillation", "hf_kd")

# The Hub's pipeline tag (and model-index task type) of each task `hf_kd.tasks` detects.
PIPELINE_TAGS = {
    "sequence_classification": "text-classification",
    "token_classification": "token-classification",
    "question_answering": "question-answering",
    "masked_lm": "fill-mask",
    "causal_lm": "text-generation",
    "seq2seq_lm": "text2text-generation",
}

# Never published. Pickles can run code when loaded; Trainer writes training_args.bin on every save
# and optimizer/scheduler/RNG state in checkpoints. kd_projections* is hf_kd.trainer.PROJECTIONS_NAME:
# the projection heads belong to training, not to the student. trainer_state.json is resume state.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
NOT_PUBLISHED_PREFIXES = ("kd_projections",)
NOT_PUBLISHED_NAMES = ("trainer_state.json",)

# Metrics Trainer.evaluate adds that describe the run, not the model.
# metrics that are a share of rows, whose single-run standard error is binomial
PROPORTION_METRICS = ("accuracy", "exact_match")
_RUN_METRIC_SUFFIXES = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time", "epoch")


class PushError(RuntimeError):
    """A push to the Hub failed or was refused; the message says why and how to retry. Nothing local changed."""


# ---------------------------------------------------------------------------------------- run facts
@dataclass
class CardInfo:
    """What the trainer cannot know about a run, for the model card and the provenance record.

    Set it on the trainer before saving: ``trainer.card_info = CardInfo(...)``; the ``hf-kd distill``
    pipeline uses ``CardInfo.from_cli_args``. Every field is optional.
    """

    command: str | None = None  # the exact command of the run; None: the Python command line (API use)
    teacher: str | None = None  # the teacher as the user named it (Hub id or path); default: its name_or_path
    teacher_note: str | None = None  # what was done to it first, e.g. "fine-tuned by hf-kd for 2 epochs on train"
    base_model: str | None = None  # Hub id the student's weights started from; default: the teacher's, if a Hub id
    student_init: str | None = None  # how the student was made, e.g. "teacher layers [1, 3, 5]"
    dataset: str | None = None  # dataset Hub id or path
    dataset_config: str | None = None
    train_split: str | None = None
    eval_split: str | None = None  # the split of the trainer's eval_dataset (the card's evaluation)
    model_name: str | None = None  # default: the folder's name
    license: str | None = None
    language: str | list[str] | None = None
    tags: list[str] = field(default_factory=list)
    evaluate: bool = True  # save_model/push_to_hub evaluate student and teacher on eval_dataset when not done yet
    measure_latency: bool = True  # ... and time both on one evaluation batch
    extra: dict[str, Any] = field(default_factory=dict)  # recorded verbatim in the provenance

    @classmethod
    def from_cli_args(cls, model_args, data_args, run_args=None, *, student_init=None, argv=None,
                      recipe=None) -> "CardInfo":
        """The card facts of an ``hf-kd distill`` run: its command line, recipe text and parsed arguments.

        `recipe`: the recipe file that ran (default: the file named by ``--config`` in `argv`)."""
        argv = list(sys.argv if argv is None else argv)
        extra: dict[str, Any] = {"model_args": _plain(model_args), "data_args": _plain(data_args)}
        if run_args is not None:
            extra["run_args"] = _plain(run_args)
        recipe = Path(recipe) if recipe is not None else _recipe_path(argv)
        if recipe is not None and recipe.is_file():
            extra["recipe"] = {"path": str(recipe), "text": recipe.read_text()}
        epochs = getattr(model_args, "teacher_finetune_epochs", 0) or 0
        note = None
        if epochs > 0:
            split = getattr(data_args, "train_split", "train")
            lr = getattr(model_args, "teacher_learning_rate", None)
            note = f"fine-tuned by hf-kd for {epochs:g} epoch{'' if epochs == 1 else 's'} on the {split} split"
            note += f" (learning rate {lr:g})" if lr is not None else ""
        return cls(
            command=command_line(argv),
            teacher=model_args.teacher_model_name_or_path,
            teacher_note=note,
            base_model=getattr(model_args, "student_model_name_or_path", None) or model_args.teacher_model_name_or_path,
            student_init=student_init,
            dataset=data_args.dataset_name,
            dataset_config=getattr(data_args, "dataset_config_name", None),
            train_split=getattr(data_args, "train_split", None),
            eval_split=getattr(data_args, "eval_split", None),
            extra=extra,
        )


def _plain(obj) -> Any:
    return asdict(obj) if is_dataclass(obj) else obj


def _recipe_path(argv: list[str]) -> Path | None:
    for i, word in enumerate(argv):
        if word == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if word.startswith("--config="):
            return Path(word.split("=", 1)[1])
    return None


# --token, --hub_token, --hf_password...; not --max_new_tokens.
_SECRET = re.compile(r"^--((?:\w*_)?(?:token|password|secret))(=.*)?$", re.IGNORECASE)


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran, as one shell line; secrets (``--hub_token X``) are masked.

    ``hf-kd ...`` when run through the console script or ``python -m hf_kd.cli``; else ``python ...``.
    """
    argv = list(sys.argv if argv is None else argv)
    words, hide_next = [], False
    for word in argv[1:]:
        if hide_next:
            words.append("<hidden>")
            hide_next = False
            continue
        match = _SECRET.match(word)
        if match:
            if match.group(2) is None:
                hide_next = True
                words.append(word)
            else:
                words.append(f"--{match.group(1)}=<hidden>")
            continue
        words.append(word)
    program = argv[0] if argv else "python"
    norm = program.replace(os.sep, "/")
    if Path(program).name == "hf-kd" or norm.endswith("hf_kd/cli.py"):
        return shlex.join(["hf-kd", *words])
    return shlex.join(["python", program, *words])


# ---------------------------------------------------------------------------------------- weights
def _state_dict(model_or_state_dict) -> Mapping[str, Any]:
    if isinstance(model_or_state_dict, Mapping):
        return model_or_state_dict
    return model_or_state_dict.state_dict()


def weights_sha256(model_or_state_dict) -> str:
    """SHA-256 of a model's weights: over the sorted tensor names, each with its dtype, shape and raw bytes.

    Independent of the file format, sharding and device, so the teacher named in a card can be checked:
    ``weights_sha256(AutoModelForSequenceClassification.from_pretrained(teacher))``.
    """
    digest = hashlib.sha256()
    state = _state_dict(model_or_state_dict)
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\0{str(tensor.dtype)}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_size_mb(model) -> float:
    """Bytes of a model's weights in their dtype (tied tensors once), in MB (1e6): what safetensors would hold."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total / 1e6


# ---------------------------------------------------------------------------------------- files
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` reads as a Hub repo id ("org/name" or "name") and is not a local path."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")):
        return False
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith((".", "-"))


def publishable_files(folder: str | os.PathLike) -> list[str]:
    """The names of the files of ``folder`` that make up the published student, sorted.

    Top-level files only (checkpoints, baselines and logs live in subfolders), without pickles,
    projection heads, Trainer's resume state, and hidden or ``_``-prefixed files.
    """
    names = []
    for entry in sorted(Path(folder).iterdir()):
        name = entry.name
        if not entry.is_file() or name.startswith((".", "_")):
            continue
        if name.lower().endswith(PICKLE_SUFFIXES) or name.startswith(NOT_PUBLISHED_PREFIXES):
            continue
        if name in NOT_PUBLISHED_NAMES:
            continue
        names.append(name)
    return names


def write_provenance(folder: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    path = Path(folder) / PROVENANCE_NAME
    path.write_text(json.dumps(record, indent=1, sort_keys=False, default=str) + "\n", encoding="utf-8")
    return path


def read_provenance(folder: str | os.PathLike) -> dict:
    path = Path(folder) / PROVENANCE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {PROVENANCE_NAME}: it was not saved by hf_kd's DistillationTrainer.save_model()."
        )
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------- the card
def card_metrics(metrics: Mapping[str, Any], prefix: str = "eval") -> dict[str, float]:
    """The model's numbers in ``Trainer.evaluate`` output, without the prefix: ``eval_accuracy`` -> ``accuracy``.

    Run descriptions (runtime, samples per second, epoch, memory) and non-numbers are left out.
    """
    out = {}
    for key, value in metrics.items():
        name = key[len(prefix) + 1 :] if key.startswith(prefix + "_") else key
        if name.endswith(_RUN_METRIC_SUFFIXES) or "_mem_" in name or name.startswith("mem_"):
            continue
        if isinstance(value, bool):
            continue
        try:
            number = float(value)  # Python or numpy scalars; anything else is not a metric
        except (TypeError, ValueError):
            continue
        out[name] = int(value) if isinstance(value, int) else number
    return out


def _fmt(value, spec=".4f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return format(value, spec)


def _mb(value) -> str:
    if not isinstance(value, (int, float)):
        return "n/a"
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def _table(header, rows, numeric: bool = True) -> list[str]:
    align = "--:" if numeric else "---"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [align] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _link(name: str | None, kind: str = "") -> str:
    """A Hub link for a Hub id (``kind="datasets/"`` for data sets), else the name as code."""
    if not name:
        return "n/a"
    return f"[{name}](https://huggingface.co/{kind}{name})" if is_hub_id(name) else f"`{name}`"


def render_card(record: Mapping[str, Any], *, model_name: str | None = None) -> ModelCard:
    """The model card of a distilled student, from its provenance record (a pure function of ``record``).

    ``record`` is what `hf_kd_provenance.json` holds. Front matter: ``base_model`` and ``datasets``
    (when they are Hub ids), ``library_name: transformers``, ``pipeline_tag``, tags with
    ``knowledge-distillation``, the student's evaluation as a ``model-index`` entry, and an ``hf_kd``
    block with the teacher (name, revision, weights hash) and both models' numbers. The body's
    sections: the intro, Evaluation, Size and speed, How it was made, Reproduce.
    """
    name = model_name or record.get("model_name") or "distilled-student"
    eval_results = _eval_results(record)
    card_data = _card_data(record, name, eval_results)
    lines = [
        *_intro_section(record, name),
        *_evaluation_section(record, in_model_index=bool(eval_results)),
        *_size_section(record.get("measurements") or {}),
        *_made_section(record),
        *_reproduce_section(record),
    ]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)


def _evaluation(record: Mapping[str, Any]) -> tuple[str | None, dict, dict]:
    """The split of the card's evaluation, and the student's and the teacher's numbers on it."""
    evaluation = record.get("evaluation") or {}
    split = evaluation.get("split") or record.get("data", {}).get("eval_split")
    return split, evaluation.get("student") or {}, evaluation.get("teacher") or {}


def _eval_results(record: Mapping[str, Any]) -> list[EvalResult] | None:
    """The student's numbers as the Hub's ``model-index`` entries; None without them, a data set or a task tag."""
    tag, data = PIPELINE_TAGS.get(record.get("task")), record.get("data", {})
    dataset = data.get("dataset")
    split, s_eval, _ = _evaluation(record)
    if not (s_eval and dataset and tag):
        return None
    return [
        EvalResult(
            task_type=tag,
            dataset_type=dataset,
            dataset_name=Path(dataset).name if not is_hub_id(dataset) else dataset.split("/")[-1],
            dataset_config=data.get("dataset_config"),
            dataset_split=split,
            metric_type=metric,
            metric_value=value,
            metric_name=f"{metric} ({split})" if split else metric,
        )
        for metric, value in s_eval.items()
    ]


def _card_data(record: Mapping[str, Any], name: str, eval_results: list[EvalResult] | None) -> ModelCardData:
    """The card's front matter."""
    teacher, student = record.get("teacher", {}), record.get("student", {})
    several = record.get("teachers") or []  # several teachers (hf_kd.teachers): the first is `teacher`
    dataset, base_model = record.get("data", {}).get("dataset"), student.get("base_model")
    split, s_eval, t_eval = _evaluation(record)
    return ModelCardData(
        base_model=base_model if is_hub_id(base_model) else None,
        datasets=[dataset] if is_hub_id(dataset) else None,
        library_name="peft" if student.get("adapter") else "transformers",
        license=record.get("license"),
        language=record.get("language"),
        pipeline_tag=PIPELINE_TAGS.get(record.get("task")),
        tags=list(dict.fromkeys([*TAGS, *(record.get("tags") or [])])),
        metrics=[m for m in s_eval if m != "loss"] or None,
        model_name=name if eval_results else None,
        eval_results=eval_results,
        hf_kd={
            "version": record.get("hf_kd_version"),
            "teacher": {k: teacher.get(k) for k in ("name_or_path", "revision", "weights_sha256")},
            **({"teachers": [{k: t.get(k) for k in ("name_or_path", "weights_sha256", "weight")} for t in several]}
               if several else {}),
            "evaluation": {"split": split, "student": s_eval, "teacher": t_eval} if record.get("evaluation") else None,
        },
    )


def _intro_section(record: Mapping[str, Any], name: str) -> list[str]:
    """The title, what the model is and how to load it."""
    task = record.get("task")
    tag = PIPELINE_TAGS.get(task)
    several = record.get("teachers") or []
    if several:  # their softened distributions averaged with these weights
        teachers_text = "the teachers " + ", ".join(
            f"{_link(t.get('name_or_path'))} (weight {t.get('weight', 0):.3g})" for t in several
        )
    else:
        teachers_text = f"the teacher {_link(record.get('teacher', {}).get('name_or_path'))}"
    return [
        f"# {name}",
        "",
        f"A {tag or task} model distilled from {teachers_text} with hf_kd "
        f"{record.get('hf_kd_version')} (knowledge distillation for Hugging Face Transformers). It is a plain "
        "Transformers model: the teacher, the projection heads and the training state are not part of it.",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'model = pipeline("{tag or task}", model="REPO_OR_FOLDER")',
        "```",
        "",
    ]


def _evaluation_section(record: Mapping[str, Any], in_model_index: bool) -> list[str]:
    """Student and teacher side by side, with the student's share of the teacher's score."""
    split, s_eval, t_eval = _evaluation(record)
    dataset = record.get("data", {}).get("dataset")
    lines = ["## Evaluation", ""]
    if not (s_eval or t_eval):
        lines.append(
            "Not evaluated: the trainer had no `eval_dataset` when the student was saved "
            "(or `CardInfo.evaluate` was off)."
        )
        return [*lines, ""]
    if dataset:
        where = f"split `{split}` of {_link(dataset, 'datasets/')}"
    else:
        where = f"split `{split}`" if split else "same data"
    lines += [
        f"Student and teacher on the {where}, through the same `Trainer.evaluate` loop "
        "(data, collator and `compute_metrics`).",
        "",
    ]
    rows = []
    for metric in dict.fromkeys([*s_eval, *t_eval]):
        s, t = s_eval.get(metric), t_eval.get(metric)
        ratio = f"{s / t:.1%}" if metric != "loss" and isinstance(s, (int, float)) and t else "-"
        rows.append([metric, _fmt(s), _fmt(t), ratio])
    lines += _table(["metric", "student", "teacher", "student / teacher"], rows)
    evaluation = record.get("evaluation") or {}
    metric = next((m for m in PROPORTION_METRICS if m in s_eval), next(iter(s_eval), ""))
    lines += ["", spread_note(metric, s_eval.get(metric), evaluation.get("rows"), evaluation.get("seeds"))]
    if s_eval and not in_model_index:
        lines += ["", "No `model-index` entry: the data set was not recorded "
                  "(`CardInfo(dataset=..., eval_split=...)`)."]
    return [*lines, ""]


def spread_note(metric: str, value, rows, seeds: Mapping[str, Any] | None = None) -> str:
    """How far to trust the numbers of a run. `seeds` (several seeds ran: ``{"seeds": [...], "metric": ...,
    "mean": ..., "low": ..., "high": ...}``, the paired difference distilled - baseline) gives its 95% interval;
    otherwise a single run's note, with the binomial standard error of a proportion `metric` on `rows` rows."""
    if seeds:
        return (f"Over {len(seeds['seeds'])} seeds ({', '.join(map(str, seeds['seeds']))}), {seeds['metric']} of the "
                f"distilled student minus the label-only baseline (same seed, same steps): {seeds['mean']:+.4f}, "
                f"95% confidence interval [{seeds['low']:+.4f}, {seeds['high']:+.4f}].")
    note = "One training run, one seed: another seed moves these numbers"
    if metric in PROPORTION_METRICS and isinstance(value, (int, float)) and 0 <= value <= 1 and isinstance(rows, int) \
            and rows > 0:
        se = math.sqrt(value * (1 - value) / rows)
        note += f", and on {rows} evaluation rows {metric} has a standard error of about {se:.3f} by itself"
    return note + ". Compare models over several seeds (hf_kd's `scripts/quality.py`: a 95% interval) before " \
                  "trusting a small difference."


def _size_section(measures: Mapping[str, Any]) -> list[str]:
    """Parameters, size on disk and latency of student and teacher, and how the latency was measured."""
    s_m, t_m = measures.get("student") or {}, measures.get("teacher") or {}
    batches = [str(b) for b in measures.get("batch_sizes") or []]
    header = ["model", "parameters", "size on disk (MB)", *[f"latency batch {b} (ms)" for b in batches]]
    rows = []
    for role, m in (("student", s_m), ("teacher", t_m)):
        latency = m.get("latency_ms") or {}
        timings = [_fmt(latency.get(b), ".2f") for b in batches]
        rows.append([role, _fmt(m.get("parameters")), _mb(m.get("size_mb")), *timings])
    lines = ["## Size and speed", "", *_table(header, rows)]
    notes = []
    if batches and s_m.get("latency_ms") and t_m.get("latency_ms"):
        b = batches[-1]
        s_lat, t_lat = s_m["latency_ms"].get(b), t_m["latency_ms"].get(b)
        if s_lat and t_lat:
            notes.append(f"Speed-up at batch {b}: {t_lat / s_lat:.2f}x.")
        notes.append(
            f"Latency: wall time of a forward pass on `{measures.get('device')}` ({measures.get('threads')} threads), "
            f"{measures.get('method') or 'median of repeated runs'}, on the same rows of the evaluation data for both."
        )
    elif s_m:
        notes.append("Latency was not measured.")
    if t_m.get("size_source"):
        notes.append(f"Teacher size: {t_m['size_source']}.")
    if notes:
        lines += ["", " ".join(notes)]
    return [*lines, ""]


# The distillation and training settings the card lists, in this order, when the record holds them.
_KD_SETTINGS = ("kd_loss", "temperature", "temperature_schedule", "temperature_end", "alpha", "alpha_schedule",
                "alpha_end", "jsd_beta", "hidden_weight", "hidden_loss", "attention_weight", "attention_loss",
                "layer_map", "hidden_pairs", "attention_pairs", "projections")
_TRAINING_SETTINGS = ("global_step", "epoch", "learning_rate", "per_device_train_batch_size",
                      "gradient_accumulation_steps", "seed")


def _made_section(record: Mapping[str, Any]) -> list[str]:
    """The teacher(s), the student's start, the data, the settings, and the loss they make."""
    teacher, student, data = record.get("teacher", {}), record.get("student", {}), record.get("data", {})
    several = record.get("teachers") or []
    kd, training = record.get("distillation", {}), record.get("training", {})
    base_model, dataset = student.get("base_model"), data.get("dataset")
    settings = [
        ["teacher", _link(teacher.get("name_or_path")) + (" (the first of several)" if several else "")],
        *[[f"teacher {i + 1}", f"{_link(t.get('name_or_path'))}, weight {t.get('weight', 0):.3g}, sha256 "
           f"`{t.get('weights_sha256')}`"] for i, t in enumerate(several)],
        ["teacher training", teacher.get("note") or "used as given"],
        ["teacher revision", f"`{teacher['revision']}`" if teacher.get("revision") else "n/a (not from the Hub)"],
        ["teacher weights sha256", f"`{teacher.get('weights_sha256')}`"],
        ["student initialisation", student.get("init") or "n/a"],
        ["base model", _link(base_model) if base_model else "n/a"],
        ["data", f"{_link(dataset, 'datasets/')}, train split `{data.get('train_split')}`" if dataset else "n/a"],
        ["training rows", _fmt(data.get("train_rows"))],
    ]
    settings += [[key, f"`{json.dumps(kd[key])}`" if isinstance(kd[key], (list, dict)) else str(kd[key])]
                 for key in _KD_SETTINGS if key in kd]
    for key in _TRAINING_SETTINGS:
        value = training.get(key)
        if value is not None:
            settings.append([key, f"{value:.4g}" if isinstance(value, float) else str(value)])
    return [
        "## How it was made",
        "",
        *_table(["setting", "value"], settings, numeric=False),
        "",
        "Loss: `alpha * T^2 * D(teacher || student, softened by T) + (1 - alpha) * CE(student, labels) "
        "+ hidden_weight * hidden + attention_weight * attention` (T^2 and T do not apply to `kd_loss: mse`). "
        "Layer pairs are [student layer, teacher layer], counted from 1 (0 = embeddings).",
        "",
    ]


def _reproduce_section(record: Mapping[str, Any]) -> list[str]:
    """The command of the run and the versions it ran with."""
    return [
        "## Reproduce",
        "",
        "```bash",
        record.get("command") or "(not recorded)",
        "```",
        "",
        f"with hf_kd {record.get('hf_kd_version')}, transformers {record.get('transformers_version')} and torch "
        f"{record.get('torch_version')}. `{PROVENANCE_NAME}` holds the full configuration"
        + (" and the recipe" if record.get("extra", {}).get("recipe") else "")
        + ". To check the teacher: `hf_kd.hub.weights_sha256(teacher_model)` must equal the hash above.",
        "",
    ]


# ---------------------------------------------------------------------------------------- the push
def failure_reason(err: BaseException) -> tuple[str, str]:
    """A one-line reason and a hint for a failed Hub call."""
    reason = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    if isinstance(err, OfflineModeIsEnabled):
        return reason, "HF_HUB_OFFLINE=1 is set, so the Hub is out of reach: unset it on a machine with network."
    if isinstance(err, LocalTokenNotFoundError):
        return reason, "Log in with `hf auth login` or set HF_TOKEN to a token with write access."
    if isinstance(err, HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            return reason, "The Hub refused the token: log in with `hf auth login` (write access) or check the repo id."
        return reason, "The Hub answered with an error; check the repo id and your rights on it."
    kind = type(err).__name__.lower()  # httpx's ConnectError & co. are not OSErrors
    if isinstance(err, (ConnectionError, TimeoutError, OSError)) or any(w in kind for w in ("connect", "timeout", "network")):
        return reason, f"The Hub ({constants.ENDPOINT}) cannot be reached: check the network (and HF_ENDPOINT)."
    return reason, "Check the network connection, the repo id and your login (`hf auth login`)."


def push_failure(err: BaseException, folder, repo_id: str | None) -> str:
    """The message of a push that failed on the Hub's side: what failed, why, what is kept, how to retry."""
    reason, hint = failure_reason(err)
    repo = repo_id or "NAME"
    return (
        f"could not push {folder} to the Hugging Face Hub as {repo}: {reason}\n"
        f"  {hint}\n"
        f"  Nothing was committed and {folder} is unchanged: the student, its card and provenance stay there.\n"
        f"  Retry later with: hf-kd push --model {folder} --repo_id {repo}"
    )


def check_student_folder(folder: str | os.PathLike) -> list[str]:
    """The publishable files of a saved hf_kd student; `PushError` when ``folder`` is not one (no network)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder} is not a folder; pass the output_dir of a run (the folder save_model wrote).")
    files = publishable_files(folder)
    if "config.json" not in files and "adapter_config.json" not in files:
        raise PushError(f"{folder} has no config.json: it is not a saved model. Pass the folder save_model wrote.")
    if not any(name.endswith(".safetensors") for name in files):
        pickled = [p.name for p in folder.iterdir() if p.name in ("pytorch_model.bin", "model.pt")]
        extra = f" (it has {pickled[0]}, a pickle, which hf_kd does not publish)" if pickled else ""
        raise PushError(
            f"{folder} holds no safetensors weights{extra}. Save the student with trainer.save_model() or "
            "model.save_pretrained(folder) (safetensors is the default)."
        )
    if PROVENANCE_NAME not in files:
        raise PushError(
            f"{folder} has no {PROVENANCE_NAME}: it was not saved by hf_kd's DistillationTrainer, so there is no "
            "record of how it was made. Save it with DistillationTrainer.save_model()."
        )
    return files


def push_student(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload a student distilled with hf_kd",
    create_repo: bool = True,
    run_as_future: bool = False,
    api: HfApi | None = None,
):
    """Upload the student in ``folder`` to the Hub repo ``repo_id`` in one commit: `publishable_files` only.

    Never writes into ``folder``. Its ``README.md`` is published as is (it must parse); a folder
    without one gets the card rendered from its provenance. Returns huggingface_hub's ``CommitInfo``
    (a ``Future`` of it with ``run_as_future=True``). Raises `PushError` before any network access
    when the folder is not a saved hf_kd student, and with the reason and the retry command when
    the Hub cannot be reached or refuses.
    """
    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PushError(f"repo_id {repo_id!r} is not a Hub repo id ({err}); use NAME or ORG/NAME.") from None
    files = check_student_folder(folder)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    if CARD_NAME in files:
        try:
            ModelCard.load(folder / CARD_NAME)
        except Exception as err:  # noqa: BLE001 - any parse failure means a card the Hub would reject
            raise PushError(f"{folder / CARD_NAME} is not a valid model card ({err}); fix or delete it.") from err
    else:
        card = render_card(read_provenance(folder), model_name=repo_id.split("/")[-1])
        operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=str(card).encode("utf-8")))

    api = api or HfApi(library_name="hf_kd", library_version=__version__)
    try:
        if create_repo:
            api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message,
            token=token,
            revision=revision,
            run_as_future=run_as_future,
        )
    except Exception as err:  # noqa: BLE001 - every Hub failure becomes one clear message
        raise PushError(push_failure(err, folder, repo_id)) from err
