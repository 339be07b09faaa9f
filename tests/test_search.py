"""hf_kd.search and DistillationTrainer under Trainer.hyperparameter_search (issue 18): two trials on tiny models,
each a fresh student with its own settings and fresh projections, the same as a plain run with those settings;
`hf-kd search` writes the trials' table and the best settings."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import ListDataset, build_tokenizer, make_bert, random_batch, rows_from_batch, write_tiny_csv
from transformers import TrainerCallback

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.search import distillation_hp_space

optuna = pytest.importorskip("optuna")


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=2, per_device_train_batch_size=4,
                learning_rate=1e-2, save_strategy="no", logging_steps=1, hidden_weight=1.0, seed=3)
    return DistillationConfig(**{**base, **kw})


def _student(trial=None):
    return make_bert(layers=2, hidden=8, heads=2, seed=2)


class Record(TrainerCallback):
    """What each training run started with and ended with."""

    def __init__(self):
        self.runs = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.runs.append({"params": state.trial_params, "temperature": args.temperature, "alpha": args.alpha,
                          "hidden_weight": args.hidden_weight, "start": {k: v.clone() for k, v in model.state_dict().items()},
                          "model": model})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.runs[-1]["end"] = {k: v.clone() for k, v in model.state_dict().items()}


def test_two_trials_each_train_a_fresh_student_with_their_own_settings(tmp_path):
    teacher = make_bert(layers=4, hidden=16, heads=4, seed=1)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    data = ListDataset(rows_from_batch(random_batch("sequence_classification", batch=12, length=8)))
    record = Record()
    trainer = DistillationTrainer(model_init=_student, teacher_model=teacher, args=_args(tmp_path / "search"),
                                  train_dataset=data, eval_dataset=data, callbacks=[record])
    projections_at_start = []
    original = trainer._build_loss

    def build_loss(student):
        original(student)
        projections_at_start.append({k: v.clone() for k, v in trainer.projections.state_dict().items()})

    trainer._build_loss = build_loss
    best = trainer.hyperparameter_search(n_trials=2, direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0))

    assert set(best.hyperparameters) == {"temperature", "alpha", "hidden_weight"}  # the terms in use, not Trainer's lr
    assert len(record.runs) == 2
    for run in record.runs:
        assert run["params"]["temperature"] == run["temperature"] and 1.0 <= run["temperature"] <= 8.0
        assert run["params"]["alpha"] == run["alpha"] and run["params"]["hidden_weight"] == run["hidden_weight"]
        start = _student().state_dict()
        assert all(torch.equal(run["start"][k], start[k]) for k in start)  # a fresh student per trial
        assert any(not torch.equal(run["end"][k], run["start"][k]) for k in start)  # and it was trained
    assert record.runs[0]["model"] is not record.runs[1]["model"]
    assert record.runs[0]["temperature"] != record.runs[1]["temperature"]
    # The projections start afresh in each trial (seeded), not from the previous trial's trained values.
    assert len(projections_at_start) == 2  # one per trial
    assert all(torch.equal(projections_at_start[0][k], projections_at_start[1][k]) for k in projections_at_start[0])
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())  # the teacher never trains

    # A trial is the same run as a plain train() with the trial's settings (model_init: the same seeding order).
    second = record.runs[1]
    plain_args = _args(tmp_path / "plain", temperature=second["temperature"], alpha=second["alpha"],
                       hidden_weight=second["hidden_weight"])
    plain = DistillationTrainer(model_init=_student, teacher_model=teacher, args=plain_args, train_dataset=data)
    plain.train()
    for k, v in plain.model.state_dict().items():
        assert torch.allclose(v, second["end"][k], atol=1e-6), k


def test_the_space_searches_only_the_terms_the_config_uses(tmp_path):
    space = distillation_hp_space(_args(tmp_path, hidden_weight=0.0, attention_weight=2.0))
    settings = space(optuna.trial.FixedTrial({"temperature": 2.0, "alpha": 0.3, "attention_weight": 1.5}))
    assert settings == {"temperature": 2.0, "alpha": 0.3, "attention_weight": 1.5}


def test_model_and_model_init_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        DistillationTrainer(model=_student(), model_init=_student, teacher_model=make_bert(), args=_args(tmp_path))


@pytest.mark.slow
def _search_world(tmp_path):
    tok = build_tokenizer()
    make_bert(layers=4, hidden=16, heads=4, vocab=len(tok), seed=1).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    data = tmp_path / "data"
    data.mkdir()
    for split, seed in (("train", 0), ("validation", 1), ("test", 2)):
        write_tiny_csv(data / f"{split}.csv", n=24, seed=seed)
    recipe = {"teacher_model_name_or_path": str(tmp_path / "teacher"), "student_layers": [1, 3],
              "dataset_name": str(data), "eval_split": "test", "max_length": 16, "output_dir": str(tmp_path / "out"),
              "max_steps": 2, "per_device_train_batch_size": 8, "save_strategy": "no", "report_to": "none",
              "hidden_weight": 1.0, "use_cpu": True}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_hf_kd_search_writes_the_trials_table_and_the_best_settings(tmp_path):
    from hf_kd.cli import main

    path = _search_world(tmp_path)
    assert main(["search", "--trials", "2", "--config", str(path)]) == 0
    result = json.loads((tmp_path / "out" / "search.json").read_text())
    assert result["split"] == "validation" and result["metric"] == "accuracy" and len(result["trials"]) == 2
    best = max(result["trials"], key=lambda r: r["accuracy"])
    assert result["best"]["accuracy"] == best["accuracy"]
    report = (tmp_path / "out" / "search.md").read_text()
    assert "| trial | temperature | alpha | hidden_weight | accuracy | seconds |" in report
    assert report.count("**(best)**") == 1 and f"--temperature {result['best']['temperature']:.4g}" in report


def test_hf_kd_search_refuses_a_teacher_with_its_own_tokenizer_before_any_trial(tmp_path):
    """Its trials would tokenize for both models with the teacher folder's tokenizer: refused with a message, no
    output written."""
    from hf_kd.cli import main

    path = _search_world(tmp_path)
    with pytest.raises(SystemExit, match="does not search across tokenizers.*unset teacher_tokenizer"):
        main(["search", "--trials", "2", "--config", str(path), "--hidden_weight", "0",
              "--teacher_tokenizer", str(tmp_path / "teacher")])
    assert not (tmp_path / "out").exists()
