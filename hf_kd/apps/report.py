"""The run report: the task's held-out metric, size and speed of teacher, distilled student and baseline.

``write_report(output_dir, results, log_history, settings, metric="accuracy")`` writes ``report.md``
(tables) and ``report.png`` (metric bars and loss components over training steps). ``metric`` names the
score (accuracy, token_accuracy, exact_match, perplexity); ``higher_is_better=False`` for perplexity. ``results`` is a list of
:class:`ModelResult`; the rows named ``teacher``, ``distilled`` and ``baseline`` (the student
architecture fine-tuned without distillation) give the "gap recovered" figure.
``log_history`` is ``trainer.state.log_history``. Plotting uses matplotlib's Agg canvas
directly, so a user's pyplot backend is left alone.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..losses import COMPONENTS
from ..measure import count_parameters, measure_latency_ms, size_on_disk_mb

__all__ = [
    "ModelResult",
    "LOSS_COMPONENTS",
    "count_parameters",
    "size_on_disk_mb",
    "measure_latency_ms",
    "gap_recovered",
    "training_log",
    "render_markdown",
    "plot_report",
    "write_report",
    "format_console",
]

# columns of the loss table / lines of the loss plot, in this order, where present
LOSS_COMPONENTS = ("loss", *COMPONENTS)

@dataclass
class ModelResult:
    name: str
    score: float  # the task's held-out metric (report's `metric`)
    parameters: int
    size_mb: float
    latency_b1_ms: float
    latency_b32_ms: float
    train_seconds: float | None = None


def gap_recovered(teacher_acc: float, distilled_acc: float, baseline_acc: float, higher_is_better: bool = True) -> float | None:
    """Share of the teacher-over-baseline gap that distillation recovered.

    ``(distilled - baseline) / (teacher - baseline)``: 1.0 = as good as the teacher, 0.0 = no
    better than the baseline, negative = worse, above 1 = better than the teacher. None when the
    teacher is not better than the baseline (no gap to recover) or an input is missing/NaN. With
    ``higher_is_better=False`` (perplexity) "better" means lower; the formula is the same.
    """
    values = (teacher_acc, distilled_acc, baseline_acc)
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None
    if not higher_is_better:
        teacher_acc, distilled_acc, baseline_acc = -teacher_acc, -distilled_acc, -baseline_acc
    if teacher_acc <= baseline_acc:
        return None
    return (distilled_acc - baseline_acc) / (teacher_acc - baseline_acc)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _find(results: Sequence[ModelResult], role: str) -> ModelResult | None:
    """The result named ``role`` (case-insensitive), else the first named ``role <anything>``."""
    for r in results:
        if r.name.strip().lower() == role:
            return r
    pattern = re.compile(rf"^{role}\b", re.IGNORECASE)
    for r in results:
        if pattern.match(r.name.strip()):
            return r
    return None


def _title(metric: str) -> str:
    return metric.replace("_", " ").capitalize()


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return format(value, spec) if _finite(value) else missing


def _speedup(result: ModelResult, teacher: ModelResult | None) -> float | None:
    if teacher is None or not _finite(teacher.latency_b32_ms) or not _finite(result.latency_b32_ms):
        return None
    if result.latency_b32_ms <= 0:
        return None
    return teacher.latency_b32_ms / result.latency_b32_ms


def training_log(log_history: Iterable[Mapping[str, Any]]) -> list[dict[str, float]]:
    """The training entries of ``trainer.state.log_history`` (those with ``loss`` and ``step``).

    Evaluation entries (``eval_*``) and the final summary (``train_loss``, ...) are skipped.
    Each returned dict has ``step`` and whichever of :data:`LOSS_COMPONENTS` were logged.
    """
    rows = []
    for entry in log_history or ():
        if "loss" not in entry or "step" not in entry:
            continue
        row = {"step": entry["step"]}
        for key in LOSS_COMPONENTS:
            if key in entry and _finite(entry[key]):
                row[key] = float(entry[key])
        rows.append(row)
    return rows


def _present_components(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return [k for k in LOSS_COMPONENTS if any(k in row for row in rows)]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value)
    elif isinstance(value, Mapping):
        text = ", ".join(f"{k}={v}" for k, v in value.items())
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> list[str]:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _number_cells(r: ModelResult, teacher: ModelResult | None) -> list[str]:
    """Score, parameters (M), size, latencies and speed-up of one row, formatted."""
    speed = _speedup(r, teacher)
    return [
        _fmt(r.score, ".4f"),
        _fmt(r.parameters / 1e6 if _finite(r.parameters) else None, ".2f"),
        _fmt(r.size_mb, ".1f"),
        _fmt(r.latency_b1_ms, ".2f"),
        _fmt(r.latency_b32_ms, ".2f"),
        f"{speed:.2f}x" if speed is not None else "n/a",
    ]


def _gap_line(results: Sequence[ModelResult], higher_is_better: bool = True) -> str:
    teacher, distilled, baseline = (_find(results, role) for role in ("teacher", "distilled", "baseline"))
    missing = [role for role, r in (("teacher", teacher), ("distilled", distilled), ("baseline", baseline)) if r is None]
    if missing:
        return f"Gap recovered: n/a (no result named {', '.join(missing)})"
    gap = gap_recovered(teacher.score, distilled.score, baseline.score, higher_is_better)
    formula = (
        f"(distilled {_fmt(distilled.score, '.4f')} - baseline {_fmt(baseline.score, '.4f')}) / "
        f"(teacher {_fmt(teacher.score, '.4f')} - baseline {_fmt(baseline.score, '.4f')})"
    )
    if gap is None:
        worse = "not more accurate than" if higher_is_better else "not below"
        return f"Gap recovered: n/a (the teacher is {worse} the baseline: no gap to recover; {formula})"
    return f"Gap recovered: {gap:.1%} = {formula}"


# --------------------------------------------------------------------------------------------
# markdown / console
# --------------------------------------------------------------------------------------------


def render_markdown(
    results: list[ModelResult], log_history: list[dict], settings: dict, *, image: str | None = None,
    metric: str = "accuracy", higher_is_better: bool = True, spread: str | None = None,
) -> str:
    """The report as Markdown: results table, gap recovered, settings, loss components.

    ``image``: a relative path of the chart to embed (``write_report`` passes ``report.png``). ``spread``: how far
    to trust the numbers (``hub.spread_note``), under the gap line.
    """
    teacher = _find(results, "teacher")
    with_time = any(r.train_seconds is not None for r in results)
    header = ["Model", _title(metric), "Params (M)", "Size (MB)", "Latency b1 (ms)", "Latency b32 (ms)",
              "Speed-up vs teacher (b32)"]
    align = ["---", "--:", "--:", "--:", "--:", "--:", "--:"]
    if with_time:
        header.append("Train time (s)")
        align.append("--:")
    rows = []
    for r in results:
        row = [_cell(r.name), *_number_cells(r, teacher)]
        if with_time:
            row.append(_fmt(r.train_seconds, ".0f", missing="-"))
        rows.append(row)

    lines = ["# Distillation report", ""]
    lines += _md_table(header, rows, align)
    lines += ["", _gap_line(results, higher_is_better), ""]
    if spread:
        lines += [spread, ""]
    if image:
        lines += [f"![{metric.replace('_', ' ')} and loss components]({image})", ""]

    lines += ["## Settings", ""]
    if settings:
        lines += _md_table(["Setting", "Value"], [[_cell(k), _cell(v)] for k, v in settings.items()])
    else:
        lines.append("(none)")
    lines.append("")

    lines += ["## Loss components", ""]
    log_rows = training_log(log_history)
    if log_rows:
        columns = _present_components(log_rows)
        lines += _md_table(
            ["Step", *columns],
            [[str(row["step"]), *(_fmt(row.get(c), ".4f", missing="") for c in columns)] for row in log_rows],
            ["--:"] * (len(columns) + 1),
        )
    else:
        lines.append("(no training steps logged)")
    lines.append("")
    return "\n".join(lines)


def format_console(results: list[ModelResult], metric: str = "accuracy", higher_is_better: bool = True) -> str:
    """A compact plain-text table of ``results`` (plus the gap-recovered line) for printing."""
    teacher = _find(results, "teacher")
    header = ["model", "acc" if metric == "accuracy" else metric, "params M", "MB", "b1 ms", "b32 ms", "speed-up"]
    rows = [[r.name, *_number_cells(r, teacher)] for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in rows]
    out.append(_gap_line(results, higher_is_better))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# chart / files
# --------------------------------------------------------------------------------------------


def plot_report(results: list[ModelResult], log_history: list[dict], path: str | os.PathLike,
                metric: str = "accuracy") -> str:
    """Save a two-panel PNG: the metric per model, and loss components over training steps.

    Uses ``matplotlib.figure.Figure`` with ``FigureCanvasAgg`` directly: pyplot and the user's
    backend are not touched. Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax_acc, ax_loss = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})

    names = [r.name for r in results]
    accs = [r.score if _finite(r.score) else 0.0 for r in results]
    palette = {"teacher": "#4c72b0", "distilled": "#55a868", "baseline": "#c44e52"}
    colors = [palette.get(n.strip().lower().split()[0] if n.strip() else "", "#8172b2") for n in names]
    bars = ax_acc.bar(range(len(names)), accs, color=colors)
    ax_acc.set_xticks(range(len(names)))
    ax_acc.set_xticklabels(names, rotation=15 if len(names) > 3 else 0)
    for bar, r in zip(bars, results):
        ax_acc.annotate(_fmt(r.score, ".3f"), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")
    if metric not in ("perplexity",):  # a share in [0, 1]
        ax_acc.set_ylim(0, 1.08)
    ax_acc.set_ylabel(metric.replace("_", " "))
    ax_acc.set_title(_title(metric))
    ax_acc.grid(axis="y", alpha=0.3)

    rows = training_log(log_history)
    components = _present_components(rows)
    if rows and components:
        for key in components:
            points = [(row["step"], row[key]) for row in rows if key in row]
            ax_loss.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None,
                         markersize=3, linewidth=2.2 if key == "loss" else 1.4, label=key)
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss")
        ax_loss.legend(fontsize=8)
        ax_loss.grid(alpha=0.3)
    else:
        ax_loss.text(0.5, 0.5, "no training steps logged", ha="center", va="center", transform=ax_loss.transAxes)
        ax_loss.set_xticks([])
        ax_loss.set_yticks([])
    ax_loss.set_title("Training loss components")

    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, format="png")
    return path


def write_report(output_dir: str | os.PathLike, results: list[ModelResult], log_history: list[dict], settings: dict,
                 metric: str = "accuracy", higher_is_better: bool = True, spread: str | None = None) -> dict:
    """Write ``report.md`` and ``report.png`` into ``output_dir`` (created if needed).

    Returns ``{"markdown": <path of report.md>, "plot": <path of report.png>}``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "report.png"
    md = out / "report.md"
    plot_report(results, log_history, png, metric=metric)
    md.write_text(render_markdown(results, log_history, settings, image=png.name, metric=metric,
                                  higher_is_better=higher_is_better, spread=spread), encoding="utf-8")
    return {"markdown": str(md), "plot": str(png)}
