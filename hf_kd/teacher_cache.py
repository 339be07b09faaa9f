"""Cached teacher outputs: run the teacher once over a tokenized training set, then distil from disk.

`cache_teacher_outputs` saves a `datasets.Dataset` (``save_to_disk``) with the dataset's own columns plus,
for every logit row the loss compares (one per example for sequence classification; one per valid position
for token tasks, where causal-LM position i predicts token i+1, as `DistillationTrainer._logit_mask`):

* ``kd_teacher_topk_ids`` (rows, k) int32 and ``kd_teacher_topk_logits`` (rows, k) fp32: the k largest
  RAW teacher logits and their class ids;
* ``kd_teacher_logsumexp`` (rows,) fp32: logsumexp(z / T) over every class, at the cache's temperature T;
* ``kd_teacher_rest_logprob`` (rows,) fp32: log of the teacher's probability outside the top k at T.

So ``{z_k / T - logsumexp, rest}`` is the teacher's distribution on k + 1 buckets, normalised at T: a
cache serves the temperature it was made for and refuses any other (raw top-k logits alone cannot
renormalise at another T, the mass of the other classes depends on T). With ``hidden_layers``, the teacher's
hidden states of those layers at the valid tokens (attention mask) are kept as ``kd_teacher_hidden_{layer}``
(tokens, D) in fp16. Beside the data, ``hf_kd_teacher_cache.json`` records the teacher (path, class, weights
sha256), k, T, the number of classes, the task, the dataset fingerprint and the format version.

Training from it: ``DistillationConfig(teacher_cache=DIR)`` and ``DistillationTrainer(model=student,
teacher_model=None, train_dataset=load_cached_dataset(DIR), ...)``; the loss is
`hf_kd.losses.topk_distillation_loss` (equal to `logit_distillation_loss` when k = number of classes).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path

import torch
from datasets import Dataset, Features, Sequence, Value, concatenate_datasets, load_from_disk
from torch import Tensor

from .chunked import TopK
from .errors import InputError
from .hub import weights_sha256
from .layer_map import resolve_layer_map
from .losses import F32_MIN, topk_distillation_loss
from .measure import count_parameters
from .tasks import detect_task, logit_row_mask, model_inputs, shift_predictions, unwrap
from .tasks import token_mask as _token_mask

logger = logging.getLogger(__name__)

__all__ = ["cache_teacher_outputs", "load_cached_dataset", "read_cache_metadata", "CacheCollator"]

FORMAT_VERSION = 1
METADATA_NAME = "hf_kd_teacher_cache.json"
PREFIX = "kd_teacher_"
IDS, LOGITS, LSE, REST = (PREFIX + n for n in ("topk_ids", "topk_logits", "logsumexp", "rest_logprob"))
ROWS = PREFIX + "rows"  # batch only: logit rows per example, to check they line up with the live mask
HIDDEN_ROWS = PREFIX + "hidden_rows"  # batch only: cached tokens per example
SUPPORTED_TASKS = ("sequence_classification", "token_classification", "masked_lm", "causal_lm")


def hidden_column(layer: int) -> str:
    return f"{PREFIX}hidden_{layer}"


def _input_error(message: str) -> Exception:
    return InputError(message)


# --------------------------------------------------------------------------- rows the loss compares
def teacher_buckets(logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ids, raw top-k logits, logsumexp(z / T), log rest mass at T) of logits (N, V), all fp32 but the ids."""
    z = logits.float()  # (N, V)
    lse = torch.logsumexp(z / temperature, dim=-1)  # (N,)
    top, ids = z.topk(k, dim=-1)  # (N, k)
    in_top = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, ids, True)  # (N, V)
    rest = (torch.logsumexp((z / temperature).masked_fill(in_top, F32_MIN), dim=-1) - lse).clamp_min(F32_MIN)
    return ids.int(), top, lse, rest  # (N, k), (N, k), (N,), (N,)


# --------------------------------------------------------------------------- writing a cache
@torch.no_grad()
def cache_teacher_outputs(
    teacher,
    dataset,
    collator,
    *,
    top_k: int,
    temperature: float,
    output_dir: str | os.PathLike,
    task: str | None = None,
    hidden_layers: list[int] | None = None,
    batch_size: int = 32,
    teacher_source: str | None = None,
    device: str | torch.device | None = None,
):
    """Run `teacher` once (eval mode, no grad) over `dataset` and save it with the teacher's targets.

    ``dataset`` is a tokenized `datasets.Dataset` (the training set that will be distilled on, with its
    labels: they decide which positions are rows), ``collator`` the collator training will use. ``top_k`` is
    capped at the number of classes (then the cache holds the full distribution). Returns the saved dataset.
    """
    task = task or detect_task(teacher)
    _check_cache_request(task, temperature, dataset)
    teacher = unwrap(teacher)
    if device is not None:
        teacher.to(device)
    teacher.eval()
    hidden_layers = sorted(set(hidden_layers or []))
    depth = teacher.config.get_text_config().num_hidden_layers
    if any(not 0 <= layer <= depth for layer in hidden_layers):
        raise ValueError(f"hidden_layers {hidden_layers} must lie in 0..{depth} (0 = embeddings)")

    columns = _TeacherColumns(task, top_k, temperature, hidden_layers)
    device = next(teacher.parameters()).device
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {key: value.to(device) if torch.is_tensor(value) else value for key, value in collator(rows).items()}
        columns.add(batch, teacher(**model_inputs(batch), output_hidden_states=bool(hidden_layers)))
    if columns.k is None:
        raise _input_error("the dataset is empty; nothing to cache.")
    cached = Dataset.from_dict(columns.columns, features=_cache_features(hidden_layers))
    result = concatenate_datasets([dataset, cached], axis=1)
    output_dir = Path(output_dir)
    result.save_to_disk(str(output_dir))
    meta = _cache_metadata(teacher, teacher_source, dataset, columns, rows=len(result))
    (output_dir / METADATA_NAME).write_text(json.dumps(meta, indent=1))
    return result


def _check_cache_request(task: str, temperature: float, dataset) -> None:
    if task not in SUPPORTED_TASKS:
        raise _input_error(
            f"caching teacher outputs supports {', '.join(SUPPORTED_TASKS)}, not {task}; distil it with the live teacher."
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    bad = [c for c in dataset.column_names if c.startswith(PREFIX)]
    if bad:
        raise _input_error(f"the dataset already holds cached teacher columns {bad}; cache the plain tokenized data.")


class _TeacherColumns:
    """The cache's columns, filled batch by batch from the teacher's outputs: per example, its logit rows' top-k
    buckets (`teacher_buckets`) and the hidden states of ``hidden_layers`` at its tokens."""

    def __init__(self, task: str, top_k: int, temperature: float, hidden_layers: list[int]):
        self.task, self.top_k, self.temperature, self.hidden_layers = task, top_k, temperature, hidden_layers
        self.columns: dict[str, list] = {IDS: [], LOGITS: [], LSE: [], REST: [],
                                         **{hidden_column(h): [] for h in hidden_layers}}
        self.n_classes = self.k = None

    def add(self, batch: dict, out) -> None:
        logits = out.logits  # (B, C) or (B, T, V)
        mask = logit_row_mask(self.task, batch)
        if mask is None:
            flat, per_example = logits, [1] * logits.shape[0]  # (B, C)
        else:
            if self.task == "causal_lm":
                logits = shift_predictions(logits)  # (B, T-1, V): position i predicts token i+1
            flat, per_example = logits[mask], mask.sum(-1).tolist()  # (N, V)
        if self.n_classes is None:
            self.n_classes = logits.shape[-1]
            self.k = min(int(self.top_k), self.n_classes)
            if self.k < self.top_k:
                logger.info("top_k=%d is more than the teacher's %d classes: the full distribution is cached",
                            self.top_k, self.k)
        parts = teacher_buckets(flat, self.k, self.temperature)
        for name, value in zip((IDS, LOGITS, LSE, REST), parts):
            self.columns[name].extend(t.tolist() for t in value.cpu().split(per_example))
        if self.hidden_layers:
            tokens = _token_mask(batch)  # (B, T)
            for layer in self.hidden_layers:
                h = out.hidden_states[layer]  # (B, T, D)
                self.columns[hidden_column(layer)].extend(
                    h[i][tokens[i]].half().cpu().tolist() for i in range(h.shape[0])
                )


def _cache_features(hidden_layers: list[int]) -> Features:
    """One row per example for every task: (rows, k) lists, so that token tasks and classifiers read alike."""
    return Features({
        IDS: Sequence(Sequence(Value("int32"))),
        LOGITS: Sequence(Sequence(Value("float32"))),
        LSE: Sequence(Value("float32")),
        REST: Sequence(Value("float32")),
        **{hidden_column(h): Sequence(Sequence(Value("float16"))) for h in hidden_layers},
    })


def _cache_metadata(teacher, teacher_source: str | None, dataset, columns: _TeacherColumns, rows: int) -> dict:
    """What `METADATA_NAME` records: the format, the buckets' settings, the rows and the teacher."""
    text = teacher.config.get_text_config()
    return {
        "format_version": FORMAT_VERSION,
        "task": columns.task,
        "top_k": columns.k,
        "temperature": float(columns.temperature),
        "num_classes": columns.n_classes,
        "hidden_layers": columns.hidden_layers,
        "rows": rows,
        "logit_rows": sum(len(x) for x in columns.columns[IDS]),
        "dataset_fingerprint": getattr(dataset, "_fingerprint", None),
        "teacher": {
            "name_or_path": teacher_source or teacher.config.name_or_path,
            "class": type(teacher).__name__,
            "weights_sha256": weights_sha256(teacher),
            "parameters": count_parameters(teacher),
            "num_hidden_layers": text.num_hidden_layers,
            "hidden_size": text.hidden_size,
            "num_labels": getattr(teacher.config, "num_labels", None),
            "vocab_size": getattr(text, "vocab_size", None),
            "max_position_embeddings": getattr(text, "max_position_embeddings", None),
        },
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- reading a cache
def read_cache_metadata(path: str | os.PathLike) -> dict:
    file = Path(os.path.expanduser(str(path))) / METADATA_NAME
    if not file.is_file():
        raise _input_error(
            f"teacher_cache={str(path)!r} has no {METADATA_NAME}: it is not a folder written by "
            "`hf-kd cache-teacher` (or hf_kd.teacher_cache.cache_teacher_outputs). Make the cache first."
        )
    meta = json.loads(file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise _input_error(
            f"teacher_cache={str(path)!r} has format version {meta.get('format_version')}, this hf_kd reads "
            f"{FORMAT_VERSION}; re-create the cache with this version."
        )
    return meta


def load_cached_dataset(path: str | os.PathLike):
    """The cached training set (the dataset's columns plus the teacher's); pass it as train_dataset."""
    read_cache_metadata(path)
    return load_from_disk(os.path.expanduser(str(path)))


def check_cache(meta: dict, path, args, task: str, student, dataset) -> list:
    """Refuse a cache that cannot serve this student and these settings; return the hidden layer pairs."""
    problems = []
    if meta["task"] != task:
        problems.append(
            f"the cache holds a {meta['task']} teacher, the student solves {task}; cache a teacher of the student's task."
        )
    if args.uses_teacher_logits:  # attention_weight > 0 and kd_loss="mse" are refused by DistillationConfig
        if abs(args.temperature - meta["temperature"]) > 1e-12:
            problems.append(
                f"the cache was made at temperature {meta['temperature']} (its rest-of-vocabulary mass is normalised "
                f"at that T) and the run asks for temperature={args.temperature}; set temperature="
                f"{meta['temperature']}, or re-run cache-teacher with --temperature {args.temperature}."
            )
        cfg = student.config
        labelled = task in ("sequence_classification", "token_classification")
        n = cfg.num_labels if labelled else cfg.get_text_config().vocab_size
        if n != meta["num_classes"]:
            problems.append(
                f"the student has {n} classes (vocabulary or labels) and the cached teacher {meta['num_classes']}; "
                "the cache needs a student with the teacher's tokenizer / label set."
            )
        if meta["top_k"] > n:
            problems.append(f"the cache holds top_k={meta['top_k']} classes, more than the student's {n}.")
    hidden_pairs = []
    if args.uses_hidden:
        if student.config.is_encoder_decoder:
            problems.append("hidden-state losses for encoder-decoder models are not supported; set hidden_weight=0.")
        try:
            hidden_pairs = resolve_layer_map(
                args.layer_map, student.config.get_text_config().num_hidden_layers,
                meta["teacher"]["num_hidden_layers"], allow_embeddings=True,
            )
        except ValueError as err:
            problems.append(str(err))
        missing = sorted({t for _, t in hidden_pairs} - set(meta["hidden_layers"]))
        if missing:
            problems.append(
                f"the layer map needs the teacher's hidden states of layers {missing}, but the cache holds "
                f"{meta['hidden_layers'] or 'none'}; re-run cache-teacher with --cache_hidden true and this "
                "layer_map, or set hidden_weight=0."
            )
    columns = getattr(dataset, "column_names", None)
    if dataset is None or columns is None:
        problems.append("with teacher_cache, train_dataset must be the cached datasets.Dataset "
                        f"(hf_kd.teacher_cache.load_cached_dataset({str(path)!r})).")
    else:
        needed = [IDS, LOGITS, LSE, REST] if args.uses_teacher_logits else []
        needed += [hidden_column(t) for t in sorted({t for _, t in hidden_pairs})]
        lacking = [c for c in needed if c not in columns]
        if lacking:
            problems.append(
                f"train_dataset lacks the cached columns {lacking}: pass the dataset saved in the cache, "
                f"hf_kd.teacher_cache.load_cached_dataset({str(path)!r}), not the plain tokenized data."
            )
    if problems:
        raise _input_error(f"Cannot distil from the teacher cache {path}:\n  - " + "\n  - ".join(problems))
    return hidden_pairs


def cache_columns(meta: dict) -> list[str]:
    return [IDS, LOGITS, LSE, REST, *(hidden_column(h) for h in meta["hidden_layers"])]


# --------------------------------------------------------------------------- batches
class CacheCollator:
    """Wraps the user's collator: the cached columns are taken out of each row before it runs (they are
    ragged: one list per logit row or token), then concatenated over the batch as flat tensors
    (N, k), (N,), (tokens, D), with the per-example counts that `cached_logit_loss` checks."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        cached = [{k: v for k, v in f.items() if k.startswith(PREFIX)} for f in features]
        batch = self.collator([{k: v for k, v in f.items() if not k.startswith(PREFIX)} for f in features])
        if not cached or not cached[0]:
            return batch
        for name in cached[0]:
            if name in (LSE, REST):
                batch[name] = torch.cat([torch.as_tensor(c[name], dtype=torch.float32).reshape(-1) for c in cached])
            else:  # (rows, width) per example: ids, logits, or hidden states (fp16 on disk)
                dtype = {IDS: torch.long, LOGITS: torch.float32}.get(name, torch.float16)
                batch[name] = _stack_rows([c[name] for c in cached], dtype)
                if name not in (IDS, LOGITS):
                    batch[HIDDEN_ROWS] = torch.tensor([len(c[name]) for c in cached])
        if IDS in cached[0]:
            batch[ROWS] = torch.tensor([len(c[IDS]) for c in cached])
        return batch


def _stack_rows(per_example: list, dtype) -> Tensor:
    """Concatenate per-example (rows, width) lists; an example may have no rows (every label -100)."""
    tensors = [torch.as_tensor(x, dtype=dtype) for x in per_example]
    width = next((t.shape[-1] for t in tensors if t.numel()), 0)
    return torch.cat([t.reshape(-1, width) for t in tensors])  # (rows of the batch, width)


def _check_rows(expected: Tensor, got: Tensor, what: str) -> None:
    if expected.shape != got.shape or not torch.equal(expected.to(got.device), got):
        raise _input_error(
            f"the cached teacher {what} do not line up with this batch ({got.tolist()} cached per example, "
            f"{expected.tolist()} in the batch): the training set is not the one cached, or its labels, padding or "
            "collator changed (random masking, as in masked-LM collators, cannot be cached). Re-create the cache."
        )


def cached_logit_loss(batch: dict, student_logits: Tensor, mask: Tensor | None, args, normalizer) -> Tensor:
    """The logit distillation term against the cached teacher, for the student's logits of this batch.

    ``student_logits`` (B, C) with ``mask`` None, or (B, T', V) with ``mask`` (B, T') (the trainer's rows).
    """
    if mask is None:
        rows = student_logits  # (B, C)
        _check_rows(torch.ones(rows.shape[0], dtype=torch.long), batch[ROWS], "logit rows")
    else:
        _check_rows(mask.sum(-1), batch[ROWS], "logit rows")
        rows = student_logits[mask]  # (N, V), row-major: the order the cache stored them in
    return topk_distillation_loss(
        rows, batch[IDS], batch[LOGITS], batch[LSE], batch[REST],
        kind=args.kd_loss, temperature=args.temperature, jsd_beta=args.jsd_beta, normalizer=normalizer,
    )


def cached_topk(batch: dict, mask: Tensor) -> TopK:
    """This batch's cached teacher rows as a `hf_kd.chunked.TopK`, one per position of ``mask`` (B, T'), in
    row-major order, after checking that the rows line up (`linear_head_loss` reads them through the head)."""
    _check_rows(mask.sum(-1), batch[ROWS], "logit rows")
    return TopK(batch[IDS], batch[LOGITS], batch[LSE], batch[REST])


def cached_hidden_states(batch: dict, layers, token_mask: Tensor) -> dict[int, Tensor]:
    """The cached teacher hidden states of `layers`, scattered back to (B, T, D) fp32 at the valid tokens."""
    out = {}
    for layer in layers:
        flat = batch[hidden_column(layer)]  # (tokens, D)
        _check_rows(token_mask.sum(-1), batch[HIDDEN_ROWS], "hidden-state tokens")
        full = torch.zeros(*token_mask.shape, flat.shape[-1], dtype=torch.float32, device=flat.device)  # (B, T, D)
        full[token_mask] = flat.float()
        out[layer] = full
    return out
