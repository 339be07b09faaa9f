"""`hf-kd init-student --prune width|depth ...`: a student pruned from the teacher by importance measured on a
calibration set (`hf_kd.pruning`), and the calibration rows of a run for the recipe key `student_prune:`."""

from __future__ import annotations

import argparse
import copy
import json

from datasets import load_dataset

from ..errors import InputError
from ..pruning import PLAN_NAME, prune_folder, prune_student
from ..student import parse_student_config
from .offline import resolve_dataset, resolve_model

SIZES = ("hidden_size", "num_attention_heads", "intermediate_size")
#: The keys of a recipe's `student_prune:` mapping.
PRUNE_KEYS = (*SIZES, "layers", "calibration_samples")


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "pruning", "With --prune, the student keeps the teacher's most important units, measured on --calibration "
        "(docs/pruning.md); --layers N then picks the N most important layers instead of spreading them evenly.")
    group.add_argument("--prune", choices=("width", "depth"), default=None,
                       help="width: fewer heads, neurons, hidden channels (and layers with --layers); depth: only "
                       "fewer layers (--layers N), chosen by importance.")
    group.add_argument("--hidden_size", type=int, default=None, help="The student's hidden size (default: the teacher's).")
    group.add_argument("--num_attention_heads", type=int, default=None,
                       help="Query heads per layer (grouped-query teachers: a multiple of the group size).")
    group.add_argument("--intermediate_size", type=int, default=None, help="MLP neurons per layer.")
    group.add_argument("--calibration", default=None,
                       help="The text the importance is measured on: a csv/json/jsonl/parquet/txt file, a folder or a "
                       "dataset name (e.g. cornell-movie-review-data/rotten_tomatoes).")
    group.add_argument("--calibration_column", default="text", help="Its text column (txt files: text).")
    group.add_argument("--calibration_split", default="train", help="Its split.")
    group.add_argument("--calibration_samples", type=int, default=256, help="Rows read (a seeded shuffle).")
    group.add_argument("--max_length", type=int, default=128, help="Tokens per calibration row.")


def check_prune_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations that cannot run, refused by the parser (its usage and the message)."""
    sizes = [f"--{k}" for k in SIZES if getattr(args, k) is not None]
    if args.prune is None:
        if sizes or args.calibration is not None:
            parser.error(f"{', '.join(sizes) or '--calibration'} needs --prune width (or depth).")
        return
    if args.student_config is not None:
        parser.error("give --prune (weights kept from the teacher) or --student_config (fresh weights), not both.")
    if args.calibration is None:
        parser.error("--prune measures importance on text: give --calibration DATA (a file or a dataset name).")
    if args.prune == "width" and not sizes and args.layers is None:
        parser.error("--prune width needs at least one of --hidden_size, --num_attention_heads, --intermediate_size "
                     "(and optionally --layers N).")
    if args.prune == "depth" and (sizes or args.layers is None):
        parser.error("--prune depth keeps the teacher's width: give --layers N alone (sizes go with --prune width).")
    if args.calibration_samples < 1 or args.max_length < 1:
        parser.error("--calibration_samples and --max_length must be positive.")


def calibration_texts(name: str, split: str = "train", column: str = "text", samples: int = 256, seed: int = 0) -> list:
    """Up to `samples` texts of `column` in `split` of the dataset `name` (a seeded shuffle: no order bias)."""
    try:
        raw = load_dataset(**resolve_dataset(name))
    except (ValueError, FileNotFoundError) as err:
        raise InputError(f"cannot read the calibration data {name!r}: {err}") from None
    if split not in raw:
        raise InputError(f"the calibration data has no split {split!r} (it has {sorted(raw)}); set --calibration_split.")
    rows = raw[split]
    if column not in rows.column_names:
        raise InputError(f"the calibration data has no column {column!r} (it has {rows.column_names}); set "
                         "--calibration_column.")
    rows = rows.shuffle(seed=seed).select(range(min(samples, len(rows))))
    return list(rows[column])


def run_prune_student(args: argparse.Namespace) -> dict:
    """`hf-kd init-student --prune ...`: check, read the calibration text, prune, write, print a summary."""
    try:
        texts = calibration_texts(args.calibration, args.calibration_split, args.calibration_column,
                                  args.calibration_samples, args.seed)
        summary = prune_folder(resolve_model(args.teacher), args.output_dir, texts, args.hidden_size,
                               args.num_attention_heads, args.intermediate_size, args.layers,
                               max_length=args.max_length, overwrite_output_dir=args.overwrite_output_dir)
    except (ValueError, OSError) as err:
        raise SystemExit(f"hf-kd init-student: {err}") from None
    plan = summary["plan"]
    print(f"[hf-kd] pruned student ({len(plan.layers)} of {summary['teacher_layers']} layers {plan.layers}, hidden "
          f"{plan.sizes['hidden_size']}, heads {plan.sizes['num_attention_heads']}, MLP {plan.sizes['intermediate_size']}; "
          f"{summary['parameters'] / 1e6:.2f}M parameters, teacher {summary['teacher_parameters'] / 1e6:.2f}M; "
          f"importance measured on {len(texts)} rows) written to {summary['output_dir']} (what was kept: {PLAN_NAME})",
          flush=True)
    return summary


def parse_student_prune(value) -> dict:
    """A recipe's `student_prune:` mapping (or its JSON/YAML text), its keys checked."""
    prune = parse_student_config(value)
    unknown = [k for k in prune if k not in PRUNE_KEYS]
    if unknown:
        raise ValueError(f"student_prune has no key {unknown[0]!r}; its keys are {', '.join(PRUNE_KEYS)}.")
    return prune


def run_calibration(dataset, tokenizer, samples: int = 256, batch_size: int = 16, seed: int = 0) -> list[dict]:
    """Up to `samples` tokenised rows of a run's training set (a seeded shuffle), padded into batches of model inputs."""
    rows = dataset.shuffle(seed=seed).select(range(min(samples, len(dataset))))
    keep = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in rows.column_names]
    rows = [{k: row[k] for k in keep} for row in rows]
    if tokenizer.pad_token is None:
        tokenizer = copy.copy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    return [dict(tokenizer.pad(rows[i:i + batch_size], return_tensors="pt")) for i in range(0, len(rows), batch_size)]


def pruned_student(value, teacher, train, tokenizer) -> tuple:
    """(student, how it was made) for a recipe's `student_prune:`, calibrated on the run's training rows."""
    prune = parse_student_prune(value)
    samples = prune.pop("calibration_samples", 256)
    batches = run_calibration(train, tokenizer, samples)
    student, plan = prune_student(teacher, batches, **{k: prune.get(k) for k in SIZES}, layers=prune.get("layers"))
    sizes = {k: plan.sizes[k] for k in SIZES}
    return student, (f"the teacher pruned by importance on {min(samples, len(train))} training rows: layers "
                     f"{plan.layers}, {json.dumps(sizes)}")
