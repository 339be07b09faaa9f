"""Causal-LM distillation from a recipe: `python -m hf_kd.lm_pipeline --config recipes/smollm2.yaml [--quick]`.

Reads top to bottom: parse, load the teacher and the texts, make the student from the teacher's layers,
measure perplexity of the teacher and the student at init, distil (`DistillationTrainer`), train the
same student from the same start on the causal-LM loss alone for the same steps (the baseline,
`transformers.Trainer`), measure again, write ``results.json`` and ``results.md`` to ``output_dir``.

Data: a text column of any `datasets.load_dataset` source (`hf_kd.offline.resolve_dataset` names a
local copy where one is registered). Every text is tokenised on its own, with the tokenizer's
special tokens and an end-of-sequence token appended, and truncated to ``block_size``.

* Training packs the token streams of consecutive texts into blocks of exactly ``block_size`` tokens
  (the last, partial block is dropped): no padding, labels = input ids.
* Perplexity is measured per text, never across texts: ``exp(sum of token NLLs / number of predicted
  tokens)`` over the held-out texts, each token predicted from the text's earlier tokens. Batches are
  right-padded; padded positions carry label -100 and count nowhere.

The recipe is flat YAML of the `LMArguments` fields below and every `DistillationConfig` field (so
every `TrainingArguments` flag); command-line ``--field value`` overrides it, ``--quick`` applies the
recipe's ``quick:`` block (as `hf-kd distill` does).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, default_data_collator

from .config import DistillationConfig
from .offline import resolve_dataset, resolve_model
from .student import student_from_teacher
from .trainer import DistillationTrainer

__all__ = ["LMArguments", "run_causal_lm", "tokenize_texts", "pack_blocks", "pad_batch", "perplexity", "main"]


@dataclass
class LMArguments:
    teacher_model_name_or_path: str = field(
        metadata={"help": "Teacher causal LM: a Hub id or local folder. Known Hub ids fall back to offline copies."}
    )
    student_layers: str = field(
        metadata={"help": "The student keeps these teacher layers (1-based JSON list, e.g. [2,4,6])."}
    )
    dataset_name: str = field(
        metadata={"help": "datasets.load_dataset path: a Hub id, a local folder or a csv/json/parquet/txt file."}
    )
    text_column: str = field(default="text", metadata={"help": "Column with the text."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str = field(default="test", metadata={"help": "Held-out split whose texts perplexity is measured on."})
    block_size: int = field(default=128, metadata={"help": "Tokens per packed training block; longest evaluated text."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training texts."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Measure on the first N held-out texts only."})
    eval_batch_size: int = field(default=16, metadata={"help": "Texts per batch when measuring perplexity."})
    baseline: bool = field(
        default=True, metadata={"help": "Also train the same student from the same start on the LM loss alone."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that already holds a run."}
    )


def say(message: str) -> None:
    print(f"[hf-kd lm] {message}", flush=True)


# ---------------------------------------------------------------------------- data
def tokenize_texts(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids of each text (special tokens as the tokenizer adds them, then EOS), at most max_tokens."""
    eos = tokenizer.eos_token_id
    out = []
    for ids in tokenizer(list(texts))["input_ids"]:
        ids = list(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        out.append(ids[:max_tokens])
    return out


def pack_blocks(token_lists: list[list[int]], block_size: int) -> dict[str, list[list[int]]]:
    """Concatenate the texts' tokens and cut blocks of exactly block_size; the remainder is dropped."""
    stream = [t for ids in token_lists for t in ids]
    n = len(stream) // block_size
    blocks = [stream[i * block_size : (i + 1) * block_size] for i in range(n)]
    return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": [list(b) for b in blocks]}


def pad_batch(token_lists: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: attention_mask 0 and labels -100 on padding, labels = input ids elsewhere."""
    width = max(len(ids) for ids in token_lists)
    input_ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)  # (B, T)
    for row, ids in enumerate(token_lists):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)  # (B, T)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def perplexity(model, token_lists: list[list[int]], pad_id: int, batch_size: int = 16) -> dict:
    """exp(mean NLL) over every predicted token of every text: token i+1 from tokens 0..i of its own text.

    Returns {"perplexity", "nll_sum", "tokens"}. The model is put in eval mode and restored after.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll_sum, tokens = 0.0, 0
    # Similar lengths together: less padding. Padding changes no number here, only the time.
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    for start in range(0, len(order), batch_size):
        batch = pad_batch([token_lists[i] for i in order[start : start + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        logits = logits[:, :-1].float()  # (B, T-1, V): position i predicts token i+1
        targets = batch["labels"][:, 1:]  # (B, T-1)
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        nll_sum += float(nll)
        tokens += int((targets != -100).sum())
    model.train(was_training)
    if tokens == 0:
        raise ValueError("no token to predict: every held-out text has fewer than 2 tokens.")
    return {"perplexity": math.exp(nll_sum / tokens), "nll_sum": nll_sum, "tokens": tokens}


def load_texts(lm_args: LMArguments) -> tuple[list[str], list[str]]:
    from datasets import load_dataset

    kwargs = resolve_dataset(lm_args.dataset_name)
    data = load_dataset(**kwargs)
    for split in (lm_args.train_split, lm_args.eval_split):
        if split not in data:
            raise SystemExit(f"hf-kd: {lm_args.dataset_name} has no split {split!r} (it has {sorted(data)}).")
        if lm_args.text_column not in data[split].column_names:
            raise SystemExit(
                f"hf-kd: split {split!r} has no column {lm_args.text_column!r} (columns: "
                f"{data[split].column_names}); set text_column."
            )

    def texts(split, limit):
        column = [t for t in data[split][lm_args.text_column] if t and t.strip()]
        return column[:limit] if limit is not None else column

    return texts(lm_args.train_split, lm_args.max_train_samples), texts(lm_args.eval_split, lm_args.max_eval_samples)


# ---------------------------------------------------------------------------- run
def _plain_args(config: DistillationConfig, output_dir: str, **changes) -> TrainingArguments:
    """The run's TrainingArguments without the distillation fields, for the baseline."""
    names = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    values = {n: getattr(config, n) for n in names}
    values.update(output_dir=output_dir, **changes)
    return TrainingArguments(**values)


def run_causal_lm(lm_args: LMArguments, config: DistillationConfig) -> dict:
    """Distil, train the baseline, measure perplexities; returns (and writes) the results."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(config.output_dir)
    if out.exists() and any(out.iterdir()) and not lm_args.overwrite_output_dir:
        raise SystemExit(f"hf-kd: output_dir {out} already holds a run. Pick another or pass --overwrite_output_dir true.")
    if config.hidden_weight > 0 and config.hidden_loss == "mse":
        say("warning: hidden_loss mse compares raw hidden states, whose scale in LMs can be huge (~6e4 on SmolLM2); "
            "hidden_loss cosine is scale-free (README, 'A causal LM on real weights').")
    layers = json.loads(lm_args.student_layers) if isinstance(lm_args.student_layers, str) else lm_args.student_layers
    torch.manual_seed(config.seed)
    timings = {}

    source = resolve_model(lm_args.teacher_model_name_or_path)
    say(f"loading teacher {lm_args.teacher_model_name_or_path} ({source})")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source)
    teacher = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    timings["load_teacher"] = time.perf_counter() - start
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise SystemExit("hf-kd: the tokenizer has neither a pad nor an eos token to pad evaluation batches with.")

    train_texts, eval_texts = load_texts(lm_args)
    train_blocks = pack_blocks(tokenize_texts(tokenizer, train_texts, lm_args.block_size), lm_args.block_size)
    eval_ids = tokenize_texts(tokenizer, eval_texts, lm_args.block_size)
    if not train_blocks["input_ids"]:
        raise SystemExit(f"hf-kd: the training texts hold fewer than block_size={lm_args.block_size} tokens.")
    train = Dataset.from_dict(train_blocks)
    say(f"data: {len(train_texts)} training texts -> {len(train)} blocks of {lm_args.block_size} tokens; "
        f"{len(eval_texts)} held-out texts ({sum(len(x) for x in eval_ids)} tokens)")

    student = student_from_teacher(teacher, layers)
    baseline_init = copy.deepcopy(student) if lm_args.baseline else None
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (tied weights counted once)
    say(f"student: teacher layers {layers}, {n_params(student) / 1e6:.1f}M parameters "
        f"(teacher {n_params(teacher) / 1e6:.1f}M)")

    results: dict = {
        "teacher": lm_args.teacher_model_name_or_path,
        "teacher_path": source,
        "student_layers": layers,
        "dataset": lm_args.dataset_name,
        "train_texts": len(train_texts),
        "train_blocks": len(train),
        "block_size": lm_args.block_size,
        "eval_texts": len(eval_texts),
        "settings": {k: getattr(config, k) for k in ("kd_loss", "temperature", "alpha", "hidden_weight", "hidden_loss",
                                                    "learning_rate", "per_device_train_batch_size", "max_steps", "seed")},
        "perplexity": {},
        "seconds": timings,
    }

    def measure(name, model):
        start = time.perf_counter()
        result = perplexity(model, eval_ids, pad_id, lm_args.eval_batch_size)
        timings[f"eval_{name}"] = time.perf_counter() - start
        results["perplexity"][name] = result["perplexity"]
        results["eval_tokens"] = result["tokens"]
        say(f"perplexity {name}: {result['perplexity']:.2f} ({timings[f'eval_{name}']:.0f} s)")

    measure("teacher", teacher)
    measure("student_init", student)

    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=train,
        data_collator=default_data_collator, processing_class=tokenizer,
    )
    say("distilling")
    start = time.perf_counter()
    trainer.train()
    timings["distil"] = time.perf_counter() - start
    steps = trainer.state.global_step
    results["steps"] = steps
    trainer.save_model(config.output_dir)
    measure("distilled", student)

    if baseline_init is not None:
        # Same start, same steps, same schedule, same seed (so the same blocks in the same order).
        say(f"baseline: the same student, same start, {steps} steps, on the causal-LM loss alone")
        base_args = _plain_args(config, os.path.join(config.output_dir, "baseline"), report_to=[], push_to_hub=False,
                                eval_strategy="no", save_strategy="no", load_best_model_at_end=False, max_steps=steps)
        base_trainer = Trainer(model=baseline_init, args=base_args, train_dataset=train,
                               data_collator=default_data_collator, processing_class=tokenizer)
        start = time.perf_counter()
        base_trainer.train()
        timings["baseline"] = time.perf_counter() - start
        base_trainer.save_model(base_args.output_dir)
        measure("baseline", baseline_init)

    if trainer.is_world_process_zero():
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "results.md").write_text(results_markdown(results))
    say("\n" + results_markdown(results))
    return results


def results_markdown(results: dict) -> str:
    ppl = results["perplexity"]
    lines = [
        f"Teacher {results['teacher']}; student = teacher layers {results['student_layers']}; "
        f"{results.get('steps', 0)} steps of blocks of {results['block_size']} tokens from {results['dataset']}; "
        f"perplexity over {results['eval_texts']} held-out texts ({results.get('eval_tokens', 0)} predicted tokens).",
        "",
        "| model | perplexity |",
        "| --- | ---: |",
    ]
    names = {"teacher": "teacher", "student_init": "student at init", "distilled": "distilled student",
             "baseline": "baseline (LM loss only)"}
    lines += [f"| {names[k]} | {v:.2f} |" for k, v in ppl.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- command line
def parse_args(argv: list[str]) -> tuple[LMArguments, DistillationConfig]:
    from .cli import parse_recipe_args

    return parse_recipe_args((LMArguments, DistillationConfig), argv, "python -m hf_kd.lm_pipeline")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if ("-h" in argv or "--help" in argv) and "--config" not in argv:
        HfArgumentParser((LMArguments, DistillationConfig), prog="python -m hf_kd.lm_pipeline").print_help()
        return 0
    lm_args, config = parse_args(argv)
    run_causal_lm(lm_args, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
