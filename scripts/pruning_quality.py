"""Does a student pruned from the teacher by importance distil better than a fresh student of the same shape, and
than a layer-dropped student of similar size? On the demo's data, over seeds no one tuned on (issue 18).

    python scripts/pruning_quality.py                               # the demo recipe, reporting seeds
    python scripts/pruning_quality.py --seeds 100 101 102 --workers 1 --quick -- --max_train_samples 400
    python scripts/pruning_quality.py --hidden_size 256 --num_attention_heads 8 --intermediate_size 1024

Three arms, each distilled by the same recipe (`hf_kd/recipes/rotten_tomatoes.yaml` by default: the same teacher,
data, steps, losses and seed), differing only in how the student starts:

- pruned:  `student_prune`: the fine-tuned teacher cut to --hidden_size/--num_attention_heads/--intermediate_size
  (and --layers) by importance measured on its training rows (hf_kd.pruning);
- fresh:   `student_config`: the same architecture and shape, freshly initialised;
- dropped: `student_layers N`: N teacher layers kept whole (spread evenly, as the demo's student), N chosen so its
  non-embedding parameters (what sets the compute; the embedding table is a lookup) are nearest the pruned one's.

`--at_init` measures, without any training (a few minutes on a CPU), the held-out accuracy of the teacher, of
the importance-pruned student, of students of the same shape pruned at random (one per seed: is the measure
better than chance?) and of the layer-dropped student, as they start.

Reports each arm's held-out accuracy (mean ± std over seeds and the paired difference from the fresh arm with its
95% CI, scripts/protocol.py), parameters (all and non-embedding) and CPU latency at batch 1 and 32.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import add_seed_arguments, paired_interval, run_seeds, seeds_of, summarize  # noqa: E402

from hf_kd.apps.recipes import DEFAULT_RECIPE  # noqa: E402

ARMS = ("pruned", "fresh", "dropped")


def parameters(model) -> tuple[int, int]:
    """(all parameters, those outside embedding tables)."""
    from torch import nn

    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    return total, total - embedding


def shapes(config: str, overrides: list[str], sizes: dict) -> dict:
    """Each arm's recipe override, and the parameters of each shape (built from configs, no weights loaded)."""
    import transformers

    from hf_kd.apps.offline import resolve_model
    from hf_kd.apps.recipes import parse_distill_args
    from hf_kd.student import student_config_from

    model_args = parse_distill_args(["--config", config, *overrides])[0]
    teacher_config = transformers.AutoConfig.from_pretrained(resolve_model(model_args.teacher_model_name_or_path))
    teacher_config.num_labels = 2
    depth = teacher_config.num_hidden_layers
    layers = sizes.pop("layers") or depth
    width = {k: v for k, v in sizes.items() if v is not None}
    build = transformers.AutoModelForSequenceClassification.from_config
    pruned_shape = student_config_from(teacher_config, {**width, "num_hidden_layers": layers})
    pruned_params = parameters(build(pruned_shape))
    by_depth = {n: parameters(build(student_config_from(teacher_config, {"num_hidden_layers": n})))
                for n in range(1, depth + 1)}
    dropped = min(by_depth, key=lambda n: (abs(by_depth[n][1] - pruned_params[1]), n))
    prune = {**width, "layers": layers}
    fresh = {**width, "num_hidden_layers": layers}
    return {
        "pruned": {"overrides": ["--student_prune", json.dumps(prune)], "parameters": pruned_params},
        "fresh": {"overrides": ["--student_config", json.dumps(fresh)], "parameters": pruned_params},
        "dropped": {"overrides": ["--student_layers", str(dropped)], "parameters": by_depth[dropped]},
    }


def one_seed(seed: int, config: str, overrides: list[str], arms: dict, output_dir: str, quick: bool) -> dict:
    from hf_kd.apps.distill import run_distill
    from hf_kd.apps.recipes import parse_distill_args

    run = {"seed": seed}
    for name, arm in arms.items():
        out = Path(output_dir) / f"seed{seed}" / name
        argv = ["--config", config, *(["--quick"] if quick else []), *overrides, "--student_layers", "null",
                *arm["overrides"], "--seed", str(seed), "--output_dir", str(out), "--baseline", "false",
                "--report", "false", "--overwrite_output_dir", "true"]
        results = run_distill(*parse_distill_args(argv))
        run[name] = results["distilled"]["accuracy"]
        run[f"{name}_at_init"] = results.get("student_at_init", {}).get("accuracy")
        run[f"{name}_seconds"] = results["distilled"]["train_seconds"]
        run["teacher"] = results["teacher_model"]["accuracy"]
        run[f"{name}_dir"] = str(out)
    print(f"[pruning_quality] seed {seed}: {run}", flush=True)
    return run


def latencies(folder: str, texts: list[str]) -> tuple[float, float]:
    """Median CPU latency (ms) of the saved model at batch 1 and 32 (hf_kd.measure)."""
    import transformers

    from hf_kd.measure import measure_latency_ms

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = []
    for n, repeats in ((1, 30), (32, 10)):
        batch = dict(tok(texts[:n], padding=True, truncation=True, max_length=64, return_tensors="pt"))
        out.append(measure_latency_ms(model, batch, repeats=repeats))
    return out[0], out[1]


def at_init(config: str, overrides: list[str], quick: bool, sizes: dict, seeds: list[int]) -> dict:
    """Held-out accuracy of each starting point, before training: teacher, pruned by importance, pruned at random
    (same kept layers and shapes, one per seed), layers dropped."""
    import torch
    from transformers import AutoTokenizer

    from hf_kd.apps.data import collator_for, load_data
    from hf_kd.apps.evaluation import evaluate
    from hf_kd.apps.models import load_teachers
    from hf_kd.apps.offline import resolve_model
    from hf_kd.apps.prune import run_calibration
    from hf_kd.apps.recipes import parse_distill_args
    from hf_kd.pruning import Importance, measure_importance, prune_student, prune_width
    from hf_kd.student import student_from_teacher, uniform_layers

    model_args, data_args, _, cfg = parse_distill_args(["--config", config, *(["--quick"] if quick else []), *overrides])
    task = model_args.task
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model_args.teacher_model_name_or_path))
    data = load_data(task, data_args, tokenizer)
    teacher = load_teachers(model_args, data_args, cfg, data, tokenizer)[0][0].eval()
    collator = collator_for(task, tokenizer, data_args, teacher, evaluation=True)
    score = lambda m: evaluate(task, m.eval(), data.held_out, collator, pad_id=tokenizer.pad_token_id)  # noqa: E731
    width = {k: sizes[k] for k in ("hidden_size", "num_attention_heads", "intermediate_size")}
    batches = run_calibration(data.train, tokenizer, 256)
    start = time.perf_counter()
    pruned, plan = prune_student(teacher, batches, **width, layers=sizes["layers"])
    prune_seconds = time.perf_counter() - start
    shallow = student_from_teacher(teacher, plan.layers) if len(plan.layers) < teacher.config.num_hidden_layers else teacher
    measured = measure_importance(shallow, batches)
    random_scores = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        chance = Importance([torch.rand(h.shape, generator=g) for h in measured.heads],
                            [torch.rand(f.shape, generator=g) for f in measured.neurons],
                            torch.rand(measured.channels.shape, generator=g), measured.tokens)
        random_scores.append(score(prune_width(shallow, batches, **width, importance=chance)[0]))
    dropped_n = sizes["dropped_layers"]
    dropped = student_from_teacher(teacher, uniform_layers(teacher.config.num_hidden_layers, dropped_n))
    return {"teacher": score(teacher), "pruned": score(pruned), "pruned_layers": plan.layers,
            "random_pruned": random_scores, "dropped": score(dropped), "dropped_layers": dropped_n,
            "held_out_rows": len(data.held_out), "calibration_batches": len(batches), "prune_seconds": prune_seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_RECIPE))
    parser.add_argument("--output_dir", default="runs/pruning_quality")
    parser.add_argument("--quick", action="store_true", help="apply the recipe's quick: block (a smaller run)")
    parser.add_argument("--hidden_size", type=int, default=192)
    parser.add_argument("--num_attention_heads", type=int, default=6)
    parser.add_argument("--intermediate_size", type=int, default=768)
    parser.add_argument("--layers", type=int, default=None, help="layers of the pruned/fresh student (default all)")
    parser.add_argument("--at_init", action="store_true", help="no training: each starting point's accuracy")
    add_seed_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every arm after --, e.g. -- --temperature 4")
    args = parser.parse_args()
    seeds, which = seeds_of(args)
    sizes = {"hidden_size": args.hidden_size, "num_attention_heads": args.num_attention_heads,
             "intermediate_size": args.intermediate_size, "layers": args.layers}
    if args.at_init:
        dropped = int(shapes(args.config, args.overrides, dict(sizes))["dropped"]["overrides"][1])
        found = at_init(args.config, args.overrides, args.quick, {**sizes, "dropped_layers": dropped}, seeds)
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "at_init.json").write_text(json.dumps({"sizes": sizes, "seeds": seeds, **found}, indent=1))
        chance = found["random_pruned"]
        print(f"at init, {found['held_out_rows']} held-out rows: teacher {found['teacher']:.4f}; pruned by importance "
              f"(layers {found['pruned_layers']}) {found['pruned']:.4f}; pruned at random {statistics.fmean(chance):.4f} "
              f"(min {min(chance):.4f}, max {max(chance):.4f}, seeds {seeds}); {found['dropped_layers']} layers dropped "
              f"{found['dropped']:.4f}; pruning took {found['prune_seconds']:.1f} s")
        return 0
    arms = shapes(args.config, args.overrides, sizes)
    for name, arm in arms.items():
        print(f"[pruning_quality] {name}: {' '.join(arm['overrides'])}; parameters {arm['parameters'][0] / 1e6:.2f}M "
              f"({arm['parameters'][1] / 1e6:.2f}M outside embeddings)", flush=True)

    start = time.perf_counter()
    fn = functools.partial(one_seed, config=args.config, overrides=args.overrides, arms=arms,
                           output_dir=args.output_dir, quick=args.quick)
    runs = run_seeds(fn, seeds, workers=args.workers)
    wall = time.perf_counter() - start

    texts = ["an absorbing, well acted film that never quite finds its footing in the last act"] * 32
    speed = {name: latencies(runs[0][f"{name}_dir"], texts) for name in ARMS}
    teacher = runs[0]["teacher"]
    scores = {name: [r[name] for r in runs] for name in ARMS}
    table = summarize(scores, "fresh", teacher=teacher)
    lines = ["| arm | parameters | outside embeddings | latency b1 (ms) | latency b32 (ms) | accuracy at init |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in ARMS:
        total, inner = arms[name]["parameters"]
        init = [r[f"{name}_at_init"] for r in runs if r[f"{name}_at_init"] is not None]
        lines.append(f"| {name} | {total / 1e6:.2f}M | {inner / 1e6:.2f}M | {speed[name][0]:.1f} | {speed[name][1]:.1f} "
                     f"| {statistics.fmean(init) if init else float('nan'):.4f} |")
    spread = max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in scores.values())
    diff = paired_interval(scores["pruned"], scores["fresh"])
    summary = {"config": args.config, "quick": args.quick, "overrides": args.overrides, "seeds": seeds,
               "seeds_are": which, "sizes": sizes, "arms": {k: v["overrides"] for k, v in arms.items()},
               "teacher": teacher, "runs": runs, "latency_ms": speed, "pruned_minus_fresh": [diff.mean, diff.low, diff.high],
               "beats_fresh_by_more_than_seed_spread": diff.mean > spread, "wall_seconds": wall}
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    print()
    print(f"seeds {seeds}: {which}; teacher accuracy {teacher:.4f}; wall {wall / 60:.1f} min")
    print(table)
    print()
    print("\n".join(lines))
    print(f"\npruned - fresh: {diff}; largest seed std {spread:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
