"""`hf-kd distill`: load, (fine-tune the teacher), make the student, distil, evaluate, save, report.

Reads top to bottom like accelerate's examples: parse (cli.py), load, prepare, train, save.
Text classification for now; the data and model loading is the plain `load_dataset` /
`from_pretrained` path, fed local stand-ins by `hf_kd.offline` when the Hub is out of reach.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from datasets import ClassLabel, concatenate_datasets, load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from .version import __version__
from .config import DistillationConfig
from .hub import CardInfo, card_metrics
from .metrics import load_metric
from .offline import resolve_dataset, resolve_model
from .student import parse_student_config, resolve_student_layers, student_from_config, student_from_teacher
from .trainer import DistillationTrainer

logger = logging.getLogger(__name__)


def say(message: str) -> None:
    print(f"[hf-kd] {message}", flush=True)


# ---------------------------------------------------------------------------- data
def load_splits(data_args, tokenizer):
    """Tokenized train and held-out splits with a `labels` column, and the label names."""
    kwargs = resolve_dataset(data_args.dataset_name)
    if data_args.dataset_config_name:
        kwargs["name"] = data_args.dataset_config_name
    try:
        raw = load_dataset(**kwargs)
    except ValueError as err:
        if "corresponds to no data" not in str(err):
            raise
        # datasets refuses a split file with no rows while building; say which fix applies.
        raise SystemExit(
            f"hf-kd: a split of {data_args.dataset_name} has no rows ({err}); give splits with data."
        ) from None
    splits = {"train": data_args.train_split, "eval": data_args.eval_split}
    for role, split in splits.items():
        if split is not None and split not in raw:
            raise SystemExit(
                f"hf-kd: the dataset has no split {split!r} (it has {sorted(raw)}); set {role}_split to one of them."
            )
    train = raw[data_args.train_split]
    for role in ("train", "eval"):
        split = splits[role]
        if split is not None and len(raw[split]) == 0:
            raise SystemExit(f"hf-kd: the {split!r} split has no rows; point {role}_split at a split with data.")
    limit = getattr(tokenizer, "model_max_length", None)
    if limit and limit < 1_000_000 and data_args.max_length > limit:  # huge values mean "not set"
        raise SystemExit(
            f"hf-kd: max_length={data_args.max_length} is longer than the teacher tokenizer's model_max_length="
            f"{limit} (the model's maximum positions); set max_length to {limit} or less."
        )
    for column in (data_args.text_column, data_args.label_column, data_args.text_pair_column):
        if column is not None and column not in train.column_names:
            raise SystemExit(
                f"hf-kd: the dataset has no column {column!r} (it has {train.column_names}); set text_column / "
                "label_column to the right names."
            )
    feature = train.features[data_args.label_column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        to_id = None
    elif data_args.class_names:
        names = list(json.loads(data_args.class_names))
        found = set(train[data_args.label_column])
        if not found <= set(range(len(names))):
            raise SystemExit(
                f"hf-kd: class_names has {len(names)} names but the labels are {sorted(found)[:10]}; "
                "class_names must name the integer labels 0..N-1 in order."
            )
        to_id = None
    else:
        values = sorted(set(train[data_args.label_column]))
        names = [str(v) for v in values]
        to_id = {v: i for i, v in enumerate(values)}
    for role, split in splits.items():
        if split is not None:
            check_labels(raw[split], data_args.label_column, names, to_id, split)

    def prepare(ds, limit, start=0):
        end = len(ds) if limit is None else min(start + limit, len(ds))
        if start or end < len(ds):
            ds = ds.select(range(start, end))
        if len(ds) == 0:
            raise SystemExit("hf-kd: a split is empty after slicing; raise max_train_samples / max_eval_samples.")

        def tokenize(batch):
            texts = [batch[data_args.text_column]]
            if data_args.text_pair_column:
                texts.append(batch[data_args.text_pair_column])
            enc = tokenizer(*texts, truncation=True, max_length=data_args.max_length)
            labels = batch[data_args.label_column]
            enc["labels"] = [to_id[v] for v in labels] if to_id else labels
            return enc

        return ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="tokenize")

    unlabelled = None
    if data_args.unlabelled_samples:
        start = data_args.max_train_samples
        if start is None or start + data_args.unlabelled_samples > len(train):
            raise SystemExit(
                f"hf-kd: unlabelled_samples={data_args.unlabelled_samples} takes the training rows after the first "
                f"max_train_samples={start}, but the {data_args.train_split!r} split has {len(train)} rows; set "
                "max_train_samples + unlabelled_samples to at most that."
            )
        unlabelled = prepare(train, data_args.unlabelled_samples, start=start)
        unlabelled = unlabelled.map(lambda row: {"labels": -100}, desc="drop labels")
    train = prepare(train, data_args.max_train_samples)
    held_out = prepare(raw[data_args.eval_split], data_args.max_eval_samples) if data_args.eval_split else None
    return train, unlabelled, held_out, names


def check_labels(ds, column: str, names: list, to_id: dict | None, split: str) -> None:
    """Refuse rows without a label (None, or -1 as in unlabelled test splits) or outside the label set.

    Reads the label column alone (Arrow, no tokenization), so it stays cheap on large splits.
    """
    values = ds[column]
    missing = sum(v is None or v == -1 for v in values)
    if missing:
        raise SystemExit(
            f"hf-kd: {missing} rows of the {split!r} split have no label ({column} is None or -1, as in unlabelled "
            "test splits); pick a labelled split (e.g. eval_split: validation) or filter them out."
        )
    if to_id is not None:
        unknown = sorted({str(v) for v in values} - {str(k) for k in to_id})
        if unknown:
            raise SystemExit(
                f"hf-kd: the {split!r} split has labels {unknown[:5]} that the training split does not have "
                f"({names}); give class_names or use splits with the same labels."
            )
    else:
        bad = sorted({v for v in values if not (isinstance(v, int) and 0 <= v < len(names))}, key=str)
        if bad:
            raise SystemExit(
                f"hf-kd: the {split!r} split has labels {bad[:5]} outside 0..{len(names) - 1} ({len(names)} class "
                "names); fix the labels or class_names."
            )


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def accuracy(model, dataset, collator, batch_size=64) -> float:
    """Accuracy of `model` on `dataset`, through the `evaluate` metric interface."""
    metric = load_metric("accuracy")
    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    for batch in loader:
        labels = batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        metric.add_batch(predictions=logits.argmax(-1).cpu(), references=labels)
    return float(metric.compute()["accuracy"])


def _accuracy(prediction) -> dict:
    """`compute_metrics` for Trainer.evaluate (the numbers the model card reports)."""
    return load_metric("accuracy").compute(
        predictions=prediction.predictions.argmax(-1), references=prediction.label_ids
    )


def _plain_args(config: DistillationConfig, output_dir: str, **changes) -> TrainingArguments:
    """The run's TrainingArguments (no distillation fields) for the teacher fine-tune and the baseline."""
    names = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    values = {n: getattr(config, n) for n in names}
    values.update(output_dir=output_dir, **changes)
    return TrainingArguments(**values)


# ---------------------------------------------------------------------------- teacher
def prepare_teacher(model_args, data_args, config, train, names, tokenizer, collator, seed: int | None = None):
    """The teacher folder: the given one, or a fine-tuned copy cached by its settings (`seed`: of the fine-tune,
    default `teacher_seed`)."""
    seed = model_args.teacher_seed if seed is None else seed
    source = resolve_model(model_args.teacher_model_name_or_path)
    if model_args.teacher_finetune_epochs <= 0:
        return source, None
    key = {
        "teacher": model_args.teacher_model_name_or_path,
        "dataset": data_args.dataset_name,
        "split": data_args.train_split,
        "rows": len(train),
        "labels": names,
        "epochs": model_args.teacher_finetune_epochs,
        "lr": model_args.teacher_learning_rate,
        "max_length": data_args.max_length,
        "batch": config.per_device_train_batch_size,
        "seed": seed,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(os.path.expanduser(model_args.cache_dir)) / "teachers" / digest
    if (cache / "config.json").is_file():
        say(f"teacher: reusing the fine-tuned teacher cached in {cache}")
        return str(cache), None
    say(f"teacher: fine-tuning {model_args.teacher_model_name_or_path} for {model_args.teacher_finetune_epochs} epochs")
    torch.manual_seed(seed)  # the new classification head
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=cache.parent))
    try:
        args = _plain_args(
            config,
            str(work / "run"),
            num_train_epochs=model_args.teacher_finetune_epochs,
            max_steps=-1,
            learning_rate=model_args.teacher_learning_rate,
            save_strategy="no",
            eval_strategy="no",
            load_best_model_at_end=False,
            report_to=[],
            push_to_hub=False,
            seed=seed,
            data_seed=None,
        )
        start = time.perf_counter()
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, processing_class=tokenizer)
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


# ---------------------------------------------------------------------------- the run
def check_output_dir(config, run_args) -> None:
    out = Path(config.output_dir)
    if out.exists() and any(out.iterdir()) and not (run_args.overwrite_output_dir or config.resume_from_checkpoint):
        raise SystemExit(
            f"hf-kd: output_dir {out} already holds a run. Pick a new output_dir, pass --overwrite_output_dir true "
            "to replace it, or --resume_from_checkpoint to continue it."
        )


def run_distill(model_args, data_args, run_args, config: DistillationConfig) -> dict:
    check_output_dir(config, run_args)
    if config.peft_config is not None and not config.merge_adapter_on_save:  # the report reloads plain models
        raise SystemExit("hf-kd: a recipe with peft_config needs merge_adapter_on_save: true (the report reloads the "
                         "saved student as a Transformers model).")
    torch.manual_seed(config.seed)
    teacher_source = resolve_model(model_args.teacher_model_name_or_path)
    say(f"loading tokenizer and data ({data_args.dataset_name})")
    tokenizer = AutoTokenizer.from_pretrained(teacher_source)
    train, unlabelled, held_out, names = load_splits(data_args, tokenizer)
    extra = f" (+ {len(unlabelled)} unlabelled rows for distillation)" if unlabelled is not None else ""
    say(f"data: {len(train)} training rows{extra}, {len(held_out) if held_out else 0} held-out rows, labels {names}")
    collator = DataCollatorWithPadding(tokenizer)

    seeds = getattr(model_args, "teacher_seeds", [model_args.teacher_seed])
    if len(seeds) > 1 and config.teacher_cache:
        raise SystemExit("hf-kd: teacher_cache holds one teacher's outputs; give one teacher_seed.")
    prepared = [prepare_teacher(model_args, data_args, config, train, names, tokenizer, collator, seed=s) for s in seeds]
    teacher_dir, teacher_seconds = prepared[0]
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    # teacher_seed: [a, b, ...]: one fine-tuned teacher per seed, distilled together (hf_kd.teachers)
    others = [AutoModelForSequenceClassification.from_pretrained(d) for d, _ in prepared[1:]]
    if others:
        say(f"teachers: {len(prepared)} fine-tunes (seeds {seeds}), distilled together")
    if model_args.student_model_name_or_path:
        student = AutoModelForSequenceClassification.from_pretrained(resolve_model(model_args.student_model_name_or_path))
        student_init = model_args.student_model_name_or_path
    elif model_args.student_layers or model_args.student_config:
        try:
            if model_args.student_layers:
                depth = teacher.config.get_text_config().num_hidden_layers
                layers = resolve_student_layers(model_args.student_layers, depth)
                student = student_from_teacher(teacher, layers)
                student_init = f"teacher layers {layers}"
            else:
                changes = parse_student_config(model_args.student_config)
                student = student_from_config(teacher, changes)
                student_init = f"fresh weights, the teacher's config with {json.dumps(changes)}"
        except ValueError as err:
            raise SystemExit(f"hf-kd: {err}") from None
    else:
        raise SystemExit("hf-kd: give student_model_name_or_path, student_layers (e.g. [1,3,5] or 3) or student_config.")
    baseline_init = copy.deepcopy(student) if run_args.baseline else None
    say(f"student: {student_init}, {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters")

    distil_set = train if unlabelled is None else concatenate_datasets([train, unlabelled])
    if config.teacher_cache:  # the teacher's targets come from disk: it is loaded above only to build and rate the student
        from .teacher_cache import check_same_rows, load_cached_dataset, read_cache_metadata

        cached = load_cached_dataset(config.teacher_cache)
        check_same_rows(cached, distil_set, read_cache_metadata(config.teacher_cache))
        say(f"teacher targets: read from the cache {config.teacher_cache}; the teacher is not run for training")
        distil_set = cached
    trainer = DistillationTrainer(
        model=student,
        teacher_model=None if config.teacher_cache else ([teacher, *others] if others else teacher),
        args=config,
        train_dataset=distil_set,
        eval_dataset=held_out,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=_accuracy,
    )
    trainer.card_info = CardInfo.from_cli_args(model_args, data_args, run_args, student_init=student_init)
    say("distilling")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    kd_seconds = time.perf_counter() - start
    trainer.save_model(config.output_dir)
    results = {
        "hf_kd_version": __version__,
        "teacher": model_args.teacher_model_name_or_path,
        "student_init": student_init,
        "train_rows": len(train),
        "unlabelled_rows": len(unlabelled) if unlabelled is not None else 0,
        "distilled": {"train_seconds": kd_seconds, "steps": trainer.state.global_step},
        "teacher_model": {"path": teacher_dir, "train_seconds": teacher_seconds},
    }
    if others:  # every teacher's own accuracy; the report's teacher row is the first
        results["teachers"] = [
            {"seed": s, "path": d, "accuracy": accuracy(m, held_out, collator) if held_out is not None else None}
            for s, (d, _), m in zip(seeds, prepared, [teacher, *others])
        ]
    models = {"teacher": (teacher, teacher_dir), "distilled": (student, config.output_dir)}

    if baseline_init is not None:
        # The same optimizer steps as the distilled run (with an unlabelled transfer set, that is more
        # passes over the labelled rows), the same schedule and the same start.
        steps = trainer.state.global_step
        say(f"baseline: the same student, same start, {steps} steps, on labels alone")
        base_dir = os.path.join(config.output_dir, "baseline")
        base_args = _plain_args(config, base_dir, report_to=[], push_to_hub=False, eval_strategy="no",
                                save_strategy="no", load_best_model_at_end=False, max_steps=steps)
        base_trainer = Trainer(model=baseline_init, args=base_args, train_dataset=train, data_collator=collator,
                               processing_class=tokenizer)
        start = time.perf_counter()
        base_trainer.train()
        results["baseline"] = {"train_seconds": time.perf_counter() - start, "steps": base_trainer.state.global_step}
        base_trainer.save_model(base_dir)
        models["baseline"] = (baseline_init, base_dir)

    if held_out is not None:
        say(f"evaluating on {len(held_out)} held-out rows")
        for name, (model, _) in models.items():
            # save_model() already evaluated the distilled student and the teacher on held_out for the model
            # card (same data, same metric): reuse those numbers instead of a second pass over the split.
            done = _card_accuracy(trainer, {"distilled": "student", "teacher": "teacher"}.get(name))
            results.setdefault(name if name != "teacher" else "teacher_model", {})["accuracy"] = (
                done if done is not None else accuracy(model, held_out, collator)
            )
    if run_args.report and held_out is not None and trainer.is_world_process_zero():
        results["report"] = _report(models, results, held_out, collator, trainer, config, model_args, data_args)
    if trainer.is_world_process_zero():
        Path(config.output_dir, "results.json").write_text(json.dumps(results, indent=1, default=str))
    for name in ("teacher_model", "distilled", "baseline"):
        if "accuracy" in results.get(name, {}):
            say(f"{name:>13s} accuracy: {results[name]['accuracy']:.4f}")
    say(f"student saved to {config.output_dir}")
    return results


def _card_accuracy(trainer, role: str | None) -> float | None:
    """The accuracy that `save_model` computed for the card: the teacher's, or the student's at its final step."""
    entry = trainer.recorded_evaluation(role) if role else None
    if entry is None or (role == "student" and entry[0] != trainer.state.global_step):
        return None
    return card_metrics(entry[2], entry[1]).get("accuracy")


def _scheduled_setting(config, name: str):
    """`temperature` / `alpha` for the report: the value, or 'start -> end (schedule)'."""
    kind, start, end = getattr(config, f"{name}_schedule"), getattr(config, name), getattr(config, f"{name}_end")
    return start if kind == "constant" else f"{start} -> {end} ({kind})"


def _report(models, results, held_out, collator, trainer, config, model_args, data_args) -> dict:
    from .report import ModelResult, count_parameters, format_console, measure_latency_ms, size_on_disk_mb, write_report

    say("measuring CPU latency at batch 1 and 32 (median of repeated runs)")
    batches = {n: collator([held_out[i] for i in range(min(n, len(held_out)))]) for n in (1, 32)}
    rows = []
    for name, (model, folder) in models.items():
        # Timed as a user loads it from its folder: the trainer switched the distilled student and the teacher
        # to eager attention (for their attention maps), which would make them look slower than the baseline.
        model = AutoModelForSequenceClassification.from_pretrained(folder).to("cpu").eval()
        inputs = {n: {k: v for k, v in b.items() if k != "labels"} for n, b in batches.items()}
        key = name if name != "teacher" else "teacher_model"
        rows.append(
            ModelResult(
                name=name,
                accuracy=results[key]["accuracy"],
                parameters=count_parameters(model),
                size_mb=size_on_disk_mb(folder),
                latency_b1_ms=measure_latency_ms(model, inputs[1], repeats=30),
                latency_b32_ms=measure_latency_ms(model, inputs[32], repeats=10),
                train_seconds=results[key].get("train_seconds"),
            )
        )
    settings = {
        "teacher": model_args.teacher_model_name_or_path,
        "student": results["student_init"],
        "dataset": data_args.dataset_name,
        "train rows": results["train_rows"],
        "unlabelled rows (distillation only)": results["unlabelled_rows"],
        "optimizer steps (each student)": results["distilled"]["steps"],
        "max_length": data_args.max_length,
        "epochs": config.num_train_epochs,
        "learning_rate": config.learning_rate,
        "kd_loss": config.kd_loss,
        "temperature": _scheduled_setting(config, "temperature"),
        "alpha": _scheduled_setting(config, "alpha"),
        "hidden_weight": config.hidden_weight,
        "attention_weight": config.attention_weight,
        "layer_map": json.dumps(config.layer_map) if not isinstance(config.layer_map, str) else config.layer_map,
        "threads": torch.get_num_threads(),
    }
    paths = write_report(config.output_dir, rows, trainer.state.log_history, settings)
    print(format_console(rows), flush=True)
    say(f"report: {paths}")
    return {"paths": {k: str(v) for k, v in paths.items()}, "models": [dataclasses.asdict(r) for r in rows]}
