"""Students made from teachers keep exactly the teacher layers asked for."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import ListDataset, build_tokenizer, make_bert, make_llama, random_batch, rows_from_batch, write_tiny_csv
from transformers import AutoTokenizer, BertForSequenceClassification

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.cli import main, parse_distill_args
from hf_kd.layer_map import resolve_layer_map
from hf_kd.student import (
    init_student,
    parse_student_config,
    parse_student_layers,
    resolve_student_layers,
    student_from_config,
    student_from_teacher,
    uniform_layers,
)


def test_student_keeps_the_chosen_bert_layers_and_the_rest_of_the_teacher():
    teacher = make_bert(layers=6, hidden=16, heads=4, seed=3)
    student = student_from_teacher(teacher, [1, 3, 5])
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 6
    t, s = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 2, 4]):
        for key in [k for k in t if k.startswith(f"bert.encoder.layer.{old}.")]:
            assert torch.equal(s[key.replace(f"layer.{old}.", f"layer.{new}.")], t[key])
    for key in ("bert.embeddings.word_embeddings.weight", "classifier.weight", "bert.pooler.dense.weight"):
        assert torch.equal(s[key], t[key])
    assert not any(k.startswith("bert.encoder.layer.3.") for k in s)
    # A copy, not a view: training the student leaves the teacher alone.
    with torch.no_grad():
        student.bert.encoder.layer[0].output.dense.weight.add_(1.0)
    assert not torch.equal(student.bert.encoder.layer[0].output.dense.weight, teacher.bert.encoder.layer[0].output.dense.weight)


def test_decoder_student_renumbers_its_attention_layers():
    teacher = make_llama(layers=4)
    student = student_from_teacher(teacher, [2, 4])
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    ids = torch.randint(0, 64, (2, 6))
    assert student(input_ids=ids).logits.shape == (2, 6, 64)


@pytest.mark.parametrize("layers", [[], [0], [7], [1, 1]])
def test_bad_layer_lists_are_refused(layers):
    with pytest.raises(ValueError, match="distinct teacher layers in 1..6"):
        student_from_teacher(make_bert(layers=6), layers)


# ---------------------------------------------------------------- choosing layers by number
def test_uniform_layers_spread_evenly_and_end_with_the_last():
    for depth in range(1, 25):
        for n in range(1, depth + 1):
            chosen = uniform_layers(depth, n)
            # Halves round up, written with integers: round(k * L / n) = floor((2kL + n) / 2n).
            assert chosen == [(2 * k * depth + n) // (2 * n) for k in range(1, n + 1)]
            assert len(chosen) == n and chosen[-1] == depth
            assert all(b > a for a, b in zip(chosen, chosen[1:]))
            gaps = [b - a for a, b in zip([0, *chosen], chosen)]
            assert max(gaps) - min(gaps) <= 1  # evenly spread
    assert uniform_layers(12, 6) == [2, 4, 6, 8, 10, 12]  # DistilBERT-style: every other one
    assert uniform_layers(6, 3) == [2, 4, 6]
    assert uniform_layers(6, 6) == [1, 2, 3, 4, 5, 6]


def test_a_student_of_uniform_layers_is_compared_with_the_layers_it_was_copied_from():
    """layer_map: uniform pairs student layer k with teacher layer uniform_layers(L, n)[k - 1]."""
    for depth, n in [(12, 6), (6, 4), (12, 5), (4, 1)]:
        pairs = resolve_layer_map("uniform", n, depth)
        assert [t for _, t in pairs] == uniform_layers(depth, n)


@pytest.mark.parametrize("n", [0, 7, -1, True, 2.5, "3"])
def test_a_number_of_layers_outside_the_teacher_is_refused(n):
    with pytest.raises(ValueError, match=r"integer in 1\.\.6"):
        uniform_layers(6, n)


@pytest.mark.parametrize("text, expected", [("3", 3), (3, 3), ("[1, 3, 5]", [1, 3, 5]), ([2, 4], [2, 4]), ("2,5", [2, 5]), ("1, 3, 5", [1, 3, 5])])
def test_student_layers_is_a_count_or_a_list(text, expected):
    assert parse_student_layers(text) == expected


@pytest.mark.parametrize("bad", ["[]", "three", "[1, 'a']", "{a: 1}", "1.5", "true", "1,a", "1,,2"])
def test_student_layers_of_another_shape_are_refused(bad):
    with pytest.raises(ValueError, match="neither a number of layers"):
        parse_student_layers(bad)


def test_resolve_student_layers_maps_a_count_and_keeps_a_list():
    assert resolve_student_layers("2", 6) == [3, 6]
    assert resolve_student_layers("[1, 2]", 6) == [1, 2]


# ---------------------------------------------------------------- hf-kd init-student
@pytest.fixture
def teacher_dir(tmp_path):
    tok = build_tokenizer()
    teacher = make_bert(layers=6, hidden=16, heads=4, vocab=len(tok), seed=5)
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher", teacher


@pytest.mark.parametrize("layers, chosen", [("3", [2, 4, 6]), ("[1,2,5]", [1, 2, 5]), ("1", [6])])
def test_init_student_writes_a_loadable_folder_of_the_chosen_teacher_layers(tmp_path, teacher_dir, layers, chosen):
    folder, teacher = teacher_dir
    out = tmp_path / "student"
    assert main(["init-student", "--teacher", str(folder), "--layers", layers, "--output_dir", str(out)]) == 0
    student = BertForSequenceClassification.from_pretrained(out)
    assert student.config.num_hidden_layers == len(chosen)
    s, t = student.state_dict(), teacher.state_dict()
    assert set(s) == {k for k in t if not k.startswith("bert.encoder.layer.")} | {
        k.replace(f"layer.{old - 1}.", f"layer.{new}.")
        for new, old in enumerate(chosen)
        for k in t
        if k.startswith(f"bert.encoder.layer.{old - 1}.")
    }
    for new, old in enumerate(chosen):
        keys = [k for k in t if k.startswith(f"bert.encoder.layer.{old - 1}.")]
        assert keys
        for key in keys:
            assert torch.equal(s[key.replace(f"layer.{old - 1}.", f"layer.{new}.")], t[key])
    for key in ("bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight", "classifier.weight"):
        assert torch.equal(s[key], t[key])
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(folder).get_vocab()


def test_init_student_from_a_teacher_without_tokenizer_writes_the_model_alone(tmp_path):
    make_bert(layers=4, seed=1).save_pretrained(tmp_path / "teacher")
    summary = init_student(str(tmp_path / "teacher"), str(tmp_path / "out"), layers=2)
    assert summary["layers"] == [2, 4] and summary["tokenizer"] is False
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert BertForSequenceClassification.from_pretrained(tmp_path / "out").config.num_hidden_layers == 2


def test_init_student_refuses_a_non_empty_output_dir_unless_told(tmp_path, teacher_dir):
    folder, _ = teacher_dir
    out = tmp_path / "student"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["init-student", "--teacher", str(folder), "--layers", "2", "--output_dir", str(out)]
    with pytest.raises(SystemExit, match="is not empty.*--overwrite_output_dir"):
        main(argv)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main(argv + ["--overwrite_output_dir"]) == 0
    assert BertForSequenceClassification.from_pretrained(out).config.num_hidden_layers == 2
    assert (out / "notes.txt").read_text() == "mine"  # written into, not wiped


@pytest.mark.parametrize(
    "change, message",
    [
        (["--layers", "7"], r"integer in 1\.\.6"),
        (["--layers", "0"], r"integer in 1\.\.6"),
        (["--layers", "[1,9]"], r"distinct teacher layers in 1\.\.6"),
        (["--layers", "[2,2]"], r"distinct teacher layers in 1\.\.6"),
        (["--teacher", "MISSING"], "does not exist"),
        (["--student_config", "{hidden_size: 10}"], "not a multiple of num_attention_heads"),
    ],
)
def test_init_student_refuses_bad_input_and_writes_nothing(tmp_path, teacher_dir, change, message):
    folder, _ = teacher_dir
    out = tmp_path / "student"
    argv = {"--teacher": str(folder), "--layers": "2", "--output_dir": str(out)}
    if "--student_config" in change:
        argv.pop("--layers")
    if change[0] == "--teacher":
        change = ["--teacher", str(tmp_path / change[1])]
    argv.update(dict(zip(change[::2], change[1::2])))
    with pytest.raises(SystemExit, match=message):
        main(["init-student", *[w for pair in argv.items() for w in pair]])
    assert not out.exists()


def test_init_student_needs_exactly_one_recipe(tmp_path, teacher_dir, capsys):
    folder, _ = teacher_dir
    base = ["init-student", "--teacher", str(folder), "--output_dir", str(tmp_path / "s")]
    for extra in ([], ["--layers", "2", "--student_config", "{hidden_size: 8}"]):
        with pytest.raises(SystemExit):
            main(base + extra)
        assert "give --layers or --student_config" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- student_config: fresh, narrower students
NARROW = {"hidden_size": 8, "intermediate_size": 24, "num_attention_heads": 2, "num_hidden_layers": 2}


def test_student_config_gives_the_asked_widths_and_keeps_vocabulary_and_labels():
    teacher = make_bert(layers=4, hidden=16, heads=4, num_labels=3, seed=1)
    student = student_from_config(teacher, NARROW)
    assert type(student) is type(teacher)
    for key, value in NARROW.items():
        assert getattr(student.config, key) == value
    assert getattr(teacher.config, "hidden_size") == 16  # the teacher's config is untouched
    assert student.config.vocab_size == teacher.config.vocab_size and student.config.num_labels == 3
    layer = student.bert.encoder.layer[0]
    assert layer.attention.self.query.weight.shape == (8, 8)
    assert layer.intermediate.dense.weight.shape == (24, 8)
    assert len(student.bert.encoder.layer) == 2
    out = student(input_ids=torch.randint(0, 64, (2, 5)), output_hidden_states=True)
    assert out.logits.shape == (2, 3) and out.hidden_states[-1].shape == (2, 5, 8)


def test_student_config_of_a_decoder_recomputes_its_head_size():
    teacher = make_llama(layers=4, hidden=16, heads=4)  # head_dim 4
    student = student_from_config(teacher, {"hidden_size": 12, "num_attention_heads": 2, "num_hidden_layers": 2})
    assert student.config.head_dim == 6 and student.config.num_key_value_heads == 2
    assert student.model.layers[0].self_attn.q_proj.weight.shape == (12, 12)
    assert student(input_ids=torch.randint(0, 64, (2, 6))).logits.shape == (2, 6, 64)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_size": 10}, r"hidden_size=10 is not a multiple of num_attention_heads=4.*num_attention_heads=5"),
        ({"hiden_size": 8}, r"no field 'hiden_size' \(did you mean 'hidden_size'\?\)"),
        ({"num_hidden_layers": 0}, "num_hidden_layers=0 must be a positive integer"),
        ({"hidden_size": "8"}, "hidden_size='8' must be a positive integer"),
        ({}, "non-empty mapping"),
        ("{hidden_size:8}", r"'hidden_size:8' has no value; write `name: value` with a space after the colon"),
        ("[1, 2]", "non-empty mapping"),
    ],
)
def test_bad_student_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        student_from_config(make_bert(layers=4, hidden=16, heads=4), changes)


def test_a_narrower_student_trains_with_hidden_losses_through_projections(tmp_path):
    teacher = make_bert(layers=4, hidden=16, heads=4, seed=1)
    torch.manual_seed(0)
    student = student_from_config(teacher, NARROW)
    batch = random_batch("sequence_classification", batch=8, pad_from=[10, 7, 5, 9, 10, 3, 8, 6])
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, hidden_weight=1.0, learning_rate=1e-2,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=ListDataset(rows_from_batch(batch)))
    assert [tuple(p.weight.shape) for p in trainer.projections] == [(16, 8), (16, 8)]  # one per uniform pair
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    projections = [p.detach().clone() for p in trainer.projections.parameters()]
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(e["hidden_loss"] > 0 and torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    layer0 = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(dict(student.named_parameters())[layer0], before[layer0])
    assert any(not torch.equal(a, b) for a, b in zip(trainer.projections.parameters(), projections))
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())


# ---------------------------------------------------------------- the recipe fields
def test_recipe_student_fields_are_checked_when_parsed(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# hf-kd distill --config r.yaml\nteacher_model_name_or_path: t\ndataset_name: d\n"
                      "student_layers: 2\n")
    model = parse_distill_args(["--config", str(recipe)])[0]
    assert parse_student_layers(model.student_layers) == 2
    # A student_config on the command line replaces the recipe's student_layers; both on one line are refused.
    model = parse_distill_args(["--config", str(recipe), "--student_config", "{hidden_size: 8}"])[0]
    assert model.student_layers is None and parse_student_config(model.student_config) == {"hidden_size": 8}
    with pytest.raises(SystemExit, match="not both"):
        parse_distill_args(["--config", str(recipe), "--student_config", "{hidden_size: 8}", "--student_layers", "2"])
    with pytest.raises(SystemExit, match="neither a number of layers"):
        parse_distill_args(["--config", str(recipe), "--student_layers", "two"])
    # The command line can swap the recipe's student_layers for a student_config.
    model = parse_distill_args(["--config", str(recipe), "--student_layers", "null", "--student_config", "{num_hidden_layers: 1}"])[0]
    assert model.student_layers is None and parse_student_config(model.student_config) == {"num_hidden_layers": 1}
    recipe.write_text("# hf-kd distill --config r.yaml\nteacher_model_name_or_path: t\ndataset_name: d\n"
                      "student_config: {hidden_size: 8, num_attention_heads: 2}\n")
    model = parse_distill_args(["--config", str(recipe)])[0]
    assert parse_student_config(model.student_config) == {"hidden_size": 8, "num_attention_heads": 2}
    with pytest.raises(SystemExit, match="non-empty mapping"):
        parse_distill_args(["--config", str(recipe), "--student_config", "[8]"])


@pytest.mark.parametrize(
    "field, value, layers, width",
    [("student_layers", 2, 2, 16), ("student_config", {"hidden_size": 8, "num_attention_heads": 2}, 6, 8)],
)
def test_distill_makes_the_student_from_the_recipe(tmp_path, teacher_dir, field, value, layers, width):
    folder, teacher = teacher_dir
    data = tmp_path / "data"
    data.mkdir()
    write_tiny_csv(data / "train.csv", n=16, seed=0)
    write_tiny_csv(data / "test.csv", n=8, seed=1)
    recipe = {
        "teacher_model_name_or_path": str(folder), field: value, "dataset_name": str(data), "max_length": 16,
        "output_dir": str(tmp_path / "out"), "max_steps": 1, "per_device_train_batch_size": 8, "report_to": "none",
        "save_strategy": "no", "hidden_weight": 1.0, "use_cpu": True,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text("# hf-kd distill --config recipe.yaml\n" + yaml.safe_dump(recipe))
    assert main(["distill", "--config", str(path)]) == 0
    saved = BertForSequenceClassification.from_pretrained(tmp_path / "out")
    assert (saved.config.num_hidden_layers, saved.config.hidden_size) == (layers, width)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    if field == "student_layers":
        assert results["student_init"] == "teacher layers [3, 6]"
    else:
        assert results["student_init"].startswith("fresh weights")
