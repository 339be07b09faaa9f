"""hf_kd.apps.report: measurements, markdown, chart."""

from __future__ import annotations

import math
import struct
import sys

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_kd.apps.report import (
    ModelResult,
    count_parameters,
    format_console,
    gap_recovered,
    measure_latency_ms,
    plot_report,
    render_markdown,
    size_on_disk_mb,
    training_log,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(cfg)


def results():
    return [
        ModelResult("teacher", 0.9, 22_713_216, 90.9, 12.0, 200.0, train_seconds=None),
        ModelResult("distilled", 0.85, 4_386_178, 17.5, 3.0, 50.0, train_seconds=61.4),
        ModelResult("baseline", 0.8, 4_386_178, 17.5, 3.1, 40.0, train_seconds=58.0),
    ]


LOG_HISTORY = [
    {"loss": 1.25, "kd_loss": 0.75, "ce_loss": 0.5, "hidden_loss": 0.125, "learning_rate": 5e-5,
     "grad_norm": 3.0, "epoch": 0.5, "step": 10},
    {"eval_loss": 0.9, "eval_accuracy": 0.81, "epoch": 0.5, "step": 10},
    {"loss": 0.875, "kd_loss": 0.5, "ce_loss": 0.25, "hidden_loss": 0.0625, "learning_rate": 2e-5,
     "grad_norm": 2.0, "epoch": 1.0, "step": 20},
    {"eval_loss": 0.7, "eval_accuracy": 0.85, "epoch": 1.0, "step": 20},
    {"train_runtime": 61.4, "train_loss": 1.06, "total_flos": 1.0, "epoch": 1.0, "step": 20},
]

SETTINGS = {"teacher": "sentence-transformers/all-MiniLM-L6-v2", "temperature": 2.0,
            "alpha_kd": 0.5, "layers": [0, 2, 4], "note": "a|b"}


# ------------------------------------------------------------------------------- measurements


def test_count_parameters():
    model = tiny_bert()
    # embeddings (99+32+2)*16 + LN 32; 2 layers x (4*(16*16+16) + 2 LN*32 + 16*32+32 + 32*16+16);
    # pooler 16*16+16; classifier 16*2+2
    layer = 4 * (16 * 16 + 16) + 2 * 32 + (16 * 32 + 32) + (32 * 16 + 16)
    expected = (99 + 32 + 2) * 16 + 32 + 2 * layer + (16 * 16 + 16) + (16 * 2 + 2)
    assert count_parameters(model) == expected == sum(p.numel() for p in model.parameters())


def test_size_on_disk_mb(tmp_path):
    model = tiny_bert()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    assert weights.is_file()
    expected = weights.stat().st_size / 1e6
    (tmp_path / "training_args.bin").write_bytes(b"x" * 5000)  # Trainer's pickled args: not weights
    (tmp_path / "notes.txt").write_bytes(b"x" * 10_000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "other.safetensors").write_bytes(b"x" * 10_000)
    assert size_on_disk_mb(tmp_path) == pytest.approx(expected)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 2_000_000)
    assert size_on_disk_mb(tmp_path) == pytest.approx(expected + 2.0)
    # fp32 weights: 4 bytes per parameter plus the safetensors header (a few kB)
    assert 0 < expected * 1e6 - count_parameters(model) * 4 < 10_000


def test_measure_latency_ms():
    model = tiny_bert()
    model.train()
    inputs = {"input_ids": torch.randint(0, 99, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    ms = measure_latency_ms(model, inputs, repeats=5, warmup=1)
    assert isinstance(ms, float) and math.isfinite(ms) and 0 < ms < 5000
    assert model.training  # mode restored
    model.eval()
    measure_latency_ms(model, inputs, repeats=2, warmup=0)
    assert not model.training
    with pytest.raises(ValueError):
        measure_latency_ms(model, inputs, repeats=0)


def test_measure_latency_is_median(monkeypatch):
    """perf_counter deltas 1, 100, 2 (ms): the median is 2, not the mean."""
    import hf_kd.measure as measure

    ticks = iter([0.0, 0.001, 1.0, 1.1, 2.0, 2.002])
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(ticks))
    model = torch.nn.Linear(3, 2)
    assert measure_latency_ms(model, {"input": torch.ones(1, 3)}, repeats=3, warmup=0) == pytest.approx(2.0)


# ------------------------------------------------------------------------------ gap recovered


def test_gap_recovered():
    assert gap_recovered(0.9, 0.85, 0.8) == pytest.approx(0.5)
    assert gap_recovered(0.9, 0.9, 0.8) == pytest.approx(1.0)
    assert gap_recovered(0.9, 0.8, 0.8) == pytest.approx(0.0)
    assert gap_recovered(0.9, 0.75, 0.8) == pytest.approx(-0.5)
    assert gap_recovered(0.9, 0.92, 0.8) == pytest.approx(1.2)
    assert gap_recovered(0.8, 0.85, 0.8) is None  # no gap
    assert gap_recovered(0.7, 0.85, 0.8) is None  # teacher below baseline
    assert gap_recovered(float("nan"), 0.85, 0.8) is None


# ----------------------------------------------------------------------------------- markdown


def test_training_log_skips_eval_and_summary():
    rows = training_log(LOG_HISTORY)
    assert [r["step"] for r in rows] == [10, 20]
    assert rows[0] == {"step": 10, "loss": 1.25, "kd_loss": 0.75, "ce_loss": 0.5, "hidden_loss": 0.125}


def test_render_markdown_numbers():
    md = render_markdown(results(), LOG_HISTORY, SETTINGS)
    lines = md.splitlines()
    first_table = lines[: lines.index("## Settings")]
    row = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
           for line in first_table if line.startswith("| ") and not line.startswith("| Model")}
    assert set(row) == {"teacher", "distilled", "baseline"}
    # accuracy, params (M), size, b1, b32, speed-up, train time
    assert row["teacher"] == ["0.9000", "22.71", "90.9", "12.00", "200.00", "1.00x", "-"]
    assert row["distilled"] == ["0.8500", "4.39", "17.5", "3.00", "50.00", "4.00x", "61"]
    assert row["baseline"] == ["0.8000", "4.39", "17.5", "3.10", "40.00", "5.00x", "58"]
    assert "Gap recovered: 50.0%" in md
    # settings table, with the pipe escaped
    assert "| temperature | 2 |" in md
    assert "| layers | 0, 2, 4 |" in md
    assert "| note | a\\|b |" in md
    assert "| teacher | sentence-transformers/all-MiniLM-L6-v2 |" in md
    # loss components: two training rows, eval/summary entries skipped, absent columns left out
    loss_header = next(line for line in lines if line.startswith("| Step"))
    assert loss_header == "| Step | loss | kd_loss | ce_loss | hidden_loss |"
    idx = lines.index(loss_header)
    body = [line for line in lines[idx + 2:] if line.startswith("|")]
    assert body == ["| 10 | 1.2500 | 0.7500 | 0.5000 | 0.1250 |", "| 20 | 0.8750 | 0.5000 | 0.2500 | 0.0625 |"]
    assert "0.9000 |" not in "\n".join(body) and "attention_loss" not in md


def test_render_markdown_says_how_far_to_trust_the_numbers_under_the_gap_line():
    from hf_kd.hub import spread_note

    note = spread_note("accuracy", 0.85, 400)
    lines = render_markdown(results(), LOG_HISTORY, SETTINGS, spread=note).splitlines()
    gap = next(i for i, line in enumerate(lines) if line.startswith("Gap recovered"))
    assert lines[gap + 2] == note and "0.018" in note  # sqrt(0.85 * 0.15 / 400) = 0.0179
    assert "One training run" not in render_markdown(results(), LOG_HISTORY, SETTINGS)


def test_render_markdown_missing_roles_and_no_gap():
    only_two = [r for r in results() if r.name != "baseline"]
    md = render_markdown(only_two, [], {})
    assert "Gap recovered: n/a" in md and "baseline" in md.split("Gap recovered:")[1].splitlines()[0]
    assert "(no training steps logged)" in md
    no_teacher = [r for r in results() if r.name != "teacher"]
    md = render_markdown(no_teacher, LOG_HISTORY, SETTINGS)
    assert "n/a" in md and "Gap recovered: n/a (no result named teacher)" in md
    worse_teacher = results()
    worse_teacher[0].score = 0.75
    md = render_markdown(worse_teacher, LOG_HISTORY, SETTINGS)
    assert "Gap recovered: n/a (the teacher is not more accurate" in md
    assert "Train time" not in render_markdown([ModelResult("teacher", 0.9, 10, 1.0, 1.0, 2.0)], [], {})


def test_an_rkd_run_gets_a_relation_column_in_the_table_and_the_plot(tmp_path):
    """The report's components come from hf_kd.losses.COMPONENTS: relation_loss is one of them (it was lost once)."""
    history = [{**row, "relation_loss": 0.25 * row["step"]} for row in LOG_HISTORY if "loss" in row]
    md = render_markdown(results(), history, SETTINGS)
    header = next(line for line in md.splitlines() if line.startswith("| Step |"))
    assert "relation_loss" in header.split("|")[-2]
    assert [row["relation_loss"] for row in training_log(history)] == [2.5, 5.0]
    without = plot_report(results(), LOG_HISTORY, tmp_path / "without.png")
    with_relation = plot_report(results(), history, tmp_path / "with.png")
    assert (tmp_path / "with.png").read_bytes() != (tmp_path / "without.png").read_bytes()
    assert without != with_relation


def test_perplexity_reports_lower_as_better():
    rows = [ModelResult("teacher", 10.0, 1, 1.0, 1.0, 2.0), ModelResult("distilled", 15.0, 1, 1.0, 1.0, 2.0),
            ModelResult("baseline", 20.0, 1, 1.0, 1.0, 2.0)]
    assert gap_recovered(10.0, 15.0, 20.0, higher_is_better=False) == pytest.approx(0.5)
    assert gap_recovered(20.0, 15.0, 10.0, higher_is_better=False) is None  # the teacher is worse
    md = render_markdown(rows, [], {}, metric="perplexity", higher_is_better=False)
    assert "| Model | Perplexity |" in md and "Gap recovered: 50.0%" in md
    assert format_console(rows, metric="perplexity", higher_is_better=False).splitlines()[0].split()[1] == "perplexity"


def test_format_console():
    text = format_console(results())
    lines = text.splitlines()
    assert lines[0].split() == ["model", "acc", "params", "M", "MB", "b1", "ms", "b32", "ms", "speed-up"]
    assert lines[2].split() == ["teacher", "0.9000", "22.71", "90.9", "12.00", "200.00", "1.00x"]
    assert lines[3].split() == ["distilled", "0.8500", "4.39", "17.5", "3.00", "50.00", "4.00x"]
    assert len({len(line) for line in lines[:5]}) == 1  # aligned columns
    assert lines[-1].startswith("Gap recovered: 50.0%")


# -------------------------------------------------------------------------------------- chart


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_report_png(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    had_pyplot = "matplotlib.pyplot" in sys.modules
    path = plot_report(results(), LOG_HISTORY, tmp_path / "chart.png")
    data = (tmp_path / "chart.png").read_bytes()
    width, height = png_size(data)
    assert width > 600 and height > 300
    assert len(data) > 15_000  # two drawn panels, not a blank canvas
    assert path == str(tmp_path / "chart.png")
    assert matplotlib.get_backend() == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot
    # no log history: still a valid chart
    plot_report(results()[:1], [], tmp_path / "empty.png")
    assert png_size((tmp_path / "empty.png").read_bytes())[0] > 600


def test_write_report(tmp_path):
    out = tmp_path / "run" / "report"
    paths = write_report(out, results(), LOG_HISTORY, SETTINGS)
    assert paths == {"markdown": str(out / "report.md"), "plot": str(out / "report.png")}
    md = (out / "report.md").read_text()
    assert md == render_markdown(results(), LOG_HISTORY, SETTINGS, image="report.png")
    assert "](report.png)" in md and "Gap recovered: 50.0%" in md
    assert (out / "report.png").read_bytes()[:8] == PNG_MAGIC
