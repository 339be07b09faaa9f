"""`hf-kd cache-teacher`: run a recipe's teacher once over the rows `hf-kd distill` trains on and save its
targets (`hf_kd.teacher_cache`, the format) for ``hf-kd distill --teacher_cache DIR``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from datasets import concatenate_datasets
from transformers import AutoConfig, AutoTokenizer

from ..layer_map import resolve_layer_map
from ..student import resolve_student_layers
from ..teacher_cache import METADATA_NAME, cache_teacher_outputs, read_cache_metadata
from ..teachers import load_teacher
from .common import say
from .data import collator_for, load_data
from .offline import resolve_model
from .teacher import prepare_teacher
from .validate import validate_run


def run_cache_teacher(model_args, data_args, run_args, config, *, top_k: int, cache_hidden: bool) -> dict:
    """The recipe's training set (the rows `hf-kd distill` trains on) and teacher (fine-tuned first if the recipe
    says so, reusing the fine-tune cache), cached into ``config.output_dir``."""
    out = Path(config.output_dir)
    validate_run(model_args, data_args, run_args, config, command="cache-teacher", top_k=top_k, cache_hidden=cache_hidden)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_args.teacher_model_name_or_path))
    data = load_data(model_args.task, data_args, tokenizer)
    teacher_dir, _ = prepare_teacher(model_args, data_args, config, data, tokenizer)
    teacher = load_teacher(teacher_dir, model_args.task)
    collator = collator_for(model_args.task, tokenizer, data_args, teacher)
    dataset = data.train if data.unlabelled is None else concatenate_datasets([data.train, data.unlabelled])
    layers = _hidden_layers(model_args, config, teacher) if cache_hidden else []
    say(f"caching the teacher's top-{top_k} logits at temperature {config.temperature}"
        + (f" and hidden states of layers {layers}" if layers else "") + f" over {len(dataset)} rows")
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    cache_teacher_outputs(
        teacher, dataset, collator, top_k=top_k, temperature=config.temperature, output_dir=out,
        hidden_layers=layers, batch_size=config.per_device_eval_batch_size, teacher_source=teacher_dir,
        device=config.device,
    )
    meta = read_cache_metadata(out)
    meta["seconds"] = time.perf_counter() - start
    meta["bytes_on_disk"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    (out / METADATA_NAME).write_text(json.dumps(meta, indent=1))
    say(f"cached {meta['logit_rows']} logit rows (k={meta['top_k']}) in {meta['seconds']:.1f} s, "
        f"{meta['bytes_on_disk'] / 1e6:.2f} MB on disk: {out}")
    say(f"train from it: hf-kd distill --config RECIPE --teacher_cache {out} (same temperature, layer_map, data)")
    return meta


def _hidden_layers(model_args, config, teacher) -> list[int]:
    """The teacher layers whose hidden states the recipe's layer_map needs (the student's depth decides it)."""
    teacher_depth = teacher.config.get_text_config().num_hidden_layers
    if model_args.student_layers:
        depth = len(resolve_student_layers(model_args.student_layers, teacher_depth))
    elif model_args.student_model_name_or_path:
        student = AutoConfig.from_pretrained(resolve_model(model_args.student_model_name_or_path))
        depth = student.get_text_config().num_hidden_layers
    else:
        raise SystemExit(
            "hf-kd: --cache_hidden needs the student's depth: give student_layers or student_model_name_or_path."
        )
    pairs = resolve_layer_map(config.layer_map, depth, teacher_depth, allow_embeddings=True)
    return sorted({t for _, t in pairs})


def check_same_rows(cached, dataset, meta: dict) -> None:
    """`hf-kd distill --teacher_cache`: the cache must hold the rows this recipe trains on (same order)."""
    if meta.get("dataset_fingerprint") == getattr(dataset, "_fingerprint", object()):
        return
    columns = [c for c in dataset.column_names if c in cached.column_names]
    if len(cached) != len(dataset) or cached.select_columns(columns)[:] != dataset.select_columns(columns)[:]:
        raise SystemExit(
            "hf-kd: the teacher cache does not hold this recipe's training rows (other data, max_train_samples, "
            "max_length or tokenizer). Re-run hf-kd cache-teacher with this recipe."
        )


