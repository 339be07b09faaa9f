"""Pre-emption: a run killed at any moment restarts from its last complete checkpoint, by itself.

The tests run this file as a script in a child process (``python tests/test_preemption.py MODE OUT``): a tiny
distillation with a narrower student (so projections are saved too), a checkpoint every step, then `save_model`
into the output folder, as ``hf-kd distill`` does. The child either dies at the k-th file write of a save (every
k) or is SIGKILLed at random moments; each restart runs with ``resume_from_checkpoint="auto"`` and must end
bitwise equal to a run that was never interrupted.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import tiny_recipe  # noqa: F401 - a fixture

HERE = Path(__file__).resolve().parent
STEPS = 2


# ------------------------------------------------------------------------------------------------ the child
def _run(out: str, steps: int = STEPS, pause: float = 0.0, save_total_limit: int = 1):
    """Distil to `steps` with a checkpoint every step, resuming from `out` when it holds a complete checkpoint, then
    save the student into `out`. Returns the trainer."""
    import torch
    from conftest import ListDataset, bert_config, make_bert, random_batch, rows_from_batch
    from transformers import BertForSequenceClassification, TrainerCallback

    from hf_kd import CardInfo, DistillationConfig, DistillationTrainer

    class Progress(TrainerCallback):  # tells the slow test when training runs; gives its SIGKILLs time to land
        def on_train_begin(self, args, state, control, **kwargs):
            print("TRAINING from step", state.global_step, flush=True)

        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(pause)

    teacher = make_bert(layers=2, hidden=16, heads=4, seed=1)
    cfg = bert_config(layers=2, hidden=8, heads=2)
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.1  # the RNG state must be restored too
    torch.manual_seed(2)
    student = BertForSequenceClassification(cfg)
    data = ListDataset(rows_from_batch(random_batch("sequence_classification", batch=4 * steps, pad_from=[10, 7, 5, 9] * steps)))
    args = DistillationConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2, hidden_weight=1.0,
        save_strategy="steps", save_steps=1, save_total_limit=save_total_limit, logging_steps=1, report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  callbacks=[Progress()])
    trainer.card_info = CardInfo(measure_latency=False)
    trainer.train(resume_from_checkpoint="auto")
    trainer.save_model(out)
    return trainer


def _weights(trainer) -> dict:
    return {**{k: v.clone() for k, v in trainer.model.state_dict().items()},
            **{"projections." + k: v.clone() for k, v in trainer.projections.state_dict().items()}}


class Killed(BaseException):
    """A simulated kill: no `except Exception` stops it, and the code it interrupts runs nothing more."""


class Writes:
    """Counts the file writes of a save (and its renames and deletions); at the `kill_at`-th one, leaves that file
    half-written (or that folder half-deleted) and dies: raises `Killed` (``exit=False``) or ``os._exit``."""

    def __init__(self, kill_at: int | None = None, exit: bool = False):
        self.kill_at, self.exit, self.count, self.armed, self.names = kill_at, exit, 0, False, []

    def _event(self, name: str) -> bool:
        if not self.armed:
            return False
        self.count += 1
        self.names.append(name)
        return self.count == self.kill_at

    def _die(self):
        if self.exit:
            os._exit(137)
        raise Killed

    def _halve(self, path):
        if os.path.isfile(path):
            os.truncate(path, os.path.getsize(path) // 2)
        self._die()

    def install(self):
        import safetensors.torch
        import torch
        import transformers.modeling_utils as modeling_utils

        import hf_kd.distill.projections as projections

        real_open, real_save, real_rename, real_replace, real_rmdir, real_rmtree = (
            builtins.open, torch.save, os.rename, os.replace, os.rmdir, shutil.rmtree)
        writes = self

        class Closing:  # an open file that, closed, is cut in half and the process dies
            def __init__(self, f, path):
                self.f, self.path = f, path

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.close()

            def __iter__(self):
                return iter(self.f)

            def close(self):
                self.f.close()
                writes._halve(self.path)

        def open_(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if any(c in mode for c in "wax+") and isinstance(file, (str, os.PathLike)) and self._event(f"open {file}"):
                return Closing(f, file)
            return f

        def saver(real, label):
            def save(obj, path, *args, **kwargs):
                result = real(obj, path, *args, **kwargs)
                if isinstance(path, (str, os.PathLike)) and self._event(f"{label} {path}"):
                    self._halve(path)
                return result
            return save

        def before(real, label):
            def call(src, *args, **kwargs):
                if self._event(f"{label} {src}"):
                    if label == "rmtree" and os.path.isdir(src):  # half-deleted: one file gone
                        first = sorted(p for p in Path(src).rglob("*") if p.is_file())
                        if first:
                            os.remove(first[0])
                    self._die()
                return real(src, *args, **kwargs)
            return call

        builtins.open = io.open = open_  # pathlib opens with io.open
        torch.save = saver(real_save, "torch.save")
        for module, name in ((safetensors.torch, "save_file"), (modeling_utils, "safe_save_file"),
                             (projections, "save_file")):
            setattr(module, name, saver(getattr(module, name), name))
        os.rename, os.replace, os.rmdir, shutil.rmtree = (
            before(real_rename, "rename"), before(real_replace, "replace"), before(real_rmdir, "rmdir"),
            before(real_rmtree, "rmtree"))
        return self


def _armed_run(out: str, writes: Writes, save_steps=(2,)):
    """`_run` with `writes` counting during the checkpoints of `save_steps` and the final `save_model`."""
    from hf_kd import DistillationTrainer

    save_checkpoint, save_model = DistillationTrainer._save_checkpoint, DistillationTrainer.save_model

    def armed(method, when):
        def call(self, *args, **kwargs):
            armed = writes.armed
            writes.armed = armed or when(self, *args, **kwargs)
            try:
                return method(self, *args, **kwargs)
            finally:
                writes.armed = armed
        return call

    DistillationTrainer._save_checkpoint = armed(save_checkpoint, lambda t, *a, **k: t.state.global_step in save_steps)
    DistillationTrainer.save_model = armed(save_model, lambda t, *a, **k: not k.get("_internal_call"))
    try:
        return _run(out)
    finally:
        DistillationTrainer._save_checkpoint, DistillationTrainer.save_model = save_checkpoint, save_model


def _final_files_whole(out: str, expected: dict) -> str | None:
    """None when every weight file under `out`'s own names loads whole and equals the final weights (or is absent)."""
    import torch
    from safetensors.torch import load_file

    path = Path(out) / "model.safetensors"
    if not path.exists():
        return None
    try:
        saved = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - a half-written file
        return f"{path} does not load: {err}"
    if any(not torch.equal(v, expected[k]) for k, v in saved.items()):
        return f"{path} holds other weights"
    return None


def every_write(root: str) -> dict:
    """Dies at each file write k of checkpoint-2's save (checkpoint-1 is rotated away after it) and of the final
    save, then restarts: every restart must end with the weights of the run never killed."""
    import gc
    import logging

    import torch

    from hf_kd.distill.checkpoint import newest_complete

    logging.getLogger("hf_kd").setLevel(logging.ERROR)  # the skipped-checkpoint warnings are tested apart
    counting = Writes().install()
    reference = _weights(_armed_run(os.path.join(root, "reference"), counting))  # never killed: counts the writes
    named = json.loads(Path(root, "reference", "hf_kd_provenance.json").read_text())["model_name"]  # not the partial one
    gc.freeze()  # the objects of the imports: each of the runs below collects its own garbage (accelerate) faster
    results = {"writes": counting.count, "names": counting.names, "resumed": 0, "equal": 0,
               "problems": [] if named == "reference" else [f"the card names the model {named!r}"]}
    for k in range(1, counting.count + 1):
        out = os.path.join(root, f"kill-{k}")
        counting.kill_at, counting.count, counting.names = k, 0, []
        try:
            _armed_run(out, counting)
            results["problems"].append(f"k={k}: no kill")
        except Killed:
            pass
        counting.kill_at = None
        if newest_complete(out, projections=True) is None:  # checkpoint-1 rotated away before checkpoint-2 was whole
            results["problems"].append(f"k={k}: no complete checkpoint left")
        problem = _final_files_whole(out, reference)
        if problem:
            results["problems"].append(f"k={k}: {problem}")
        try:
            final = _weights(_run(out))
        except Exception as err:  # noqa: BLE001 - reported
            results["problems"].append(f"k={k}: the restart failed: {type(err).__name__}: {err}")
            continue
        results["resumed"] += 1
        same = final.keys() == reference.keys() and all(torch.equal(final[n], reference[n]) for n in final)
        results["equal"] += same
        if not same:
            results["problems"].append(f"k={k}: the restarted run ends with other weights")
        leftovers = [p.name for p in Path(out).iterdir() if p.name.startswith("hf_kd-")]
        if leftovers:
            results["problems"].append(f"k={k}: left {leftovers}")
    shutil.rmtree(root, ignore_errors=True)
    return results


def main(argv):
    mode, out = argv[0], argv[1]
    sys.path.insert(0, str(HERE))
    if mode == "every-write":
        print(json.dumps(every_write(out)))
    elif mode == "run":  # the job a SIGKILL interrupts: restarted with the same command every time
        _run(out, steps=int(argv[2]), pause=float(argv[3]), save_total_limit=2)
        print("DONE", flush=True)


# ------------------------------------------------------------------------------------------------ the tests
def _child(log: Path, *args) -> subprocess.Popen:
    """This file as a script in a child process of one thread (as `_one_thread`); stderr goes to `log`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    with open(log, "a") as err:
        return subprocess.Popen([sys.executable, str(Path(__file__)), *map(str, args)], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=err)


@contextlib.contextmanager
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _training(child: subprocess.Popen) -> int | None:
    """Reads the child's output until it trains (the step it starts from) or ends (None)."""
    for line in child.stdout:
        if line.startswith("TRAINING"):
            return int(line.split()[-1])
    return None


def test_a_kill_at_every_write_of_a_save_leaves_a_run_that_resumes_bitwise(tmp_path):
    """Issue 20: a kill during a checkpoint write left checkpoint-N without its last files; the resume took it
    and stopped ("Can't find a valid checkpoint", or "not written by this distillation set-up")."""
    child = _child(tmp_path / "log", "every-write", tmp_path / "runs")
    out, _ = child.communicate(timeout=600)
    assert child.returncode == 0, (tmp_path / "log").read_text()[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    names = result["names"]
    for part in ("model.safetensors", "optimizer.pt", "rng_state.pth", "trainer_state.json",
                 "kd_projections.safetensors", "kd_config.json", "rename", "rmtree", "replace"):
        assert any(part in name for name in names), (part, names)
    assert result["writes"] >= 20, names  # checkpoint-2, the rotation of checkpoint-1 and the final save
    assert result["problems"] == []
    assert result["resumed"] == result["equal"] == result["writes"]


@pytest.mark.slow
def test_cli_resume_auto_starts_afresh_then_resumes_from_the_newest_complete_checkpoint(tiny_recipe, caplog):
    """One command for a job restarted after each pre-emption: `hf-kd distill ... --resume_from_checkpoint auto`."""
    from hf_kd.cli import main

    path, tmp, _ = tiny_recipe
    out, command = tmp / "out", ["distill", "--config", str(path), "--baseline", "false", "--report", "false",
                                 "--resume_from_checkpoint", "auto"]
    assert main(command) == 0  # no output_dir yet: a fresh run, 8 steps, checkpoints 4 and 8
    assert json.loads((out / "results.json").read_text())["distilled"]["steps"] == 8
    four = (out / "checkpoint-4" / "model.safetensors").stat()
    (out / "checkpoint-8" / "optimizer.pt").unlink()  # as a kill during an older version's save left it
    with caplog.at_level("WARNING", logger="hf_kd"):
        assert main(command) == 0
    assert f"{out / 'checkpoint-8'} is incomplete" in caplog.text and "it lacks optimizer.pt" in caplog.text
    assert json.loads((out / "results.json").read_text())["distilled"]["steps"] == 8
    now = (out / "checkpoint-4" / "model.safetensors").stat()
    assert (now.st_ino, now.st_mtime_ns) == (four.st_ino, four.st_mtime_ns)  # resumed from it, not rewritten
    assert (out / "checkpoint-8" / "optimizer.pt").is_file()  # checkpoint-8 written again, whole
    assert not [p.name for p in out.iterdir() if p.name.startswith("hf_kd-")]


@pytest.mark.slow
def test_sigkill_at_random_moments_and_each_restart_finishes(tmp_path):
    """A job restarted with one command (resume_from_checkpoint="auto") after each SIGKILL, at random moments of
    its training and checkpoints, resumes every time and ends bitwise equal to a run never killed."""
    import torch
    from safetensors.torch import load_file

    steps, pause, out, rng = 8, 0.1, tmp_path / "job", random.Random(20)
    log, kills, restarts = tmp_path / "log", 0, 0
    for attempt in range(5):  # four kills, then a run left to finish
        child = _child(log, "run", out, steps, pause)
        start = _training(child)  # the step it resumed from (0: started afresh, killed before checkpoint-1)
        restarts += start is not None and attempt > 0
        if attempt == 4 or start is None:
            break
        # A moment before the run can end, whatever the machine's speed: each step left sleeps `pause` after it.
        time.sleep(rng.uniform(0.0, (steps - start) * pause))
        child.send_signal(signal.SIGKILL)
        kills += child.wait() == -signal.SIGKILL  # else it had finished
    rest, _ = child.communicate(timeout=300)
    assert child.returncode == 0 and "DONE" in rest, log.read_text()[-3000:]
    assert restarts == kills == 4, (kills, restarts)
    with _one_thread():
        reference = _weights(_run(str(tmp_path / "reference"), steps=steps, save_total_limit=2))
    final = load_file(str(out / "model.safetensors"))
    for name, value in final.items():
        assert torch.equal(value, reference[name]), name


if __name__ == "__main__":
    main(sys.argv[1:])
