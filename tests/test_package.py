"""The package runs when installed (issue 14): the wheel ships the recipes, and `hf-kd distill --config NAME`
finds a packaged recipe from an empty folder, with nothing of the repository on the path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import build_tokenizer, make_bert

ROOT = Path(__file__).resolve().parent.parent
PACKAGED = ROOT / "hf_kd" / "recipes"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    # --no-build-isolation: setuptools from this environment (no download); the build is the same.
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist)], check=True, timeout=300, capture_output=True)
    (found,) = dist.glob("hf_kd-*.whl")
    return found


@pytest.mark.slow
def test_the_wheel_ships_every_recipe_and_the_offline_metric(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {f"hf_kd/recipes/{p.relative_to(PACKAGED).as_posix()}" for p in PACKAGED.rglob("*") if p.is_file()}
    assert len(recipes) > 20 and recipes <= names, sorted(recipes - names)
    assert {"hf_kd/recipes/tasks/causal_lm.yaml", "hf_kd/recipes/methods/rkd.yaml",
            "hf_kd/recipes/accelerate/multi_cpu.yml", "hf_kd/apps/metrics/accuracy/accuracy.py"} <= names
    assert "hf_kd/cli.py" in names and not any(n.startswith(("tests/", "recipes/")) for n in names)


@pytest.mark.slow
def test_the_installed_package_runs_a_packaged_recipe_by_name_from_an_empty_folder(wheel, tmp_path):
    site, cwd = tmp_path / "site", tmp_path / "empty"
    zipfile.ZipFile(wheel).extractall(site)
    cwd.mkdir()
    tok = build_tokenizer()
    make_bert(layers=2, hidden=16, heads=4, vocab=len(tok), seed=1).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    (tmp_path / "data").mkdir()
    for split, n in (("train", 16), ("test", 8)):
        rows = [{"sentence": "good film" if i % 2 else "dull plot", "label": i % 2} for i in range(n)]
        (tmp_path / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import hf_kd; print(hf_kd.__file__)"], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(site / "hf_kd" / "__init__.py"), where.stderr
    run = subprocess.run(
        [sys.executable, "-m", "hf_kd.cli", "distill", "--config", "tasks/sequence_classification", "--quick",
         "--teacher_model_name_or_path", str(tmp_path / "teacher"), "--dataset_name", str(tmp_path / "data"),
         "--eval_split", "test", "--student_layers", "[1]", "--max_steps", "2", "--per_device_train_batch_size", "4",
         "--use_cpu", "true", "--output_dir", str(tmp_path / "out")],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["distilled"]["steps"] == 2 and 0 <= results["distilled"]["accuracy"] <= 1
    assert not list(cwd.iterdir())  # nothing written to the working folder
    # the default recipe is found inside the package too
    default = subprocess.run([sys.executable, "-c", "from hf_kd.apps.recipes import find_recipe, DEFAULT_RECIPE; "
                              "print(find_recipe(DEFAULT_RECIPE))"], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=120)
    assert default.stdout.strip() == str(site / "hf_kd" / "recipes" / "rotten_tomatoes.yaml"), default.stderr
