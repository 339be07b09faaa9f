"""`hf-kd distill`, for every task: load, (fine-tune the teacher), make the student, distil, (train the
baseline), evaluate, report, save.

Reads top to bottom like accelerate's examples: parse (`hf_kd.cli`), load, prepare, train, save. The data
and model loading is the plain `load_dataset` / `from_pretrained` path, fed local stand-ins by
`hf_kd.apps.offline` when the Hub is out of reach. The Rotten Tomatoes demo, the SmolLM2 run and the task
recipes are recipes of this path (hf_kd/recipes).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from datasets import concatenate_datasets
from transformers import Trainer

from ..config import DistillationConfig
from ..hub import CardInfo, card_metrics, spread_note
from ..prompts import PromptCollator, is_prompt_data
from ..tasks import auto_class, model_inputs
from ..teacher_cache import load_cached_dataset, read_cache_metadata
from ..trainer import DistillationTrainer
from ..version import __version__
from .cache_teacher import check_same_rows
from .common import check_output_dir, plain_args, save_or_rescue, say
from .data import collator_for, load_data
from .evaluation import CARD_METRICS, LOWER_IS_BETTER, METRICS, evaluate
from .models import load_teachers, make_student
from .teacher import teacher_rows
from .tokenizers import load_tokenizers
from .recipes import recipe_of
from .report import ModelResult, count_parameters, format_console, measure_latency_ms, size_on_disk_mb, write_report
from .validate import validate_run


def run_distill(model_args, data_args, run_args, config: DistillationConfig) -> dict:
    task, metric = model_args.task, METRICS[model_args.task]
    validate_run(model_args, data_args, run_args, config)  # every problem at once, before anything happens
    _check_run(model_args, run_args, config)
    torch.manual_seed(config.seed)
    say(f"loading tokenizer and data ({data_args.dataset_name})")
    tokenizers = load_tokenizers(model_args, config)  # one for both, or the student's and the teacher's own
    tokenizer = tokenizers.student
    data = load_data(task, data_args, tokenizer)
    # with teacher_tokenizer, the same rows in the teacher's tokens: its fine-tune, its scores, its latency
    teacher_data = load_data(task, data_args, tokenizers.teacher) if tokenizers.cross else data
    extra = f" (+ {len(data.unlabelled)} unlabelled rows for distillation)" if data.unlabelled is not None else ""
    labels = f", labels {data.names}" if data.names is not None else ""
    held_out = data.held_out
    if data.teacher_train is not None:
        extra += f"; the teacher's fine-tune: the first {len(data.teacher_train)} rows, labelled"
    say(f"data: {len(data.train)} training rows{extra}, {len(held_out) if held_out else 0} held-out rows{labels}")

    teachers, prepared, seeds = load_teachers(model_args, data_args, config, teacher_data, tokenizers.teacher)
    student, student_init = make_student(model_args, teachers[0], train=teacher_data.train, tokenizer=tokenizers.teacher)
    baseline_init = copy.deepcopy(student) if run_args.baseline else None
    say(f"student: {student_init}, {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters")
    # prompt-completion rows (docs/generation.md): the trainer's own PromptCollator; the baseline trains on the
    # dataset's completions; the held-out perplexity is measured after training, on reference text
    prompt_data = is_prompt_data(data.train)
    collator = PromptCollator(tokenizer, task == "seq2seq_lm", config.max_prompt_length, lm=True) if prompt_data \
        else collator_for(task, tokenizer, data_args, student)
    measure = _measurer(task, tokenizer, data_args, student, held_out)
    teacher_measure = _measurer(task, tokenizers.teacher, data_args, teachers[0], teacher_data.held_out) \
        if tokenizers.cross else measure
    results = {"hf_kd_version": __version__, "task": task, "metric": metric,
               "teacher": model_args.teacher_model_name_or_path, "student_init": student_init,
               "train_rows": len(data.train), "unlabelled_rows": len(data.unlabelled) if data.unlabelled else 0,
               "teacher_train_rows": len(teacher_rows(data)) if model_args.teacher_finetune_epochs > 0 else 0,
               "teacher_model": {"path": prepared[0][0], "train_seconds": prepared[0][1]}}
    if measure is not None:  # the student as made, before any training (the trainer below seeds afresh)
        results["student_at_init"] = {metric: measure(student)}

    distil_set = data.train if data.unlabelled is None else concatenate_datasets([data.train, data.unlabelled])
    trainer = DistillationTrainer(
        model=student,
        teacher_model=None if config.teacher_cache else (teachers if len(teachers) > 1 else teachers[0]),
        args=config,
        train_dataset=_teacher_targets(config, distil_set),
        eval_dataset=held_out if task in CARD_METRICS and not prompt_data else None,
        data_collator=None if prompt_data else collator,
        processing_class=tokenizer,
        teacher_tokenizer=tokenizers.teacher if tokenizers.cross else None,
        compute_metrics=CARD_METRICS.get(task),
    )
    trainer.card_info = CardInfo.from_cli_args(model_args, data_args, run_args, student_init=student_init,
                                               recipe=recipe_of(sys.argv[1:]))
    say("distilling")
    start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    logs = [e for e in trainer.state.log_history if "kd_loss" in e]
    results["distilled"] = {"train_seconds": time.perf_counter() - start, "steps": trainer.state.global_step,
                            "train_loss": train_output.training_loss, "first_log": logs[0] if logs else None,
                            "last_log": logs[-1] if logs else None}
    save_or_rescue(trainer, config.output_dir)  # a failed save never loses the trained student
    models = {"teacher": (teachers[0], prepared[0][0]), "distilled": (student, config.output_dir)}
    if len(teachers) > 1:  # every teacher's own score; the report's teacher row is the first
        results["teachers"] = [{"seed": s, "path": d, metric: teacher_measure(m) if measure else None}
                               for s, (d, _), m in zip(seeds, prepared, teachers)]
    if baseline_init is not None:
        results["baseline"], models["baseline"] = train_baseline(
            baseline_init, trainer.state.global_step, config, data.train, collator, tokenizer)
    if measure is not None:
        say(f"evaluating on {len(held_out)} held-out rows")
        for name, (model, _) in models.items():
            done = _card_score(trainer, {"distilled": "student", "teacher": "teacher"}.get(name), metric)
            score = teacher_measure if name == "teacher" else measure
            results["teacher_model" if name == "teacher" else name][metric] = done if done is not None else score(model)
    if tokenizers.cross:  # the teacher's score is on its own tokens (a perplexity per teacher token)
        results["teacher_model"]["tokenizer"] = config.teacher_tokenizer
    if run_args.report and measure is not None and trainer.is_world_process_zero():
        held = {"student": (held_out, tokenizer)}
        if tokenizers.cross:
            held["teacher"] = (teacher_data.held_out, tokenizers.teacher)
        results["report"] = _report(task, models, results, held, data_args, trainer, config, model_args)
    if trainer.is_world_process_zero():
        Path(config.output_dir, "results.json").write_text(json.dumps(results, indent=1, default=str))
    for name in ("teacher_model", "student_at_init", "distilled", "baseline"):
        if metric in results.get(name, {}):
            say(f"{name:>15s} {metric}: {results[name][metric]:.4f}")
    say(f"student saved to {config.output_dir}")
    return results


def _check_run(model_args, run_args, config) -> None:
    check_output_dir(config.output_dir, run_args.overwrite_output_dir, config.resume_from_checkpoint)
    if config.peft_config is not None and not config.merge_adapter_on_save:  # the report reloads plain models
        raise SystemExit("hf-kd: a recipe with peft_config needs merge_adapter_on_save: true (the report reloads the "
                         "saved student as a Transformers model).")
    if model_args.task == "causal_lm" and config.hidden_weight > 0 and config.hidden_loss == "mse":
        say("warning: hidden_loss mse compares raw hidden states, whose scale in LMs can be huge (~6e4 on SmolLM2); "
            "hidden_loss cosine is scale-free (docs, 'A causal LM on real weights').")


def _measurer(task, tokenizer, data_args, student, held_out):
    """model -> the task's held-out metric, or None without a held-out split."""
    if held_out is None:
        return None
    collator = collator_for(task, tokenizer, data_args, student, evaluation=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def measure(model) -> float:
        was_training = model.training
        score = evaluate(task, model, held_out, collator, pad_id=pad_id)
        model.train(was_training)
        return score

    return measure


def _teacher_targets(config, distil_set):
    """The training set; with teacher_cache, the cached one (the teacher's targets read from disk)."""
    if not config.teacher_cache:
        return distil_set
    cached = load_cached_dataset(config.teacher_cache)
    check_same_rows(cached, distil_set, read_cache_metadata(config.teacher_cache))
    say(f"teacher targets: read from the cache {config.teacher_cache}; the teacher is not run for training")
    return cached


def train_baseline(model, steps: int, config, train, collator, tokenizer) -> tuple[dict, tuple]:
    """The same student from the same start, trained on labels alone for the distilled run's optimizer steps (with
    an unlabelled transfer set, that is more passes over the labelled rows), the same schedule and seed."""
    say(f"baseline: the same student, same start, {steps} steps, on labels alone")
    base_dir = os.path.join(config.output_dir, "baseline")
    args = plain_args(config, base_dir, report_to=[], push_to_hub=False, eval_strategy="no", save_strategy="no",
                      load_best_model_at_end=False, max_steps=steps,
                      remove_unused_columns=not isinstance(collator, PromptCollator))  # prompt rows: kept for it
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    result = {"train_seconds": time.perf_counter() - start, "steps": trainer.state.global_step}
    trainer.save_model(base_dir)
    return result, (model, base_dir)


def _card_score(trainer, role: str | None, metric: str) -> float | None:
    """The score that `save_model` computed for the card (same rows, same metric), reused instead of a second pass:
    the teacher's, or the student's at its final step."""
    entry = trainer.recorded_evaluation(role) if role else None
    if entry is None or (role == "student" and entry[0] != trainer.state.global_step):
        return None
    return card_metrics(entry[2], entry[1]).get(metric)


def _scheduled_setting(config, name: str):
    """`temperature` / `alpha` for the report: the value, or 'start -> end (schedule)'."""
    kind, start, end = getattr(config, f"{name}_schedule"), getattr(config, name), getattr(config, f"{name}_end")
    return start if kind == "constant" else f"{start} -> {end} ({kind})"


def _report(task, models, results, held, data_args, trainer, config, model_args) -> dict:
    """`held`: {"student" (and, with its own tokenizer, "teacher"): (held-out rows, tokenizer)}, the rows each model
    reads."""
    say("measuring CPU latency at batch 1 and 32 (median of repeated runs)")
    inputs = {}
    for role, (rows, tokenizer) in held.items():
        collator = collator_for(task, tokenizer, data_args, models["distilled"][0], evaluation=True)
        inputs[role] = {n: model_inputs(collator([rows[i] for i in range(min(n, len(rows)))])) for n in (1, 32)}
    held_out = held["student"][0]
    metric, rows = results["metric"], []
    for name, (model, folder) in models.items():
        batches = inputs["teacher" if name == "teacher" and "teacher" in inputs else "student"]
        # Timed as a user loads it from its folder: the trainer switched the distilled student and the teacher
        # to eager attention (for their attention maps), which would make them look slower than the baseline.
        model = auto_class(task).from_pretrained(folder).to("cpu").eval()
        key = name if name != "teacher" else "teacher_model"
        rows.append(ModelResult(
            name=name, score=results[key][metric], parameters=count_parameters(model), size_mb=size_on_disk_mb(folder),
            latency_b1_ms=measure_latency_ms(model, batches[1], repeats=30),
            latency_b32_ms=measure_latency_ms(model, batches[32], repeats=10),
            train_seconds=results[key].get("train_seconds"),
        ))
    settings = {
        "task": task,
        "teacher": model_args.teacher_model_name_or_path,
        "student": results["student_init"],
        "dataset": data_args.dataset_name,
        "train rows": results["train_rows"],
        "unlabelled rows (distillation only)": results["unlabelled_rows"],
        "teacher fine-tune rows": results["teacher_train_rows"] or "none (given teacher)",
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
    if config.teacher_tokenizer is not None:
        settings["teacher_tokenizer"] = config.teacher_tokenizer
    higher = metric not in LOWER_IS_BETTER
    spread = spread_note(metric, results["distilled"][metric], len(held_out))
    paths = write_report(config.output_dir, rows, trainer.state.log_history, settings, metric=metric,
                         higher_is_better=higher, spread=spread)
    print(format_console(rows, metric=metric, higher_is_better=higher), flush=True)
    say(f"report: {paths}")
    return {"paths": {k: str(v) for k, v in paths.items()}, "models": [dataclasses.asdict(r) for r in rows]}
