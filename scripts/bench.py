"""hf_kd against its peers on the same work, side by side in one run: step time and peak memory.

    python scripts/bench.py                 # CPU default (32k vocabulary, 8 x 512 = 4,096 tokens a batch)
    python scripts/bench.py --preset gpu    # a larger pair on a CUDA device (its default there), in bf16
    python scripts/bench.py --steps 1 --reps 2 --skip trl   # quicker; any section can be skipped
    python scripts/bench.py --onpolicy --steps 2 --reps 2   # on-policy: hf_kd vs trl.DistillationTrainer
    python scripts/bench.py --onpolicy --malloc fixed       # the same, peak memory without glibc's retained blocks

Every variant trains the same student (same initial weights, AdamW, same batch) against the same teacher
with the same divergence (forward KL(teacher || student), T = 1: TRL's GKD loss with beta = 0, computed
there from full logits), for `--steps` timed optimizer steps after `--warmup` untimed ones, repeated
`--reps` times with the variants interleaved (A B C ... A B C ...), so drift on a shared machine hits
them all alike. Printed: medians and the ratios that matter.

Variants
- plain:   the tutorial implementation: full student and teacher logits, log-softmax of both in fp32,
           the divergence over (tokens x vocabulary), backward.
- hf_kd:   `DistillationTrainer.training_step` (the loss it picks by default: chunked through the lm_head
           for a vocabulary this size) + the optimizer step.
- trl:     TRL's `GKDTrainer.training_step` with lmbda = 0 (no on-policy generation), beta = 0, seq_kd off:
           off-policy distillation on the same batch + the optimizer step.
- limit:   one teacher forward without gradients + one plain training step of the student (its own
           cross-entropy on the labels, as Transformers computes it) on the same batch, timed separately
           in the same run: no distillation step can cost less than their sum.
- cached:  hf_kd reading the teacher's top-k logits from `hf-kd cache-teacher`'s dataset (the teacher is
           not loaded), k = `--top_k`.

On CPU, live vs cached is timed again on `--deep_preset` (default cpu_deep): the cpu pair's teacher keeps 85% of
its parameters in the embeddings and lm_head, so its forward costs less than the student's own training
step through a head of the same vocabulary; cpu_deep's 12-layer teacher (6x the same student) spends most
of its forward time in its layers, as real language models do.

On CUDA every variant runs as `bf16=True` trains (`--precision bf16`, the default there): the teacher's weights
in bf16, the student's forward in bf16 autocast over fp32 master weights; hf_kd with `teacher_dtype: bfloat16`.
`--chunk_size N` times hf_kd with chunks of N positions instead of its automatic size.

`--onpolicy` runs the on-policy section instead: SmolLM2-135M-Instruct into `--onpolicy_layers` of its layers
(offline weights, see hf_kd.apps.offline), hf_kd (`lmbda=1`, reverse KL) against `trl.DistillationTrainer`
(`beta=1`, `generate`, no vLLM), same prompts, exactly N sampled tokens each for each N of `--onpolicy_tokens`
(default 16 and 128): seconds per optimizer step with the generation, and the peak memory of the run, each variant
in a fresh process.

Peak memory is measured in a fresh subprocess per variant: on CPU the peak resident set size of the step
(Linux resets the high-water mark through /proc/self/clear_refs, read back as VmHWM), on CUDA
torch.cuda.max_memory_allocated; both relative to the memory in use just before the step. "loss" rows
time and measure the loss alone (from the last hidden states and the lm_head weights to the gradients),
the rest the whole training step.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

PRESETS = {
    # teacher ~20M parameters (17M of them embeddings and lm_head), student ~4.3M: 4.6x; 2 CPU cores: ~3.5 min in all
    "cpu": dict(vocab=32768, t_hidden=256, t_layers=4, t_heads=4, s_hidden=64, s_layers=2, s_heads=2,
                batch=8, length=512),
    "gpu": dict(vocab=32768, t_hidden=2048, t_layers=16, t_heads=16, s_hidden=512, s_layers=4, s_heads=8,
                batch=16, length=1024),
    # live vs cached on a deeper teacher whose forward time goes mostly to its layers, as in real LMs (the cpu
    # pair's teacher is 85% embeddings and lm_head; this one 64%): ~26M (6x the same student), 12 layers
    "cpu_deep": dict(vocab=32768, t_hidden=256, t_layers=12, t_heads=4, s_hidden=64, s_layers=2, s_heads=2,
                     batch=8, length=512),
    # seconds, for trying the script out (and its test)
    "smoke": dict(vocab=1024, t_hidden=64, t_layers=2, t_heads=4, s_hidden=32, s_layers=1, s_heads=2,
                  batch=2, length=64),
}
VARIANTS = ("plain", "hf_kd", "trl", "limit", "cached")


# --------------------------------------------------------------------------- models and data
def build_models(p: dict, device: str, precision: str = "fp32", seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    def config(hidden, layers, heads):
        return LlamaConfig(
            vocab_size=p["vocab"], hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 8 * 8,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=p["length"], tie_word_embeddings=False, attn_implementation="sdpa",
        )

    with torch.device(device):
        torch.manual_seed(seed)
        teacher = LlamaForCausalLM(config(p["t_hidden"], p["t_layers"], p["t_heads"])).eval()
        teacher.requires_grad_(False)
        torch.manual_seed(seed + 1)
        student = LlamaForCausalLM(config(p["s_hidden"], p["s_layers"], p["s_heads"]))
    if precision == "bf16":
        teacher.to(torch.bfloat16)
    return teacher, student


def mixed(student, precision: str, device: str):
    """bf16: the student's forward in autocast (fp32 master weights), as accelerate wraps it under `bf16=True`."""
    if precision == "bf16":
        student.forward = torch.autocast(device_type=device, dtype=torch.bfloat16)(student.forward)
    return student


def make_batch(p: dict, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, p["vocab"], (p["batch"], p["length"]), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}


def n_params(model) -> int:
    return sum(t.numel() for t in model.parameters())


# --------------------------------------------------------------------------- the plain loss (tutorial style)
def plain_kl(student_logits, teacher_logits, labels):
    """Forward KL(teacher || student) on full logits, as written in most tutorials: (tokens x V) in fp32."""
    s = torch.log_softmax(student_logits[:, :-1].float(), -1)
    t = torch.log_softmax(teacher_logits[:, :-1].float(), -1)
    per_token = (t.exp() * (t - s)).sum(-1)
    mask = labels[:, 1:] != -100
    return per_token[mask].sum() / mask.sum()


# --------------------------------------------------------------------------- runners: one optimizer step each
class Runner:
    name = ""
    batch = None  # a batch of its own (the cached variant), else the common one

    def step(self, batch):  # one optimizer step
        raise NotImplementedError


class Plain(Runner):
    name = "plain"

    def __init__(self, teacher, student, lr):
        self.teacher, self.student = teacher, student
        self.opt = torch.optim.AdamW(student.parameters(), lr=lr)

    def step(self, batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        s_logits = self.student(**inputs).logits
        with torch.no_grad():
            t_logits = self.teacher(**inputs).logits
        loss = plain_kl(s_logits, t_logits, batch["labels"])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class TrainerRunner(Runner):
    """Drives a Trainer subclass's own training_step, then its optimizer, as Trainer's loop does."""

    def __init__(self, trainer):
        self.trainer = trainer
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is not used here

    def step(self, batch):
        tr = self.trainer
        loss = tr.training_step(tr.model, dict(batch))
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def hf_kd_runner(teacher, student, lr, out, cache=None, precision="fp32", **extra):
    from hf_kd import DistillationConfig, DistillationTrainer

    names = {f.name for f in fields(DistillationConfig)}
    options = dict(kd_loss="forward_kl", temperature=1.0, alpha=1.0, **extra)
    if precision == "bf16":
        options.update(bf16=True, teacher_dtype="bfloat16")
    if cache is not None:
        options["teacher_cache"] = cache.cache_folder
    args = DistillationConfig(
        output_dir=out, learning_rate=lr, per_device_train_batch_size=1, report_to="none", save_strategy="no",
        use_cpu=not torch.cuda.is_available(), **{k: v for k, v in options.items() if k in names},
    )
    trainer = DistillationTrainer(model=student, teacher_model=None if cache is not None else teacher, args=args,
                                  train_dataset=cache)
    runner = TrainerRunner(trainer)
    runner.name = "cached" if cache is not None else "hf_kd"
    if cache is not None:  # the batch as training reads it: inputs + the teacher's cached targets
        device = trainer.args.device
        runner.batch = {k: v.to(device) for k, v in trainer.data_collator([cache[i] for i in range(len(cache))]).items()}
    return runner


def trl_runner(teacher, student, lr, out, precision="fp32"):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from datasets import Dataset

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, "<unk>")))
    tok.pad_token = "<pad>"
    args = GKDConfig(
        output_dir=out, learning_rate=lr, per_device_train_batch_size=1, report_to="none", save_strategy="no",
        lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False, use_cpu=not torch.cuda.is_available(),
        disable_dropout=True, bf16=precision == "bf16",
    )
    dummy = Dataset.from_dict({"input_ids": [[1, 2]], "attention_mask": [[1, 1]], "labels": [[1, 2]]})
    with _quiet():
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dummy,
                             processing_class=tok, data_collator=lambda rows: rows)
    runner = TrainerRunner(trainer)
    runner.name = "trl"
    return runner


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


class Limit(Runner):
    """Teacher forward without gradients, and the student's own plain training step, timed apart."""

    name = "limit"

    def __init__(self, teacher, student, lr):
        self.teacher, self.student = teacher, student
        self.opt = torch.optim.AdamW(student.parameters(), lr=lr)
        self.parts = {"teacher_forward": [], "student_step": []}

    def step(self, batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        t0 = _now()
        with torch.no_grad():
            self.teacher(**inputs)
        t1 = _now()
        loss = self.student(**inputs, labels=batch["labels"]).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t2 = _now()
        self.parts["teacher_forward"].append(t1 - t0)
        self.parts["student_step"].append(t2 - t1)
        return loss.item()


def _now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


# --------------------------------------------------------------------------- the cache
def build_cache(teacher, batch, top_k, out):
    """`hf_kd.cache_teacher_outputs` over the benchmark batch (one row per sequence): the saved dataset."""
    from datasets import Dataset
    from transformers import default_data_collator

    from hf_kd import cache_teacher_outputs, load_cached_dataset

    rows = Dataset.from_dict({k: v.cpu().tolist() for k, v in batch.items()})
    cache_teacher_outputs(teacher, rows, default_data_collator, top_k=top_k, temperature=1.0, output_dir=out,
                          batch_size=len(rows))
    dataset = load_cached_dataset(out)
    dataset.cache_folder = out
    return dataset


# --------------------------------------------------------------------------- timing
def make_runner(name, teacher, student0, p, args, tmp, cache):
    student = mixed(copy.deepcopy(student0), args.precision, "cuda" if torch.cuda.is_available() else "cpu")
    if name == "plain":
        return Plain(teacher, student, args.lr)
    if name == "limit":
        return Limit(teacher, student, args.lr)
    if name == "hf_kd":
        return hf_kd_runner(teacher, student, args.lr, f"{tmp}/hf_kd", precision=args.precision,
                            logit_chunk_size=args.chunk_size)
    if name == "trl":
        return trl_runner(teacher, student, args.lr, f"{tmp}/trl", precision=args.precision)
    if name == "cached":
        return hf_kd_runner(teacher, student, args.lr, f"{tmp}/cached", cache=cache, precision=args.precision,
                            logit_chunk_size=args.chunk_size)
    raise ValueError(name)


def time_variants(names, p, args, device) -> dict:
    teacher, student0 = build_models(p, device, args.precision)
    batch = make_batch(p, device)
    times: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        cache = None
        if "cached" in names:
            t0 = time.perf_counter()
            cache = build_cache(teacher, batch, args.top_k, f"{tmp}/cache")
            print(f"[bench] teacher cache (k={args.top_k}) built in {time.perf_counter() - t0:.1f} s", flush=True)
        runners = {}
        for n in names:
            runners[n] = make_runner(n, teacher, student0, p, args, tmp, cache)
            for _ in range(args.warmup):
                runners[n].step(runners[n].batch or batch)
        for rep in range(args.reps):
            for n in names:
                r = runners[n]
                t0 = _now()
                for _ in range(args.steps):
                    r.step(r.batch or batch)
                times[n].append((_now() - t0) / args.steps)
            print(f"[bench] rep {rep + 1}/{args.reps}: " + "  ".join(f"{n} {times[n][-1]:.3f}s" for n in names), flush=True)
        result = {n: statistics.median(v) for n, v in times.items()}
        if "limit" in runners:
            parts = runners["limit"].parts
            result["teacher_forward"] = statistics.median(parts["teacher_forward"])
            result["student_step"] = statistics.median(parts["student_step"])
            result["limit"] = result["teacher_forward"] + result["student_step"]
        result["teacher_params"] = n_params(teacher)
        result["student_params"] = n_params(student0)
        return result


# --------------------------------------------------------------------------- memory (one subprocess per case)
def _rss_mib(key="VmRSS") -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise RuntimeError(key)


def _reset_peak(device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    open("/proc/self/clear_refs", "w").write("5")  # Linux: VmHWM := VmRSS
    return _rss_mib()


def _peak(device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _rss_mib("VmHWM")


def memory_case(case: str, p: dict, device: str, precision: str = "fp32", chunk_size: int = 0) -> float:
    """Peak MiB above the memory in use just before the measured work (run in a fresh process)."""
    teacher, student = build_models(p, device, precision)
    batch = make_batch(p, device)
    args = argparse.Namespace(lr=1e-4, top_k=64, precision=precision, chunk_size=chunk_size)
    half = torch.bfloat16 if precision == "bf16" else None
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=half is not None)
    with tempfile.TemporaryDirectory() as tmp:
        if case.startswith("loss:"):
            kind = case.split(":", 1)[1]
            with torch.no_grad(), autocast:
                inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
                hs = student.model(**inputs).last_hidden_state.detach()
                ht = teacher.model(**inputs).last_hidden_state
            ws, wt = student.lm_head.weight, teacher.lm_head.weight
            hs.requires_grad_(True)
            mask = batch["labels"][:, 1:] != -100
            from hf_kd.chunked import auto_chunk_size, linear_head_loss  # imported outside the measured region

            before = _reset_peak(device)
            if kind == "plain":  # under bf16 the tutorial's matmuls run in autocast, its softmaxes in fp32
                with autocast:
                    loss = plain_kl(hs @ ws.T, ht @ wt.T, batch["labels"])
            else:  # what hf_kd's trainer calls for this pair (the route through the heads, auto chunk size)
                loss = linear_head_loss(hs[:, :-1], ws, ht[:, :-1], wt, mask, kind="forward_kl", temperature=1.0,
                                        chunk_size=chunk_size or auto_chunk_size(p["vocab"], device),
                                        student_dtype=half).loss
            loss.backward()
            return _peak(device) - before
        cache = build_cache(teacher, batch, args.top_k, f"{tmp}/cache") if case == "cached" else None
        runner = make_runner(case, teacher, student, p, args, tmp, cache)
        batch = runner.batch or batch
        runner.step(batch)  # optimizer state and caches exist before the measured step
        before = _reset_peak(device)
        runner.step(batch)
        return _peak(device) - before


def measure_memory(cases, args) -> dict:
    out = {}
    for case in cases:
        cmd = [sys.executable, __file__, "--_memory_case", case, "--preset", args.preset, "--precision", args.precision,
               "--chunk_size", str(args.chunk_size)] + (["--batch", str(args.batch)] if args.batch else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("MEMORY ")]
        if proc.returncode or not lines:
            print(f"[bench] memory case {case} failed:\n{proc.stderr[-2000:]}", flush=True)
            continue
        out[case] = float(lines[-1].split()[1])
        print(f"[bench] peak memory {case}: {out[case]:.0f} MiB", flush=True)
    return out


# --------------------------------------------------------------------------- on-policy section (--onpolicy)
ONPOLICY_TEACHER = "HuggingFaceTB/SmolLM2-135M-Instruct"


def onpolicy_case(name: str, args, tokens: int) -> dict:
    """One variant's on-policy run on the SmolLM2 pair, in this fresh process: the seconds of each timed optimizer
    step (generation included) and the peak memory (MiB) of the steps above what was in use before training.

    Both variants: the same student (teacher layers `--onpolicy_layers`), the same prompt rows (the first 8 words
    of Rotten Tomatoes reviews; each trainer's sampler orders them), exactly `tokens` sampled tokens per completion
    (min_new_tokens = max_new_tokens), the reverse KL at T = 1 (TRL's beta = 1), AdamW, `transformers.generate`."""
    from datasets import Dataset, load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from hf_kd import student_from_teacher
    from hf_kd.apps.data import prompt_rows
    from hf_kd.apps.offline import resolve_dataset, resolve_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = resolve_model(ONPOLICY_TEACHER)
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    student = student_from_teacher(teacher, args.onpolicy_layers)
    n_steps = args.warmup + args.steps
    texts = [t for t in load_dataset(**resolve_dataset("cornell-movie-review-data/rotten_tomatoes"))["train"]["text"]]
    rows = prompt_rows(texts, 8)[: args.onpolicy_batch * n_steps]
    common = dict(output_dir=tempfile.mkdtemp(), max_steps=n_steps, per_device_train_batch_size=args.onpolicy_batch,
                  learning_rate=1e-5, report_to="none", save_strategy="no", logging_steps=n_steps, disable_tqdm=True,
                  use_cpu=device == "cpu", seed=0)

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, *a, **k):
            self.marks.append(_now())

        def on_step_end(self, *a, **k):
            self.marks.append(_now())

    clock = Clock()
    if name == "hf_kd":
        from hf_kd import DistillationConfig, DistillationTrainer

        sampling = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": True, "temperature": 1.0,
                    "top_k": 0, "top_p": 1.0}
        config = DistillationConfig(**common, lmbda=1.0, kd_loss="reverse_kl", temperature=1.0, alpha=1.0,
                                    generation_config=sampling)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, callbacks=[clock],
                                      train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    else:
        from trl import DistillationConfig as TRLConfig, DistillationTrainer as TRLTrainer

        config = TRLConfig(**common, beta=1.0, temperature=1.0, top_k=0, top_p=1.0, max_completion_length=tokens,
                           generation_kwargs={"min_new_tokens": tokens})
        trainer = TRLTrainer(model=student, teacher_model=teacher, args=config, callbacks=[clock],
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    before = _reset_peak(device)
    trainer.train()
    peak = _peak(device) - before
    steps = [b - a for a, b in zip(clock.marks, clock.marks[1:])][args.warmup:]
    return {"step_s": steps, "peak_mib": peak, "student_params": n_params(student), "teacher_params": n_params(teacher)}


def _malloc_env(mode: str) -> dict:
    """The environment of a measured process. On CPU the peak is the resident set, which also counts memory that
    glibc's malloc keeps after a tensor is freed: its mmap threshold rises to the size of each freed block (up to
    32 MiB), so later blocks below it come from a heap that is not given back, and two runs with the same live
    tensors can differ by 100 MiB with the order of their allocations. `fixed` pins the threshold at 1 MiB for
    every variant alike (MALLOC_MMAP_THRESHOLD_): freed large blocks go back at once and the peak follows the
    memory tensors hold, as torch.cuda.max_memory_allocated does on a GPU. `default` measures as a user runs."""
    env = dict(os.environ)
    if mode == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    return env


def onpolicy_section(args) -> dict:
    """hf_kd vs trl.DistillationTrainer, on-policy (generate, no vLLM), at each generation length of
    `--onpolicy_tokens`: each repetition runs both, interleaved, each in a fresh process; medians of the step times
    and of the peak memory."""
    summary = {}
    for tokens in args.onpolicy_tokens:
        summary[tokens] = _onpolicy_lengths(args, tokens)
    print(f"\non-policy, SmolLM2-135M-Instruct -> layers {args.onpolicy_layers}, batch {args.onpolicy_batch}; "
          f"malloc {args.malloc}; medians over {args.reps} repetitions x {args.steps} steps:")
    for tokens, result in summary.items():
        if "ratios" not in result:
            continue
        print(f"  {tokens} generated tokens:")
        for name in ("hf_kd", "trl"):
            print(f"    {name:6s} {result[name]['step_s']:8.2f} s/step  {result[name]['peak_mib']:8.0f} MiB peak")
        for label, value in result["ratios"].items():
            print(f"    {label:28s} {value:6.2f}  (target <= 1.00)")
    return summary


def _onpolicy_lengths(args, tokens: int) -> dict:
    results = {"hf_kd": [], "trl": []}
    for rep in range(args.reps):
        for name in results:
            cmd = [sys.executable, __file__, "--_onpolicy_case", name, "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--onpolicy_batch", str(args.onpolicy_batch), "--onpolicy_tokens",
                   str(tokens), "--onpolicy_layers", *map(str, args.onpolicy_layers)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_malloc_env(args.malloc))
            lines = [line for line in proc.stdout.splitlines() if line.startswith("ONPOLICY ")]
            if proc.returncode or not lines:
                print(f"[bench] on-policy {name} failed:\n{proc.stderr[-3000:]}", flush=True)
                continue
            results[name].append(json.loads(lines[-1][len("ONPOLICY "):]))
            last = results[name][-1]
            print(f"[bench] on-policy {tokens} tokens, rep {rep} {name}: steps {[round(x, 2) for x in last['step_s']]}"
                  f" s, peak {last['peak_mib']:.0f} MiB", flush=True)
    summary = {}
    for name, runs in results.items():
        if runs:
            summary[name] = {"step_s": statistics.median(x for r in runs for x in r["step_s"]),
                             "peak_mib": statistics.median(r["peak_mib"] for r in runs),
                             "peak_mib_each": [r["peak_mib"] for r in runs]}
    if len(summary) == 2:
        summary["ratios"] = {"step time hf_kd / trl": summary["hf_kd"]["step_s"] / summary["trl"]["step_s"],
                             "peak memory hf_kd / trl": summary["hf_kd"]["peak_mib"] / summary["trl"]["peak_mib"]}
    return summary


# --------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per repetition")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (variants interleaved)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--top_k", type=int, default=64, help="k of the cached teacher logits")
    parser.add_argument("--skip", nargs="*", default=[], choices=[*VARIANTS, "memory"])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--memory_all", action="store_true", help="also the peak memory of the trl and cached steps")
    parser.add_argument("--deep_preset", default=None if torch.cuda.is_available() else "cpu_deep",
                        help="also time live vs cached teacher on this pair (a teacher heavy in its layers); 'none' skips")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16" if torch.cuda.is_available() else "fp32",
                        help="bf16 (default on CUDA): the teacher's weights in bf16 and the student's forward in bf16 "
                        "autocast with fp32 master weights, as `bf16=True` trains; every variant alike")
    parser.add_argument("--chunk_size", type=int, default=0,
                        help="hf_kd's logit_chunk_size, timed and measured (0 = auto, as a user gets it)")
    parser.add_argument("--batch", type=int, help="sequences a batch (default: the preset's)")
    parser.add_argument("--onpolicy", action="store_true",
                        help="run the on-policy section alone: hf_kd vs trl.DistillationTrainer on the SmolLM2 pair")
    parser.add_argument("--onpolicy_layers", type=int, nargs="+", default=[10, 20, 30])
    parser.add_argument("--onpolicy_batch", type=int, default=4)
    parser.add_argument("--onpolicy_tokens", type=int, nargs="+", default=[16, 128],
                        help="generated tokens per completion; each length is a row of its own (TRL's "
                        "DistillationConfig defaults to 512, GKD's max_new_tokens to 128)")
    parser.add_argument("--malloc", choices=("default", "fixed"), default="default",
                        help="on-policy on CPU: glibc's malloc as is, or its mmap threshold fixed at 1 MiB for every "
                        "variant so that the peak resident set follows live tensors (see _malloc_env)")
    parser.add_argument("--_memory_case", help=argparse.SUPPRESS)
    parser.add_argument("--_onpolicy_case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._onpolicy_case:
        tokens, = args.onpolicy_tokens
        print("ONPOLICY " + json.dumps(onpolicy_case(args._onpolicy_case, args, tokens)), flush=True)
        return 0
    if args.onpolicy:
        summary = onpolicy_section(args)
        if args.json:
            Path(args.json).write_text(json.dumps({"onpolicy": summary}, indent=1))
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = dict(PRESETS[args.preset], **({"batch": args.batch} if args.batch else {}))
    if args._memory_case:
        print(f"MEMORY {memory_case(args._memory_case, p, device, args.precision, args.chunk_size):.1f}", flush=True)
        return 0

    names = [n for n in VARIANTS if n not in args.skip]
    if "trl" in names and importlib.util.find_spec("trl") is None:
        print("[bench] trl is not installed (pip install 'hf_kd[bench]'): the trl variant is skipped", flush=True)
        names.remove("trl")
    gpu = f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""
    print(f"[bench] {device}{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.precision}; "
          f"preset {args.preset}: {p}")
    t_start = time.perf_counter()
    times = time_variants(names, p, args, device)
    memory = {}
    if "memory" not in args.skip:
        cases = ["loss:plain", "loss:hf_kd"] + [n for n in names if n in (("plain", "hf_kd") if not args.memory_all
                                                                            else ("plain", "hf_kd", "trl", "cached"))]
        memory = measure_memory(cases, args)

    deep = None
    if args.deep_preset not in (None, "none") and {"hf_kd", "cached"} <= set(names):
        print(f"[bench] live vs cached on preset {args.deep_preset}: {PRESETS[args.deep_preset]}", flush=True)
        deep = time_variants(["hf_kd", "cached"], PRESETS[args.deep_preset], args, device)

    tokens = p["batch"] * p["length"]
    print()
    print(f"teacher {times['teacher_params'] / 1e6:.1f}M parameters, student {times['student_params'] / 1e6:.1f}M "
          f"({times['teacher_params'] / times['student_params']:.1f}x); vocabulary {p['vocab']}; {tokens} tokens a batch")
    print(f"{'variant':10s} {'step (s)':>9s} {'peak step (MiB)':>16s}")
    for n in names:
        if n in times:
            print(f"{n:10s} {times[n]:9.3f} {memory.get(n, float('nan')):16.0f}")
    if "limit" in times:
        print(f"  limit = teacher forward {times['teacher_forward']:.3f} s + student plain step {times['student_step']:.3f} s")
    print("\nratios (same run, medians):")
    ratios = {}

    def ratio(label, a, b, target=""):
        if a in times and b in times:
            ratios[label] = times[a] / times[b]
            print(f"  {label:42s} {ratios[label]:6.2f}  {target}")

    ratio("step time hf_kd / plain", "hf_kd", "plain")
    ratio("step time hf_kd / trl (GKD, lmbda 0)", "hf_kd", "trl", "(target <= 1.00)")
    ratio("step time hf_kd / limit", "hf_kd", "limit", "(target <= 1.10)")
    ratio("step time live / cached (hf_kd)", "hf_kd", "cached", "(target >= 2.00)")
    if deep is not None:
        label = f"step time live / cached (hf_kd), {args.deep_preset}"
        ratios[label] = deep["hf_kd"] / deep["cached"]
        print(f"  {label:42s} {ratios[label]:6.2f}  (target >= 2.00; teacher {deep['teacher_params'] / 1e6:.1f}M = "
              f"{deep['teacher_params'] / deep['student_params']:.1f}x the student, live {deep['hf_kd']:.3f} s, "
              f"cached {deep['cached']:.3f} s)")
    for a, b, target in (("loss:hf_kd", "loss:plain", "(target <= 0.50)"), ("hf_kd", "plain", ""), ("hf_kd", "trl", "")):
        if a in memory and b in memory:
            label = f"peak memory {a.replace('loss:', 'loss ')} / {b.replace('loss:', 'loss ')}"
            ratios[label] = memory[a] / memory[b]
            print(f"  {label:42s} {ratios[label]:6.2f}  {target}")
    print(f"\n[bench] total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": p, "precision": args.precision, "chunk_size": args.chunk_size,
                                               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                               "times": times, "memory_mib": memory, "ratios": ratios,
                                               "deep": deep}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
