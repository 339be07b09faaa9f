"""The teacher of a run: the given folder, or a copy fine-tuned on the labelled training rows with
`transformers.Trainer`, cached by its settings under ``cache_dir/teachers`` and reused by later runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import Trainer

from ..tasks import auto_class
from .common import plain_args, say
from .data import LABELLED_TASKS, collator_for
from .offline import resolve_model


def label_kwargs(task: str, names: list | None) -> dict:
    """`from_pretrained` keywords that give a classification head these labels."""
    if task not in LABELLED_TASKS or names is None:
        return {}
    return dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})


def teacher_rows(data):
    """The rows the teacher is fine-tuned on: `teacher_train_samples` rows when set, else the labelled rows."""
    return data.teacher_train if data.teacher_train is not None else data.train


def cache_key(model_args, data_args, config, data, seed: int) -> dict:
    key = {
        "teacher": model_args.teacher_model_name_or_path,
        "dataset": data_args.dataset_name,
        "split": data_args.train_split,
        "rows": len(teacher_rows(data)),
        "labels": data.names,
        "epochs": model_args.teacher_finetune_epochs,
        "lr": model_args.teacher_learning_rate,
        "max_length": data_args.max_length,
        "batch": config.per_device_train_batch_size,
        "seed": seed,
    }
    if model_args.task != "sequence_classification":  # the demo's key (and its cached teacher) stays as it was
        key["task"] = model_args.task
    if getattr(config, "teacher_tokenizer", None) is not None:  # fine-tuned on that tokenizer's ids
        key["tokenizer"] = config.teacher_tokenizer
    return key


def prepare_teacher(model_args, data_args, config, data, tokenizer, seed: int | None = None):
    """(teacher folder, fine-tune seconds or None): the given one, or a fine-tuned copy cached by its settings
    (`seed`: of the fine-tune, default `teacher_seed`)."""
    seed = model_args.teacher_seed if seed is None else seed
    source = resolve_model(model_args.teacher_model_name_or_path)
    if model_args.teacher_finetune_epochs <= 0:
        return source, None
    key = cache_key(model_args, data_args, config, data, seed)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(os.path.expanduser(model_args.cache_dir)) / "teachers" / digest
    if (cache / "config.json").is_file():
        say(f"teacher: reusing the fine-tuned teacher cached in {cache}")
        return str(cache), None
    say(f"teacher: fine-tuning {model_args.teacher_model_name_or_path} for {model_args.teacher_finetune_epochs} epochs")
    torch.manual_seed(seed)  # the new classification head
    model = auto_class(model_args.task).from_pretrained(source, **label_kwargs(model_args.task, data.names))
    cache.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=cache.parent))
    try:
        args = plain_args(
            config, str(work / "run"), num_train_epochs=model_args.teacher_finetune_epochs, max_steps=-1,
            learning_rate=model_args.teacher_learning_rate, save_strategy="no", eval_strategy="no",
            load_best_model_at_end=False, report_to=[], push_to_hub=False, seed=seed, data_seed=None,
        )
        start = time.perf_counter()
        collator = collator_for(model_args.task, tokenizer, data_args, model)
        trainer = Trainer(model=model, args=args, train_dataset=teacher_rows(data), data_collator=collator,
                          processing_class=tokenizer)
        trainer.train()  # under several processes, one data-parallel fine-tune
        seconds = time.perf_counter() - start
        if trainer.is_world_process_zero():  # one process writes the cache entry; the others wait for it
            model.save_pretrained(work / "model")
            tokenizer.save_pretrained(work / "model")
            (work / "model" / "hf_kd_teacher.json").write_text(json.dumps({**key, "train_seconds": seconds}, indent=1))
            os.replace(work / "model", cache)  # atomic: a cache entry is complete or absent
        trainer.accelerator.wait_for_everyone()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return str(cache), seconds
