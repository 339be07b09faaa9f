"""scripts/protocol.py: the seed protocol of the quality scripts."""

import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import protocol  # noqa: E402


def t_coverage(q: float, df: int, steps: int = 200_001) -> float:
    """P(|T| <= q) for Student's t with df degrees of freedom, by integrating its density (trapezoid)."""
    x = torch.linspace(-q, q, steps, dtype=torch.float64)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = torch.exp(log_c - (df + 1) / 2 * torch.log1p(x * x / df))
    return torch.trapezoid(density, x).item()


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30])
def test_t_table_gives_95_percent_coverage(df):
    assert t_coverage(protocol.t975(df), df) == pytest.approx(0.95, abs=2e-4)


def test_paired_interval_is_the_t_interval_of_the_differences():
    a, b = [0.80, 0.82, 0.79, 0.81, 0.83], [0.78, 0.79, 0.79, 0.78, 0.80]
    diffs = [x - y for x, y in zip(a, b)]
    half = 2.776 * statistics.stdev(diffs) / math.sqrt(5)  # t_{0.975}(4)
    got = protocol.paired_interval(a, b)
    assert got.mean == pytest.approx(statistics.fmean(diffs))
    assert (got.low, got.high) == pytest.approx((got.mean - half, got.mean + half))
    assert got.above_zero and got.n == 5
    # pairing matters: the same values shuffled across seeds give a wider interval here
    unpaired = protocol.paired_interval(a, b[::-1])
    assert unpaired.high - unpaired.low > got.high - got.low


def test_paired_interval_refuses_unpaired_arms_and_says_nan_for_one_seed():
    with pytest.raises(ValueError, match="one value per seed"):
        protocol.paired_interval([1.0, 2.0], [1.0])
    assert math.isnan(protocol.paired_interval([1.0], [0.5]).low)


def test_seed_sets_are_disjoint_and_report_has_at_least_five():
    assert not set(protocol.CHOOSE_SEEDS) & set(protocol.REPORT_SEEDS)
    assert len(protocol.REPORT_SEEDS) >= 5


def test_summarize_gives_gap_recovered_against_the_teacher():
    table = protocol.summarize({"kd": [0.8, 0.82], "base": [0.7, 0.72]}, "base", teacher=0.91)
    row = next(line for line in table.splitlines() if line.startswith("| kd"))
    assert "50%" in row  # (0.81 - 0.71) / (0.91 - 0.71)
    assert "+0.1000" in row


def test_run_seeds_keeps_the_order_of_the_seeds_in_parallel():
    assert protocol.run_seeds(abs, [-3, -1, -2, -5], workers=2) == [3, 1, 2, 5]
