"""Is the distilled student better than the same student trained on labels alone? Over seeds no one tuned on.

    python scripts/quality.py                      # the default recipe on the reporting seeds (scripts/protocol.py)
    python scripts/quality.py --phase choose -- --temperature 4 --alpha 0.9   # try a setting on the choosing seeds
    python scripts/quality.py --seeds 7 8 --workers 1                         # any seeds, one at a time

Every seed trains the distilled student and the label-only baseline from the same initialisation,
for the same steps, against one cached teacher (its fine-tune has its own `teacher_seed`), and
evaluates both on the held-out split. Prints each arm's mean ± std over seeds, the mean paired
difference with its 95% confidence interval, and the share of the teacher-baseline gap recovered.
Settings are chosen with `--phase choose` and claimed with `--phase report` (protocol.py).
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
from hf_kd.hub import spread_note  # noqa: E402


def one_seed(seed: int, config: str, overrides: list[str], output_dir: str) -> dict:
    from hf_kd.apps.distill import run_distill
    from hf_kd.apps.recipes import parse_distill_args

    out = Path(output_dir) / f"seed{seed}"
    argv = ["--config", config, *overrides, "--seed", str(seed), "--output_dir", str(out),
            "--baseline", "true", "--report", "false", "--overwrite_output_dir", "true"]
    results = run_distill(*parse_distill_args(argv))
    run = {
        "seed": seed,
        "teacher": results["teacher_model"]["accuracy"],
        "distilled": results["distilled"]["accuracy"],
        "baseline": results["baseline"]["accuracy"],
        "distilled_seconds": results["distilled"]["train_seconds"],
        "baseline_seconds": results["baseline"]["train_seconds"],
    }
    print(f"[quality] seed {seed}: {run}", flush=True)
    return run


def record_seeds(folders: list[Path], seeds: dict) -> None:
    """Each seed's saved student records the interval over all seeds; its card is rendered again from that."""
    from hf_kd import hub

    for folder in folders:
        if not (folder / hub.PROVENANCE_NAME).is_file():
            continue
        record = hub.read_provenance(folder)
        if record.get("evaluation"):
            record["evaluation"]["seeds"] = seeds
            hub.write_provenance(folder, record)
            hub.render_card(record).save(folder / hub.CARD_NAME)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_RECIPE))
    parser.add_argument("--output_dir", default="runs/quality")
    add_seed_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="recipe overrides after --, e.g. -- --temperature 4")
    args = parser.parse_args()
    seeds, which = seeds_of(args)

    start = time.perf_counter()
    fn = functools.partial(one_seed, config=args.config, overrides=args.overrides, output_dir=args.output_dir)
    runs = run_seeds(fn, seeds, workers=args.workers)
    wall = time.perf_counter() - start

    teacher = runs[0]["teacher"]
    arms = {"distilled": [r["distilled"] for r in runs], "baseline": [r["baseline"] for r in runs]}
    diff = paired_interval(arms["distilled"], arms["baseline"])
    base_mean = statistics.fmean(arms["baseline"])
    gap = (statistics.fmean(arms["distilled"]) - base_mean) / (teacher - base_mean) if teacher > base_mean else float("nan")
    cost = statistics.fmean(r["distilled_seconds"] / r["baseline_seconds"] for r in runs)
    table = summarize(arms, "baseline", teacher=teacher)
    summary = {
        "config": args.config, "overrides": args.overrides, "seeds": seeds, "seeds_are": which,
        "teacher": teacher, "paired_diff_mean": diff.mean, "paired_diff_ci95": [diff.low, diff.high],
        "gap_recovered": gap, "interval_above_zero": diff.above_zero, "recovers_half_the_gap": gap >= 0.5,
        "kd_time_over_baseline_time": cost, "wall_seconds": wall, "runs": runs, "table": table,
    }
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    seeds_record = {"seeds": seeds, "metric": "accuracy", "mean": diff.mean, "low": diff.low, "high": diff.high}
    record_seeds([Path(args.output_dir) / f"seed{s}" for s in seeds], seeds_record)
    (Path(args.output_dir) / "report.md").write_text(
        f"# Quality over seeds\n\nSeeds {seeds}: {which}. Teacher accuracy {teacher:.4f}.\n\n{table}\n\n"
        f"{spread_note('accuracy', None, None, seeds_record)} Gap recovered {gap:.1%} (on means).\n\n"
        f"`python scripts/quality.py {' '.join(sys.argv[1:])}`\n", encoding="utf-8")
    print()
    print(f"seeds {seeds}: {which}; teacher {teacher:.4f}")
    print(table)
    print(f"paired difference distilled - baseline: {diff}")
    print(f"gap recovered {gap:.1%} = (distilled - baseline) / (teacher - baseline), on means")
    print(f"distillation step time / baseline step time: {cost:.2f}x; wall {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
