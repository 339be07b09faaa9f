"""hf_kd.apps.metrics: the bundled accuracy module loads with evaluate.load offline, no network."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import hf_kd.apps.metrics as metrics
from hf_kd.apps.metrics import load_metric, local_metric_path

ACCURACY_DIR = Path(metrics.__file__).parent / "accuracy"


@pytest.fixture
def no_network(monkeypatch):
    """HF_HUB_OFFLINE=1, and any attempt to open a connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network disabled in this test: {address!r}")

    def refuse_create(address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network disabled in this test: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse_create)
    yield attempts
    assert attempts == [], f"tried to reach the network: {attempts}"


PREDS = [0, 1, 1, 0, 2, 1, 0]
REFS = [0, 1, 0, 0, 2, 2, 1]
HAND = 4 / 7  # positions 0, 1, 3, 4 agree


@pytest.mark.parametrize("target", [ACCURACY_DIR, ACCURACY_DIR / "accuracy.py"], ids=["folder", "file"])
def test_evaluate_load_local_path(no_network, target):
    import evaluate

    metric = evaluate.load(str(target), keep_in_memory=True)
    assert isinstance(metric, evaluate.Metric)
    result = metric.compute(predictions=PREDS, references=REFS)
    assert set(result) == {"accuracy"}
    assert result["accuracy"] == pytest.approx(HAND)


def test_load_metric_accuracy(no_network):
    metric = load_metric("accuracy")
    assert metric.name == "accuracy"
    # batches accumulate like the Hub metric
    metric.add_batch(predictions=PREDS[:3], references=REFS[:3])
    metric.add_batch(predictions=PREDS[3:], references=REFS[3:])
    assert metric.compute()["accuracy"] == pytest.approx(HAND)
    assert metric.compute(predictions=[1, 1], references=[1, 1])["accuracy"] == 1.0
    assert metric.compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 1], normalize=False)["accuracy"] == 3.0
    weighted = metric.compute(predictions=[1, 0], references=[1, 1], sample_weight=[3, 1])
    assert weighted["accuracy"] == pytest.approx(0.75)


def test_load_metric_unique_experiments(no_network):
    a, b = load_metric("accuracy"), load_metric("accuracy")
    assert a.experiment_id != b.experiment_id
    a.add_batch(predictions=[1], references=[1])
    b.add_batch(predictions=[1], references=[0])
    assert a.compute()["accuracy"] == 1.0 and b.compute()["accuracy"] == 0.0


def test_local_metric_path():
    assert local_metric_path("accuracy") == str(ACCURACY_DIR / "accuracy.py")
    assert local_metric_path("no_such_metric") is None
    assert local_metric_path("../accuracy") is None


def test_load_metric_other_names_go_to_evaluate(monkeypatch):
    import evaluate

    calls = []
    monkeypatch.setattr(evaluate, "load", lambda path, **kw: calls.append((path, kw)) or "loaded")
    assert load_metric("f1") == "loaded"
    assert calls[0][0] == "f1"
    assert load_metric("accuracy") == "loaded"
    assert calls[1][0] == str(ACCURACY_DIR / "accuracy.py")
    load_metric("accuracy", num_process=2, process_id=0, experiment_id="shared")
    assert calls[2][1] == {"num_process": 2, "process_id": 0, "experiment_id": "shared"}
