"""`hf-kd search --config RECIPE --trials N`: Trainer's own `hyperparameter_search` (optuna) over a recipe's
distillation settings (temperature, alpha, the weights of its feature terms; `hf_kd.search`), each trial a fresh
copy of the recipe's student distilled as `hf-kd distill` would, scored on a held-out split that is not the one the
recipe reports on. Writes search.md (the trials' table, the best settings and the command that runs them) and
search.json into the recipe's output_dir.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import time
from pathlib import Path

import torch
from datasets import concatenate_datasets
from transformers import AutoTokenizer

from ..search import distillation_hp_space
from ..trainer import DistillationTrainer
from .common import check_output_dir, say
from .data import collator_for, load_data
from .evaluation import CARD_METRICS, LOWER_IS_BETTER, METRICS
from .models import check_model_paths, load_teachers, make_student
from .offline import resolve_model
from .recipes import parse_distill_args


def parse_search_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """`hf-kd search`'s own options; the rest is a distill command line (the recipe and overrides)."""
    parser = argparse.ArgumentParser(
        prog="hf-kd search", add_help=False,
        description="Search temperature, alpha and the recipe's loss weights with Trainer.hyperparameter_search "
        "(optuna: pip install 'hf_kd[search]'). Each trial distils a fresh copy of the recipe's student; trials are "
        "scored on --search_split, never on the recipe's eval_split. Its own options come first; the rest is a "
        "distill command line.")
    parser.add_argument("--trials", type=int, default=10, help="Number of trials (each is one distillation run).")
    parser.add_argument("--search_split", default="validation",
                        help="The split trials are scored on (default validation; keep the test split for the claim).")
    parser.add_argument("--sampler_seed", type=int, default=0, help="Seed of optuna's TPE sampler.")
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print()
    options, rest = parser.parse_known_args(argv)
    if options.trials < 1:
        parser.error("--trials must be at least 1.")
    return options, rest


def run_search_command(argv: list[str]) -> dict:
    options, rest = parse_search_args(argv)
    parsed = parse_distill_args(rest, prog="hf-kd search")
    check_model_paths(parsed[0])
    return run_search(*parsed, trials=options.trials, search_split=options.search_split,
                      sampler_seed=options.sampler_seed, command=["hf-kd", "search", *argv])


def run_search(model_args, data_args, run_args, config, trials: int, search_split: str = "validation",
               sampler_seed: int = 0, command: list[str] | None = None) -> dict:
    try:
        import optuna
    except ImportError:
        raise SystemExit("hf-kd search needs optuna: pip install 'hf_kd[search]' (or pip install optuna).") from None
    if config.teacher_cache:
        raise SystemExit("hf-kd search runs the teacher live (each trial's loss plan is built again); unset teacher_cache.")
    if config.teacher_tokenizer is not None:
        raise SystemExit(f"hf-kd search does not search across tokenizers yet (teacher_tokenizer="
                         f"{config.teacher_tokenizer!r}: its trials would read the teacher's tokenizer for both "
                         "models); search with hf-kd distill runs of your own, or unset teacher_tokenizer.")
    if search_split == data_args.eval_split:
        say(f"warning: trials are scored on {search_split!r}, the split the recipe reports on; a score picked there "
            "flatters the pick. Use another split (--search_split).")
    check_output_dir(config.output_dir, run_args.overwrite_output_dir)
    task = model_args.task
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_args.teacher_model_name_or_path))
    data_args = copy.copy(data_args)
    data_args.eval_split = search_split
    try:
        data = load_data(task, data_args, tokenizer)
    except SystemExit as err:
        raise SystemExit(f"{err} (hf-kd search scores its trials on --search_split {search_split!r}: give a split the "
                         "dataset has, other than the one the recipe reports on.)") from None
    teachers, _, _ = load_teachers(model_args, data_args, config, data, tokenizer)
    start, student_init = make_student(model_args, teachers[0], train=data.train, tokenizer=tokenizer)
    say(f"student: {student_init}; each trial distils a fresh copy of it")

    metric = METRICS[task] if task in CARD_METRICS else "loss"
    direction = "minimize" if metric == "loss" or metric in LOWER_IS_BETTER else "maximize"
    space, rows, current = distillation_hp_space(config), {}, {}

    def hp_space(trial) -> dict:
        settings = space(trial)
        current.update(number=trial.number, settings=settings, start=time.perf_counter())
        return settings

    def objective(metrics: dict) -> float:
        value = metrics[f"eval_{metric}"]
        rows[current["number"]] = {"trial": current["number"], **current["settings"], metric: value,
                                   "seconds": time.perf_counter() - current["start"]}
        return value

    trainer = DistillationTrainer(
        model_init=lambda: copy.deepcopy(start),  # every trial starts from the same student
        teacher_model=teachers if len(teachers) > 1 else teachers[0],
        args=config,
        train_dataset=data.train if data.unlabelled is None else concatenate_datasets([data.train, data.unlabelled]),
        eval_dataset=data.held_out,
        data_collator=collator_for(task, tokenizer, data_args, start),
        processing_class=tokenizer,
        compute_metrics=CARD_METRICS.get(task),
    )
    say(f"searching {', '.join(['temperature', 'alpha', *space.terms])} over {trials} trials, {direction} "
        f"{metric} on {search_split!r} ({len(data.held_out)} rows)")
    best = trainer.hyperparameter_search(hp_space=hp_space, compute_objective=objective, n_trials=trials,
                                         direction=direction, backend="optuna",
                                         sampler=optuna.samplers.TPESampler(seed=sampler_seed))
    result = {"metric": metric, "direction": direction, "split": search_split, "student": student_init,
              "trials": [rows[k] for k in sorted(rows)], "best": {"trial": int(best.run_id), metric: best.objective,
                                                                   **best.hyperparameters}}
    paths = write_search_report(config.output_dir, result, command)
    say(f"best trial {best.run_id}: {metric} {best.objective:.4f} with {json.dumps(best.hyperparameters)}; report: "
        f"{paths[0]}")
    return result


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def write_search_report(output_dir, result: dict, command: list[str] | None) -> tuple[Path, Path]:
    """search.md (the trials' table, the best settings, the command that runs them) and search.json."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metric, best = result["metric"], result["best"]
    names = [k for k in result["trials"][0] if k not in ("trial", metric, "seconds")] if result["trials"] else []
    lines = ["# Search over the distillation settings", "",
             f"{len(result['trials'])} trials of Trainer.hyperparameter_search (optuna TPE), {result['direction']} "
             f"{metric} on the {result['split']!r} split; student: {result['student']}.", ""]
    if command:
        lines += ["Command: `" + shlex.join(command) + "`", ""]
    header = ["trial", *names, metric, "seconds"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for row in result["trials"]:
        cells = [_number(row[k]) for k in header]
        cells[0] += " **(best)**" if row["trial"] == best["trial"] else ""
        lines.append("| " + " | ".join(cells) + " |")
    settings = {k: v for k, v in best.items() if k not in ("trial", metric)}
    lines += ["", f"## Best: trial {best['trial']}, {metric} {_number(best[metric])}", ""]
    lines += [f"- {k}: {_number(v)}" for k, v in settings.items()]
    flags = " ".join(f"--{k} {v:.4g}" for k, v in settings.items())
    recipe = _recipe_of(command)
    lines += ["", "Run it (and report on the recipe's own eval split, with seeds the search did not use):", "",
              f"    hf-kd distill{f' --config {recipe}' if recipe else ''} {flags}", "",
              "The score above picked these settings, so it flatters them: claim a gain only from runs on other "
              "seeds and the held-out split (docs/search.md)."]
    md, js = out / "search.md", out / "search.json"
    md.write_text("\n".join(lines) + "\n")
    js.write_text(json.dumps(result, indent=1))
    return md, js


def _recipe_of(command: list[str] | None) -> str | None:
    if command and "--config" in command[:-1]:
        return command[command.index("--config") + 1]
    return None
