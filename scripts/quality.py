"""Is the distilled student better than the same student trained on labels alone? Over several seeds.

    python scripts/quality.py                          # the default recipe, seeds 0 1 2
    python scripts/quality.py --seeds 0 1 2 -- --temperature 4 --alpha 0.9   # any recipe override

Every seed trains the distilled student and the label-only baseline from the same initialisation,
for the same steps, against one cached teacher (its fine-tune has its own `teacher_seed`), and
evaluates both on the held-out split. Prints mean ± std (sample std over seeds) of each, the paired
differences and the share of the teacher-baseline gap that distillation recovered.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hf_kd.apps.distill import run_distill  # noqa: E402
from hf_kd.apps.recipes import DEFAULT_RECIPE, parse_distill_args  # noqa: E402


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_RECIPE))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output_dir", default="runs/quality")
    parser.add_argument("overrides", nargs="*", help="recipe overrides after --, e.g. -- --temperature 4")
    args = parser.parse_args()

    runs = []
    for seed in args.seeds:
        out = Path(args.output_dir) / f"seed{seed}"
        argv = ["--config", args.config, *args.overrides, "--seed", str(seed), "--output_dir", str(out),
                "--baseline", "true", "--report", "false", "--overwrite_output_dir", "true"]
        results = run_distill(*parse_distill_args(argv))
        runs.append(
            {
                "seed": seed,
                "teacher": results["teacher_model"]["accuracy"],
                "distilled": results["distilled"]["accuracy"],
                "baseline": results["baseline"]["accuracy"],
                "distilled_seconds": results["distilled"]["train_seconds"],
                "baseline_seconds": results["baseline"]["train_seconds"],
            }
        )
        print(f"[quality] seed {seed}: {runs[-1]}", flush=True)

    teacher = runs[0]["teacher"]
    kd_mean, kd_std = mean_std([r["distilled"] for r in runs])
    base_mean, base_std = mean_std([r["baseline"] for r in runs])
    diff_mean, diff_std = mean_std([r["distilled"] - r["baseline"] for r in runs])
    gap = (kd_mean - base_mean) / (teacher - base_mean) if teacher > base_mean else float("nan")
    spread = max(kd_std, base_std)
    cost = statistics.mean(r["distilled_seconds"] / r["baseline_seconds"] for r in runs)
    summary = {
        "config": args.config,
        "overrides": args.overrides,
        "seeds": args.seeds,
        "teacher": teacher,
        "distilled_mean": kd_mean,
        "distilled_std": kd_std,
        "baseline_mean": base_mean,
        "baseline_std": base_std,
        "paired_diff_mean": diff_mean,
        "paired_diff_std": diff_std,
        "gap_recovered": gap,
        "beats_baseline_by_more_than_spread": kd_mean - base_mean > spread,
        "recovers_half_the_gap": gap >= 0.5,
        "kd_time_over_baseline_time": cost,
        "runs": runs,
    }
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    print()
    print(f"teacher                 {teacher:.4f}")
    print(f"distilled student       {kd_mean:.4f} ± {kd_std:.4f}   (seeds {args.seeds})")
    print(f"label-only baseline     {base_mean:.4f} ± {base_std:.4f}")
    print(f"paired difference       {diff_mean:+.4f} ± {diff_std:.4f}")
    print(f"gap recovered           {gap:.1%}  = (distilled - baseline) / (teacher - baseline), on means")
    print(f"beats baseline by more than the seed spread ({spread:.4f}): {summary['beats_baseline_by_more_than_spread']}")
    print(f"distillation step time / baseline step time: {cost:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
