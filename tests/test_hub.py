"""Publishing: the saved student, its provenance and model card, and pushes that publish the student alone."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import WORDS, build_tokenizer, make_bert
from datasets import Dataset
from huggingface_hub import HfApi, ModelCard, ModelCardData, constants, metadata_load
from huggingface_hub.repocard import REGEX_YAML_BLOCK
from huggingface_hub.repocard_data import model_index_to_eval_results
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, pipeline

import hf_kd
from hf_kd import CardInfo, DistillationConfig, DistillationTrainer, PushError, push_student, weights_sha256
from hf_kd.apps.recipes import recipe_of
from hf_kd.cli import DataArguments, ModelArguments, RunArguments, main
from hf_kd.hub import (
    CARD_NAME,
    PROVENANCE_NAME,
    card_metrics,
    command_line,
    publishable_files,
    read_provenance,
    render_card,
)
from hf_kd.distill.projections import PROJECTIONS_NAME

ROOT = Path(__file__).resolve().parent.parent
STUDENT_FILES = {
    "README.md", "config.json", PROVENANCE_NAME, "model.safetensors", "tokenizer.json", "tokenizer_config.json"
}
COMMAND = "hf-kd distill --config recipes/tiny.yaml --max_steps 2"
SECRET = "hf_secretTOKEN123"


def sentiment_data(tokenizer, n=24):
    """Two thirds positive rows: a teacher that always says "positive" scores exactly 2/3."""
    texts = [" ".join([WORDS[i % 12], "the", "film", WORDS[12 + i % 5]]) for i in range(n)]
    labels = [int(i % 3 != 0) for i in range(n)]
    return Dataset.from_dict({"text": texts, "label": labels}).map(lambda b: tokenizer(b["text"]), batched=True)


def accuracy(prediction):
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def make_trainer(out, tokenizer, data, **config):
    teacher = make_bert(layers=4, hidden=16, heads=4, seed=1, id2label={0: "negative", 1: "positive"})
    with torch.no_grad():
        teacher.classifier.bias.copy_(torch.tensor([-50.0, 50.0]))  # always "positive"
    teacher.config._commit_hash = "0123456789abcdef0123456789abcdef01234567"  # as from_pretrained sets it from the Hub
    student = make_bert(layers=2, hidden=8, heads=2, seed=2, id2label={0: "negative", 1: "positive"})
    base = dict(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=8, per_device_eval_batch_size=8, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, hidden_weight=1.0, temperature=3.0,
        hub_token=SECRET,
    )
    base.update(config)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=DistillationConfig(**base), train_dataset=data, eval_dataset=data,
        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
    )
    trainer.card_info = CardInfo(
        command=COMMAND, teacher="sentence-transformers/all-MiniLM-L6-v2", student_init="random, 2 layers of width 8",
        dataset="cornell-movie-review-data/rotten_tomatoes", train_split="train", eval_split="test",
        license="apache-2.0",
    )
    return trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One distillation run, saved as a user does: train, evaluate the student, save_model()."""
    out = tmp_path_factory.mktemp("run") / "student"
    tokenizer = build_tokenizer()
    data = sentiment_data(tokenizer)
    trainer = make_trainer(out, tokenizer, data, save_strategy="steps", save_steps=2)
    trainer.train()
    student_metrics = trainer.evaluate()
    trainer.save_model()  # evaluates the teacher for the card: not done yet
    return SimpleNamespace(trainer=trainer, folder=out, student_metrics=student_metrics, data=data)


def snapshot(folder) -> dict:
    """Every file under folder with its bytes' hash and modification time."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


def front_matter(folder) -> dict:
    text = (Path(folder) / CARD_NAME).read_text()
    match = REGEX_YAML_BLOCK.search(text)
    assert match, "README.md has no YAML front matter"
    return yaml.safe_load(match.group(2))


class RecordingApi:
    """Stands in for the Hub: records create_repo and create_commit calls, as HfApi methods."""

    def __init__(self, monkeypatch):
        self.repos, self.commits = [], []
        recorder = self

        def create_repo(api, repo_id, **kwargs):
            recorder.repos.append(repo_id)
            return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

        def create_commit(api, repo_id, operations, **kwargs):
            recorder.commits.append((repo_id, {op.path_in_repo: op for op in operations}, kwargs))
            info = SimpleNamespace(commit_url=f"https://hub.example/{repo_id}/commit/1")
            if kwargs.get("run_as_future"):
                future = concurrent.futures.Future()
                future.set_result(info)
                return future
            return info

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        # Trainer before transformers 5.10 calls huggingface_hub's module-level create_repo, bound to an HfApi
        # instance when imported: replace that name too
        import transformers.trainer

        if hasattr(transformers.trainer, "create_repo"):
            monkeypatch.setattr(transformers.trainer, "create_repo", lambda repo_id, **kw: create_repo(None, repo_id, **kw))


# ---------------------------------------------------------------- pure helpers
def test_weights_sha256_depends_on_every_weight_and_nothing_else():
    model = make_bert(seed=1)
    state = model.state_dict()
    digest = weights_sha256(model)
    assert digest == weights_sha256(dict(reversed(list(state.items()))))  # key order is irrelevant
    assert digest == weights_sha256(make_bert(seed=1))
    changed = {k: v.clone() for k, v in state.items()}
    name = sorted(changed)[-1]
    changed[name].view(-1)[0] += 1e-3
    assert weights_sha256(changed) != digest
    assert weights_sha256({k: v.to(torch.bfloat16) for k, v in state.items()}) != digest  # dtype counts
    assert weights_sha256(make_bert(seed=2)) != digest


def test_command_line_names_hf_kd_and_hides_tokens():
    argv = ["/venv/bin/hf-kd", "distill", "--config", "recipes/tiny.yaml", "--hub_token", SECRET, f"--token={SECRET}"]
    line = command_line(argv)
    assert line == "hf-kd distill --config recipes/tiny.yaml --hub_token '<hidden>' '--token=<hidden>'"
    assert command_line(["/x/hf_kd/cli.py", "push", "--model", "a b"]) == "hf-kd push --model 'a b'"
    assert command_line(["train.py", "--lr", "1"]) == "python train.py --lr 1"


def test_publishable_files_leave_out_pickles_projections_checkpoints_and_baselines(tmp_path):
    for name in [*STUDENT_FILES, "vocab.txt", "training_args.bin", PROJECTIONS_NAME, "optimizer.pt", "rng_state.pth",
                 "trainer_state.json", "pytorch_model.bin", ".gitattributes", "_tmp"]:
        (tmp_path / name).write_text("x")
    for sub in ("checkpoint-2", "baseline", "runs"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "model.safetensors").write_text("x")
    assert publishable_files(tmp_path) == sorted(STUDENT_FILES | {"vocab.txt"})


def test_card_metrics_keep_the_models_numbers_only():
    metrics = {"eval_loss": 0.5, "eval_accuracy": 0.75, "eval_runtime": 1.2, "eval_samples_per_second": 9.0,
               "eval_steps_per_second": 1.0, "epoch": 1.0, "eval_mem_cpu_alloc_delta": 10}
    assert card_metrics(metrics) == {"loss": 0.5, "accuracy": 0.75}
    assert card_metrics({"teacher_eval_f1": 0.25}, "teacher_eval") == {"f1": 0.25}


def test_card_info_from_the_command_line_records_the_command_and_the_recipe():
    recipe = ROOT / "recipes/tiny.yaml"
    argv = ["/venv/bin/hf-kd", "distill", "--config", str(recipe), "--hub_token", SECRET]
    model_args = ModelArguments(
        teacher_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2", student_layers="[3]"
    )
    data_args = DataArguments(dataset_name="cornell-movie-review-data/rotten_tomatoes", eval_split="test")
    info = CardInfo.from_cli_args(model_args, data_args, RunArguments(), student_init="teacher layers [3]", argv=argv)
    assert info.command == f"hf-kd distill --config {recipe} --hub_token '<hidden>'"
    assert info.base_model == info.teacher == model_args.teacher_model_name_or_path  # student cut from the teacher
    assert info.dataset == data_args.dataset_name and info.eval_split == "test"
    assert info.extra["recipe"]["text"] == recipe.read_text()
    assert info.extra["model_args"]["student_layers"] == "[3]"
    # A packaged recipe named without a path (`--config tiny`) is recorded once the app resolves it.
    named = CardInfo.from_cli_args(model_args, data_args, argv=["hf-kd", "distill", "--config", "tiny"],
                                   recipe=recipe_of(["--config", "tiny"]))
    assert named.extra["recipe"]["text"] == recipe.read_text()


def test_a_card_without_evaluation_still_parses():
    card = render_card({"task": "masked_lm", "hf_kd_version": "0", "teacher": {"name_or_path": "/local/teacher"},
                        "student": {"base_model": "/local/teacher"}})
    data = ModelCard(str(card)).data
    assert data.library_name == "transformers" and data.pipeline_tag == "fill-mask"
    assert data.base_model is None and data.eval_results is None  # a local path is no Hub id
    assert "Not evaluated" in card.text


CARD_RECORD = {
    "hf_kd_version": "1.2.3", "transformers_version": "4.0", "torch_version": "2.0", "task": "sequence_classification",
    "command": COMMAND, "tags": ["sentiment"],
    "teacher": {"name_or_path": "org/teacher", "revision": "abc123", "weights_sha256": "ab" * 32},
    "student": {"init": "teacher layers [1, 3]", "adapter": False, "base_model": "org/teacher"},
    "distillation": {"kd_loss": "kl", "temperature": 2.0, "alpha": 0.5, "hidden_pairs": [[1, 2]]},
    "data": {"dataset": "org/data", "train_split": "train", "eval_split": "test", "train_rows": 1000},
    "training": {"global_step": 20, "epoch": 1.5, "learning_rate": 5e-5, "seed": 42},
    "extra": {"recipe": {"path": "r.yaml", "text": "a: 1"}},
    "evaluation": {"split": "test", "student": {"loss": 0.4, "accuracy": 0.8}, "teacher": {"loss": 0.3, "accuracy": 0.9}},
    "measurements": {"device": "cpu", "threads": 2, "batch_sizes": [1, 8],
                     "student": {"parameters": 1000, "size_mb": 4.0, "latency_ms": {"1": 1.0, "8": 2.0}},
                     "teacher": {"parameters": 9000, "size_mb": 36.0, "latency_ms": {"1": 3.0, "8": 8.0},
                                 "size_source": "its weights in their dtype"}},
}
CARD_SECTIONS = ["# ", "## Evaluation", "## Size and speed", "## How it was made", "## Reproduce"]


def card_variant(**changes) -> dict:
    record = json.loads(json.dumps(CARD_RECORD))
    record.update(changes)
    return record


def test_card_of_one_run_gives_the_binomial_error_of_its_accuracy():
    record = card_variant(evaluation={**CARD_RECORD["evaluation"], "rows": 1000})
    text = render_card(record).text
    se = math.sqrt(0.8 * 0.2 / 1000)  # accuracy 0.8 on 1,000 rows
    assert "One training run, one seed" in text and f"standard error of about {se:.3f}" in text
    assert "standard error" not in render_card(card_variant(evaluation={"split": "test", "student": {"loss": 2.0}})).text


def test_card_of_a_run_over_several_seeds_gives_the_interval_instead():
    seeds = {"seeds": [100, 101, 102], "metric": "accuracy", "mean": 0.012, "low": 0.004, "high": 0.02}
    text = render_card(card_variant(evaluation={**CARD_RECORD["evaluation"], "rows": 1000, "seeds": seeds})).text
    assert "Over 3 seeds (100, 101, 102)" in text and "[+0.0040, +0.0200]" in text and "+0.0120" in text
    assert "One training run" not in text


@pytest.mark.parametrize("case", ["single", "several_teachers", "cached_teacher", "adapter", "no_evaluation",
                                  "no_latency"])
def test_card_sections_for_every_kind_of_record(case):
    """The card's body has its sections in order whatever the record holds (a pin for the section renderers)."""
    several = [{"name_or_path": "org/t1", "weights_sha256": "cd" * 32, "weight": 0.75},
               {"name_or_path": "/local/t2", "weights_sha256": "ef" * 32, "weight": 0.25}]
    record = {
        "single": card_variant(),
        "several_teachers": card_variant(teachers=several),
        "cached_teacher": card_variant(teacher={**CARD_RECORD["teacher"], "revision": None,
                                                "note": "its outputs were read from the cache c"}),
        "adapter": card_variant(student={**CARD_RECORD["student"], "adapter": True}),
        "no_evaluation": card_variant(evaluation=None),
        "no_latency": card_variant(measurements={"student": {"parameters": 1000, "size_mb": 4.0}, "teacher": {}}),
    }[case]
    card = render_card(record, model_name="tiny")
    text = card.text
    headings = [line for line in text.splitlines() if line.startswith("#") and not line.startswith("###")]
    assert [h for h in headings if h.startswith(tuple(CARD_SECTIONS))] == ["# tiny", *CARD_SECTIONS[1:]]
    assert text.startswith("\n# tiny\n\nA text-classification model distilled from the teacher")
    assert text.endswith("must equal the hash above.\n")
    assert f"```bash\n{COMMAND}\n```" in text and "holds the full configuration and the recipe." in text
    assert "| hidden_pairs | `[[1, 2]]` |" in text and "| epoch | 1.5 |" in text and "| training rows | 1,000 |" in text
    data = ModelCard(str(card)).data
    assert data.pipeline_tag == "text-classification" and data.base_model == "org/teacher"
    assert data.library_name == ("peft" if case == "adapter" else "transformers")
    assert data.to_dict()["hf_kd"]["teacher"]["weights_sha256"] == "ab" * 32
    if case == "several_teachers":
        assert "distilled from the teachers [org/t1](https://huggingface.co/org/t1) (weight 0.75), `/local/t2`" in text
        assert "| teacher 2 | `/local/t2`, weight 0.25, sha256 `" + "ef" * 32 + "` |" in text
        assert [t["weight"] for t in data.to_dict()["hf_kd"]["teachers"]] == [0.75, 0.25]
    if case == "cached_teacher":
        assert "| teacher training | its outputs were read from the cache c |" in text
        assert "| teacher revision | n/a (not from the Hub) |" in text
    if case == "no_evaluation":
        assert "Not evaluated" in text and data.eval_results is None and data.to_dict()["hf_kd"]["evaluation"] is None
    else:
        assert "| accuracy | 0.8000 | 0.9000 | 88.9% |" in text and "| loss | 0.4000 | 0.3000 | - |" in text
        assert [(r.metric_type, r.metric_value, r.dataset_split) for r in data.eval_results] == [
            ("loss", 0.4, "test"), ("accuracy", 0.8, "test")]
    if case == "no_latency":
        assert "| student | 1,000 | 4 |" in text and "Latency was not measured." in text
    else:
        assert "| student | 1,000 | 4 | 1.00 | 2.00 |" in text and "Speed-up at batch 8: 4.00x." in text


# ---------------------------------------------------------------- the saved folder
def test_saved_folder_loads_with_from_pretrained_and_the_pipeline(run):
    model = AutoModelForSequenceClassification.from_pretrained(str(run.folder))
    student = run.trainer.model
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, student.state_dict()[name].cpu()), name
    classify = pipeline("text-classification", model=str(run.folder), device="cpu")
    out = classify(["good film", "awful plot"])
    assert [o["label"] for o in out] == [model.config.id2label[i] for i in model(**classify.tokenizer(
        ["good film", "awful plot"], return_tensors="pt", padding=True)).logits.argmax(-1).tolist()]


def test_saved_folder_holds_the_student_alone(run):
    assert set(publishable_files(run.folder)) == STUDENT_FILES
    weights = load_file(str(run.folder / "model.safetensors"))
    assert set(weights) == set(run.trainer.model.state_dict())  # no teacher, no projection heads
    assert (run.folder / "training_args.bin").is_file()  # kept for Trainer users, never published


def test_provenance_records_version_config_command_and_teacher_hash(run, tmp_path):
    record = read_provenance(run.folder)
    args = run.trainer.args
    assert record["hf_kd_version"] == hf_kd.__version__
    assert record["config"]["temperature"] == args.temperature == 3.0
    assert record["config"]["hidden_weight"] == 1.0 and record["config"]["layer_map"] == "uniform"
    assert record["distillation"]["hidden_pairs"] == [[1, 2], [2, 4]] and record["distillation"]["projections"] == 2
    assert record["command"] == COMMAND
    teacher = run.trainer.teacher
    teacher.save_pretrained(tmp_path / "teacher")
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "teacher"))
    assert record["teacher"]["weights_sha256"] == weights_sha256(reloaded) == weights_sha256(teacher)
    assert record["teacher"]["weights_sha256"] != weights_sha256(run.trainer.model)
    assert record["teacher"]["name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    # Checkpoints say what made them too, and no file holds the Hub token.
    checkpoint = read_provenance(run.folder / "checkpoint-2")
    assert checkpoint["teacher"]["weights_sha256"] == record["teacher"]["weights_sha256"]
    for name in (PROVENANCE_NAME, CARD_NAME):
        assert SECRET not in (run.folder / name).read_text()


def test_card_front_matter_parses_and_validates(run):
    meta = front_matter(run.folder)
    assert meta == metadata_load(run.folder / CARD_NAME)
    card = ModelCard.load(run.folder / CARD_NAME)  # validates model-index into EvalResults
    data = card.data
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-classification"
    assert data.datasets == ["cornell-movie-review-data/rotten_tomatoes"] and data.license == "apache-2.0"
    assert "knowledge-distillation" in data.tags
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "student" and {r.metric_type for r in results} == {"accuracy", "loss"}
    for r in results:
        assert (r.task_type, r.dataset_type, r.dataset_split) == (
            "text-classification", "cornell-movie-review-data/rotten_tomatoes", "test")
    assert ModelCardData(**meta).to_dict() == meta  # a round trip through the card data keeps everything
    record = read_provenance(run.folder)
    assert meta["hf_kd"]["teacher"] == {
        "name_or_path": "sentence-transformers/all-MiniLM-L6-v2",
        "revision": "0123456789abcdef0123456789abcdef01234567",
        "weights_sha256": record["teacher"]["weights_sha256"],
    }
    # The body: command, settings, both models' sizes.
    text = card.text
    assert f"```bash\n{COMMAND}\n```" in text
    assert record["teacher"]["weights_sha256"] in text and "latency batch 1 (ms)" in text
    for needle in ("| temperature | 3.0 |", "| hidden_pairs | `[[1, 2], [2, 4]]` |", "random, 2 layers of width 8",
                   f"| student | {record['student']['parameters']:,} |",
                   f"| teacher | {record['teacher']['parameters']:,} |"):
        assert needle in text, needle
    m = record["measurements"]
    assert m["batch_sizes"] == [1, 8]
    for role in ("student", "teacher"):
        assert m[role]["size_mb"] > 0 and all(v > 0 for v in m[role]["latency_ms"].values())
    assert m["student"]["parameters"] < m["teacher"]["parameters"]


def test_card_evaluation_numbers_are_the_trainers(run):
    record = read_provenance(run.folder)
    meta = front_matter(run.folder)
    _, results = model_index_to_eval_results(meta["model-index"])
    in_index = {r.metric_type: r.metric_value for r in results}
    student = run.student_metrics
    assert in_index == {"accuracy": student["eval_accuracy"], "loss": student["eval_loss"]}
    assert meta["hf_kd"]["evaluation"]["student"] == in_index == record["evaluation"]["student"]
    # The teacher was evaluated by save_model, through the same loop, and logged like the student.
    teacher_logs = [e for e in run.trainer.state.log_history if "teacher_eval_accuracy" in e]
    assert len(teacher_logs) == 1
    teacher = meta["hf_kd"]["evaluation"]["teacher"]
    logged = teacher_logs[0]
    assert teacher == {"accuracy": logged["teacher_eval_accuracy"], "loss": logged["teacher_eval_loss"]}
    # The teacher's answers, not the student's: always "positive", confidently wrong on a third of the rows.
    assert teacher["accuracy"] == pytest.approx(2 / 3) and teacher["loss"] == pytest.approx(100 / 3, rel=0.05)
    assert student["eval_loss"] < 1
    assert len([e for e in run.trainer.state.log_history if "eval_accuracy" in e]) == 1  # not evaluated twice
    assert f"| accuracy | {student['eval_accuracy']:.4f} | {teacher['accuracy']:.4f} |" in ModelCard.load(
        run.folder / CARD_NAME).text


# ---------------------------------------------------------------- pushing
def test_push_student_uploads_the_student_alone_and_writes_nothing(run, monkeypatch):
    hub = RecordingApi(monkeypatch)
    before = snapshot(run.folder)
    push_student(run.folder, "me/student")
    assert hub.repos == ["me/student"]
    (repo, operations, _), = hub.commits
    assert repo == "me/student" and set(operations) == STUDENT_FILES
    assert snapshot(run.folder) == before


def test_a_folder_without_a_card_is_published_with_one_rendered_from_its_provenance(run, tmp_path, monkeypatch):
    hub = RecordingApi(monkeypatch)
    folder = tmp_path / "no-card"
    folder.mkdir()
    for name in STUDENT_FILES - {CARD_NAME}:
        (folder / name).write_bytes((run.folder / name).read_bytes())
    push_student(folder, "me/kd-other")
    (_, operations, _), = hub.commits
    assert set(operations) == STUDENT_FILES and not (folder / CARD_NAME).exists()
    card = ModelCard(operations[CARD_NAME].path_or_fileobj.decode())
    assert card.data.model_name == "kd-other" and "# kd-other" in card.text  # named after the repo
    assert card.data.eval_results[0].dataset_split == "test" and "knowledge-distillation" in card.data.tags


def test_trainer_push_to_hub_publishes_the_student_with_the_hf_kd_card(run, monkeypatch):
    hub = RecordingApi(monkeypatch)
    monkeypatch.setattr(run.trainer.args, "hub_model_id", "me/kd-student")
    run.trainer.push_to_hub(commit_message="End of training")
    (repo, operations, kwargs), = hub.commits
    assert repo == "me/kd-student" and set(operations) == STUDENT_FILES
    assert kwargs["commit_message"] == "End of training" and kwargs["token"] == SECRET
    card = ModelCard(Path(operations[CARD_NAME].path_or_fileobj).read_text())
    assert card.data.eval_results[0].metric_value is not None and "knowledge-distillation" in card.data.tags


def test_trainer_push_with_the_hub_unreachable_fails_clearly_and_loses_nothing(run, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(run.trainer.args, "hub_model_id", "me/kd-student")
    retry = r"(?s)offline.*Retry later with: hf-kd push --model .* --repo_id me/kd-student"
    with pytest.raises(PushError, match=retry):
        run.trainer.push_to_hub()
    assert set(publishable_files(run.folder)) == STUDENT_FILES
    assert AutoModelForSequenceClassification.from_pretrained(str(run.folder)).config.num_hidden_layers == 2
    assert ModelCard.load(run.folder / CARD_NAME).data.eval_results


def test_cli_push_offline_fails_clearly_and_leaves_the_folder_untouched(run, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = snapshot(run.folder)
    with pytest.raises(SystemExit, match=r"(?s)hf-kd push: could not push .*HF_HUB_OFFLINE.*is unchanged"):
        main(["push", "--model", str(run.folder), "--repo_id", "me/student"])
    assert snapshot(run.folder) == before
    assert main(["push", "--model", str(run.folder), "--repo_id", "me/student", "--dry_run"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in STUDENT_FILES) and "training_args.bin" not in listed
    assert snapshot(run.folder) == before


def test_cli_push_to_a_hub_that_does_not_answer_fails_clearly(run):
    """Not offline mode: the Hub's address refuses connections, as without network."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{closed.getsockname()[1]}",
           "HF_TOKEN": "hf_dummy"}
    before = snapshot(run.folder)
    try:
        command = [sys.executable, "-m", "hf_kd.cli", "push", "--model", str(run.folder), "--repo_id", "me/student"]
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        closed.close()
    assert done.returncode == 1
    assert "cannot be reached" in done.stderr and "Retry later with: hf-kd push" in done.stderr
    assert "Traceback" not in done.stderr
    assert snapshot(run.folder) == before


def test_push_refuses_folders_that_are_not_saved_students(tmp_path, run):
    plain = tmp_path / "plain"
    run.trainer.model.save_pretrained(plain)
    with pytest.raises(PushError, match="no hf_kd_provenance.json"):
        push_student(plain, "me/student")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_text("x")
    with pytest.raises(PushError, match="no safetensors weights.*pytorch_model.bin, a pickle"):
        push_student(pickled, "me/student")
    with pytest.raises(PushError, match="not a Hub repo id"):
        push_student(run.folder, "me/student/extra")


def test_push_to_hub_flag_without_the_hub_is_refused_before_training(tmp_path, tokenizer):
    data = sentiment_data(tokenizer, n=8)
    with pytest.raises(PushError, match=r"(?s)could not be created.*Training has not started.*hf-kd push"):
        make_trainer(tmp_path / "out", tokenizer, data, push_to_hub=True, hub_model_id="me/student")


def test_hub_strategies_that_upload_checkpoints_are_refused(tmp_path, tokenizer, monkeypatch):
    RecordingApi(monkeypatch)
    with pytest.raises(PushError, match="hub_strategy='checkpoint'.*student alone"):
        make_trainer(tmp_path / "out", tokenizer, sentiment_data(tokenizer, n=8), push_to_hub=True,
                     hub_model_id="me/student", hub_strategy="checkpoint")


def test_pushes_during_training_send_the_student_alone(tmp_path, tokenizer, monkeypatch):
    hub = RecordingApi(monkeypatch)
    trainer = make_trainer(tmp_path / "out", tokenizer, sentiment_data(tokenizer, n=16), push_to_hub=True,
                           hub_model_id="me/student", save_strategy="steps", save_steps=1, max_steps=2)
    trainer.train()
    trainer.save_model()  # Trainer's mechanism: a user save pushes
    assert hub.repos == ["me/student"]
    assert len(hub.commits) == 3
    for repo, operations, _ in hub.commits:
        assert repo == "me/student" and set(operations) == STUDENT_FILES
    assert [kw["commit_message"] for _, _, kw in hub.commits][:2] == [
        "Training in progress, step 1", "Training in progress, step 2"]
    final = ModelCard.load(tmp_path / "out" / CARD_NAME).data
    assert final.hf_kd["evaluation"]["teacher"]["accuracy"] == pytest.approx(10 / 16)  # 10 positive rows of 16
    assert json.loads((tmp_path / "out" / PROVENANCE_NAME).read_text())["training"]["global_step"] == 2


def test_a_peft_student_publishes_its_adapter_with_a_peft_card(tmp_path):
    from conftest import ListDataset, random_batch, rows_from_batch
    from peft import LoraConfig, get_peft_model

    teacher = make_bert(layers=4, hidden=16, heads=4, seed=1)
    lora = LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    student = get_peft_model(make_bert(layers=2, hidden=16, heads=4, seed=2), lora)
    args = DistillationConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4,
                              report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    rows = rows_from_batch(random_batch("sequence_classification", batch=4))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ListDataset(rows))
    trainer.train()
    trainer.save_model()
    assert publishable_files(tmp_path / "out") == [
        CARD_NAME, "adapter_config.json", "adapter_model.safetensors", PROVENANCE_NAME]
    card = ModelCard.load(tmp_path / "out" / CARD_NAME)
    assert card.data.library_name == "peft" and "Python API" in card.text  # no CLI command: the API note


def test_repo_creation_works_with_a_trainer_whose_init_hf_repo_takes_no_private(tmp_path, tokenizer, monkeypatch):
    """Trainer.init_hf_repo of transformers 5.17 takes (token) alone; the override passes `private` only when given."""
    import transformers

    hub = RecordingApi(monkeypatch)
    original = transformers.Trainer.init_hf_repo

    def older(self, token=None):  # the signature before `private` was added
        return original(self, token=token)

    monkeypatch.setattr(transformers.Trainer, "init_hf_repo", older)
    make_trainer(tmp_path / "out", tokenizer, sentiment_data(tokenizer, n=8), push_to_hub=True, hub_model_id="me/student")
    assert hub.repos == ["me/student"]
