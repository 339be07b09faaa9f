"""hf_kd.distill.checkpoint, projections and record: what a checkpoint records, and the resume check."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerState

from conftest import make_bert
from hf_kd import CardInfo, DistillationConfig, InputError, NonFiniteLossError
from hf_kd.distill import atomic
from hf_kd.distill.checkpoint import (
    KD_CONFIG_NAME,
    Checkpoints,
    check_finite_weights,
    check_resume,
    missing_files,
    newest_complete,
    rotate,
    write_signature,
)
from hf_kd.distill.plan import build_plan
from hf_kd.distill.projections import PROJECTIONS_NAME, build_projections, load_projections, save_projections
from hf_kd.distill.record import RunRecord
from hf_kd.distill.teacher_set import TeacherSet


def _record(tmp_path, student, teacher, **kw):
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)
    plan = build_plan(student, teacher, args, "sequence_classification")
    return RunRecord(args, "sequence_classification", plan, TeacherSet([teacher], [teacher], None), 0)


def test_the_signature_names_teacher_student_and_loss(tmp_path):
    student, teacher = make_bert(layers=2), make_bert(layers=4)
    signature = _record(tmp_path, student, teacher, hidden_weight=1.0).signature(student)
    assert signature["teacher"]["class"] == "BertForSequenceClassification"
    assert signature["student"]["num_hidden_layers"] == 2 and signature["loss"]["hidden_pairs"] == [[1, 2], [2, 4]]


def test_resume_accepts_its_own_signature_and_names_every_difference(tmp_path, caplog):
    student, teacher = make_bert(layers=2), make_bert(layers=4)
    write_signature(str(tmp_path), _record(tmp_path, student, teacher).signature(student))
    check_resume(str(tmp_path), json.loads(json.dumps(_record(tmp_path, student, teacher).signature(student))))
    other = _record(tmp_path, student, make_bert(layers=4, seed=5), temperature=3.0).signature(student)
    with pytest.raises(InputError) as err:
        check_resume(str(tmp_path), other)
    assert "teacher.weights_sha256" in str(err.value) and "loss.temperature: checkpoint 2.0, now 3.0" in str(err.value)
    (tmp_path / KD_CONFIG_NAME).unlink()
    with caplog.at_level(logging.WARNING, logger="hf_kd"):
        check_resume(str(tmp_path), other)
    assert f"has no {KD_CONFIG_NAME}" in caplog.text


def test_provenance_and_signature_read_one_record(tmp_path):
    student, teacher = make_bert(layers=2), make_bert(layers=4)
    record = _record(tmp_path, student, teacher, hidden_weight=1.0)
    assert record.signature(student)["teacher"]["weights_sha256"] == record.teacher(CardInfo())["weights_sha256"]
    distillation = record.distillation()
    assert {k: v for k, v in distillation.items() if k != "layer_map"} == {
        k: v for k, v in record.signature(student)["loss"].items() if k != "jsd_beta"}


def test_projections_are_seeded_and_round_trip(tmp_path):
    student = make_bert(hidden=8, heads=2)
    state = torch.random.get_rng_state()
    a, b = build_projections(student, 16, 2, seed=3), build_projections(student, 16, 2, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # the global random state is untouched
    assert len(a) == 2 and torch.equal(a[0].weight, b[0].weight)
    assert len(build_projections(student, 8, 2, seed=3)) == 0  # same widths: nothing to learn
    save_projections(a, str(tmp_path))
    c = build_projections(student, 16, 2, seed=4)
    load_projections(c, str(tmp_path), "cpu")
    assert torch.equal(c[1].weight, a[1].weight)
    (tmp_path / PROJECTIONS_NAME).unlink()
    with pytest.raises(ValueError, match=f"has no {PROJECTIONS_NAME}, which this run's hidden-state loss needs"):
        load_projections(c, str(tmp_path), "cpu")


def test_non_finite_weights_are_not_checkpointed():
    weight = torch.nn.Parameter(torch.tensor([1.0, float("nan")]))
    check_finite_weights([("ok", torch.nn.Parameter(torch.ones(2)))], 3)
    with pytest.raises(NonFiniteLossError, match="after step 3 \\(first: w\\)"):
        check_finite_weights([("w", weight)], 3)


# ---------------------------------------------------------------- complete checkpoints, partial saves (issue 20)
SIGNATURE = {"loss": {"temperature": 2.0}}
RESUME_FILES = ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                PROJECTIONS_NAME)


def _checkpoint(folder, lacking=(), signature=SIGNATURE):
    """A folder with the names of every file a resume reads (their contents are not read), but `lacking`."""
    folder.mkdir(parents=True)
    for name in RESUME_FILES:
        if name not in lacking:
            (folder / name).write_bytes(b"x")
    if KD_CONFIG_NAME not in lacking:
        write_signature(str(folder), signature)
    return folder


def _checkpoints(**args):
    fields = dict(should_save=True, process_index=0, save_only_model=False, save_total_limit=None)
    return Checkpoints(SimpleNamespace(**{**fields, **args}), projections=True, barrier=lambda: None)


def test_missing_files_names_each_file_a_resume_reads(tmp_path):
    assert missing_files(str(_checkpoint(tmp_path / "a")), projections=True) == []
    b = _checkpoint(tmp_path / "b", lacking=("optimizer.pt", "rng_state.pth", KD_CONFIG_NAME, PROJECTIONS_NAME))
    assert missing_files(str(b), projections=True) == ["optimizer.pt", "rng_state.pth", KD_CONFIG_NAME, PROJECTIONS_NAME]
    assert missing_files(str(b), projections=False, resume_state=False) == [KD_CONFIG_NAME]  # save_only_model
    c = _checkpoint(tmp_path / "c", lacking=("model.safetensors", "trainer_state.json"))
    assert missing_files(str(c), projections=True) == ["trainer_state.json", "the model weights (model.safetensors or "
                                                                            "another weights file)"]
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (c / "model.safetensors.index.json").write_text(json.dumps(index))
    (c / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert missing_files(str(c), projections=True) == [
        "trainer_state.json", "model-00002-of-00002.safetensors (named by model.safetensors.index.json)"]
    (c / "model.safetensors.index.json").write_text('{"weight_map": {"a": "mod')  # cut short
    (c / KD_CONFIG_NAME).write_text('{"loss": {"temp')
    assert missing_files(str(c), projections=True) == [
        "trainer_state.json", "model.safetensors.index.json (unreadable)", f"{KD_CONFIG_NAME} (unreadable)"]


def test_the_newest_complete_checkpoint_is_taken_and_each_newer_incomplete_one_named(tmp_path, caplog):
    """Issue 20: a kill during a save left checkpoint-N without its last files, and the resume took it."""
    for step in (2, 9):
        _checkpoint(tmp_path / f"checkpoint-{step}")
    _checkpoint(tmp_path / "checkpoint-10", lacking=("optimizer.pt", KD_CONFIG_NAME))
    (tmp_path / "checkpoint-11").mkdir()
    with caplog.at_level(logging.WARNING, logger="hf_kd"):
        assert newest_complete(str(tmp_path), projections=True) == str(tmp_path / "checkpoint-9")  # by step: 9 < 10
    assert f"{tmp_path / 'checkpoint-10'} is incomplete" in caplog.text and f"lacks optimizer.pt, {KD_CONFIG_NAME}" in caplog.text
    assert f"{tmp_path / 'checkpoint-11'} is incomplete" in caplog.text and "another set-up" not in caplog.text
    assert newest_complete(str(tmp_path / "nothing"), projections=True) is None


def test_auto_resumes_from_the_newest_complete_checkpoint_or_starts_afresh(tmp_path, caplog):
    checkpoints = _checkpoints()
    assert checkpoints.resume_point("auto", str(tmp_path / "new"), lambda: SIGNATURE) is None  # no output_dir yet
    _checkpoint(tmp_path / "checkpoint-1", lacking=("trainer_state.json",))
    assert checkpoints.resume_point("auto", str(tmp_path), lambda: SIGNATURE) is None
    with pytest.raises(InputError, match="holds no complete checkpoint. Pass resume_from_checkpoint='auto'"):
        checkpoints.resume_point(True, str(tmp_path), lambda: SIGNATURE)
    _checkpoint(tmp_path / "checkpoint-0")
    assert checkpoints.resume_point("auto", str(tmp_path), lambda: SIGNATURE) == str(tmp_path / "checkpoint-0")
    assert checkpoints.resume_point(True, str(tmp_path), lambda: SIGNATURE) == str(tmp_path / "checkpoint-0")
    assert checkpoints.resume_point("True", str(tmp_path), lambda: SIGNATURE) == str(tmp_path / "checkpoint-0")  # CLI
    assert checkpoints.resume_point(None, str(tmp_path), lambda: SIGNATURE) is None


def test_incomplete_and_another_setup_are_told_apart(tmp_path, caplog):
    """A missing projections file was reported as "not written by this distillation set-up"."""
    checkpoints, other = _checkpoints(), {"loss": {"temperature": 4.0}}
    incomplete = _checkpoint(tmp_path / "checkpoint-3", lacking=(PROJECTIONS_NAME, "scheduler.pt"))
    with pytest.raises(InputError) as err:
        checkpoints.resume_point(str(incomplete), str(tmp_path), lambda: SIGNATURE)
    assert f"it is incomplete (a save was interrupted" in str(err.value)
    assert f"it lacks scheduler.pt, {PROJECTIONS_NAME}" in str(err.value) and "set-up" not in str(err.value)
    with pytest.raises(InputError) as err:  # another set-up: said so, whatever else it lacks
        checkpoints.resume_point(str(incomplete), str(tmp_path), lambda: other)
    assert "another set-up" in str(err.value) and "loss.temperature: checkpoint 2.0, now 4.0" in str(err.value)
    assert "it is incomplete" not in str(err.value)
    complete = _checkpoint(tmp_path / "checkpoint-2")
    with pytest.raises(InputError, match="another set-up"):
        checkpoints.resume_point("auto", str(tmp_path), lambda: other)
    (complete / KD_CONFIG_NAME).unlink()  # another tool's checkpoint: resumed, with a warning
    with caplog.at_level(logging.WARNING, logger="hf_kd"):
        assert checkpoints.resume_point(str(complete), str(tmp_path), lambda: other) == str(complete)
    assert f"has no {KD_CONFIG_NAME}" in caplog.text
    cut = _checkpoint(tmp_path / "checkpoint-5", lacking=(KD_CONFIG_NAME,))
    (cut / KD_CONFIG_NAME).write_text('{"loss": {"temp')  # a kill while an older version wrote it
    with pytest.raises(InputError, match=f"it is incomplete .*: it lacks {KD_CONFIG_NAME} \\(unreadable\\)"):
        checkpoints.resume_point(str(cut), str(tmp_path), lambda: SIGNATURE)
    with pytest.raises(InputError, match="no such folder"):
        checkpoints.resume_point(str(tmp_path / "checkpoint-7"), str(tmp_path), lambda: SIGNATURE)


def test_a_start_clears_what_a_killed_save_left(tmp_path, caplog):
    (tmp_path / (atomic.PARTIAL + "checkpoint-4") / "checkpoint-4").mkdir(parents=True)
    (tmp_path / (atomic.REPLACED + "checkpoint-3")).mkdir()  # set aside, its replacement never arrived: put back
    (tmp_path / (atomic.REPLACED + "config.json")).write_text("old")  # its replacement arrived: deleted
    (tmp_path / "config.json").write_text("new")
    (tmp_path / "tmp-notes").mkdir()  # not ours
    with caplog.at_level(logging.WARNING, logger="hf_kd"):
        _checkpoints().resume_point(None, str(tmp_path), lambda: SIGNATURE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "config.json", "tmp-notes"]
    assert (tmp_path / "config.json").read_text() == "new"
    assert "removed what an interrupted save left" in caplog.text


def test_a_checkpoint_appears_under_its_name_only_when_renamed_complete(tmp_path):
    state, checkpoints = TrainerState(global_step=5), _checkpoints()
    with pytest.raises(KeyboardInterrupt):
        with checkpoints.writing(str(tmp_path), state) as folder:
            (Path(folder) / "model.safetensors").parent.mkdir(parents=True)
            (Path(folder) / "model.safetensors").write_bytes(b"x")
            raise KeyboardInterrupt  # as a kill: nothing after it runs
    assert [p.name for p in tmp_path.iterdir()] == [atomic.PARTIAL + "checkpoint-5"]
    assert checkpoints.partial_run_dir is None
    with checkpoints.writing(str(tmp_path), state) as folder:
        assert checkpoints.partial_run_dir == str(tmp_path / (atomic.PARTIAL + "checkpoint-5"))
        assert not (Path(folder) / "model.safetensors").exists()  # the stale one was removed first
        Path(folder).mkdir(parents=True)
        (Path(folder) / "trainer_state.json").write_text("{}")
        state.best_model_checkpoint = folder  # as Trainer sets it, looking in the partial folder
        assert not (tmp_path / "checkpoint-5").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]
    assert state.best_model_checkpoint == str(tmp_path / "checkpoint-5")  # also in the state saved with it:
    assert json.loads((tmp_path / "checkpoint-5" / "trainer_state.json").read_text())["best_model_checkpoint"] == str(
        tmp_path / "checkpoint-5")


def test_rotation_keeps_the_newest_and_the_best_and_leaves_nothing_half_deleted(tmp_path):
    for step in (1, 2, 3, 4):
        _checkpoint(tmp_path / f"checkpoint-{step}")
    rotate(str(tmp_path), 2, best=str(tmp_path / "checkpoint-1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-4"]
    rotate(str(tmp_path), None, best=None)
    assert len(list(tmp_path.iterdir())) == 2


def test_a_final_save_into_a_folder_moves_each_file_whole_and_drops_stale_shards(tmp_path):
    final = tmp_path / "out"
    (final / "checkpoint-1").mkdir(parents=True)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                 "config.json", "results.json"):
        (final / name).write_text("old")
    staged = final / (atomic.PARTIAL + "save")
    staged.mkdir()
    for name in ("model.safetensors", "config.json"):
        (staged / name).write_text("new")
    atomic.publish_entries(str(staged), str(final))
    assert sorted(p.name for p in final.iterdir()) == ["checkpoint-1", "config.json", "model.safetensors", "results.json"]
    assert (final / "config.json").read_text() == "new" and (final / "results.json").read_text() == "old"
    fresh = tmp_path / "fresh"
    Path(atomic.partial_path(str(fresh))).mkdir()
    (Path(atomic.partial_path(str(fresh))) / "model.safetensors").write_text("new")
    atomic.publish_folder(atomic.partial_path(str(fresh)), str(fresh))
    assert [p.name for p in fresh.iterdir()] == ["model.safetensors"]
    atomic.replace(str(final), str(fresh))  # a folder over a folder: set aside, then deleted
    assert "results.json" in {p.name for p in fresh.iterdir()} and not final.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh"]
