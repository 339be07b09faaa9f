"""What only a GPU shows, checked in one short run (seconds on an H100/H200; the test suite never needs a GPU).

    python scripts/gpu_check.py            # on a CUDA device; exits 1 if a check fails

1. The chunked losses through the lm_head on the device, fp32 (TF32 off), against the same losses on full
   logits in float64: value and gradients (hidden states, head weight) within 1e-5, relative.
2. The same under bf16 autocast (the head's matmul in bf16, softmaxes in fp32) against full bf16 logits
   through the unchunked loss: within bf16 rounding (2e-2 relative for gradients).
3. The cached top-k loss through the head against `topk_distillation_loss` on full logits, fp32.
4. `DistillationTrainer.train()` in bf16 (teacher_dtype bfloat16) and in fp16 (teacher_dtype float16, loss
   scaling), with gradient accumulation, on a Llama pair with a 32k vocabulary: the teacher stays frozen in
   its dtype on the device, is not in the optimizer and not saved; the student moves; every logged loss is
   finite.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, bool(ok), detail))
    print(f"[gpu_check] {'PASS' if ok else 'FAIL'} {name}  {detail}", flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def head_inputs(device, n=3000, ds=256, dt=512, vocab=32768, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hs = torch.randn(n, ds, generator=g).to(device)
    ws = (torch.randn(vocab, ds, generator=g) / ds**0.5).to(device)
    ht = torch.randn(n, dt, generator=g).to(device)
    wt = (torch.randn(vocab, dt, generator=g) * 2 / dt**0.5).to(device)
    mask = torch.rand(n, generator=g).to(device) > 0.1
    labels = torch.randint(0, vocab, (n,), generator=g).to(device)
    labels[torch.rand(n, generator=g).to(device) < 0.2] = -100
    return hs, ws, ht, wt, mask, labels


def check_chunked(device: str) -> None:
    from hf_kd.chunked import linear_head_loss
    from hf_kd.losses import cross_entropy_loss, logit_distillation_loss

    hs, ws, ht, wt, mask, labels = head_inputs(device)
    for kind, temperature in (("forward_kl", 1.0), ("reverse_kl", 2.0), ("jsd", 1.5)):
        h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        loss = linear_head_loss(h, w, ht, wt, mask, labels, kd_weight=0.7, ce_weight=0.3, kind=kind,
                                temperature=temperature, chunk_size=1024).loss
        loss.backward()
        h64, w64 = hs.double().requires_grad_(), ws.double().requires_grad_()
        s_logits, t_logits = h64 @ w64.T, ht.double() @ wt.double().T
        ref = 0.7 * logit_distillation_loss(s_logits, t_logits, mask, kind=kind, temperature=temperature) + \
            0.3 * cross_entropy_loss(s_logits, labels)
        ref.backward()
        errors = (rel(loss.detach(), ref.detach()), rel(h.grad, h64.grad), rel(w.grad, w64.grad))
        check(f"chunked fp32 {kind} T={temperature} vs float64 full logits", max(errors) < 1e-5,
              "value/grad h/grad W rel err " + " ".join(f"{e:.1e}" for e in errors))

    # bf16 autocast: the head's matmul in bf16, as a bf16 run computes it; the reference is the unchunked loss
    # on the same bf16 logits (upcast to fp32 inside the loss)
    for kind in ("forward_kl", "jsd"):
        h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        loss = linear_head_loss(h, w, ht.bfloat16(), wt.bfloat16(), mask, kind=kind, chunk_size=1024,
                                student_dtype=torch.bfloat16).loss
        loss.backward()
        hr, wr = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        ref = logit_distillation_loss(hr.bfloat16() @ wr.bfloat16().T, ht.bfloat16() @ wt.bfloat16().T, mask, kind=kind)
        ref.backward()
        errors = (rel(loss.detach(), ref.detach()), rel(h.grad, hr.grad), rel(w.grad, wr.grad))
        check(f"chunked bf16 {kind} vs unchunked on bf16 logits", errors[0] < 1e-3 and max(errors[1:]) < 2e-2,
              "value/grad h/grad W rel err " + " ".join(f"{e:.1e}" for e in errors))


def check_topk(device: str) -> None:
    from hf_kd.chunked import TopK, linear_head_loss
    from hf_kd.losses import topk_distillation_loss
    from hf_kd.teacher_cache import teacher_buckets

    hs, ws, ht, wt, mask, _ = head_inputs(device, seed=1)
    k, temperature = 64, 2.0
    with torch.no_grad():  # the buckets as `hf-kd cache-teacher` stores them
        ids, top, lse, rest = teacher_buckets((ht @ wt.T)[mask], k, temperature)
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss = linear_head_loss(h, w, mask=mask, teacher_topk=TopK(ids, top, lse, rest), temperature=temperature,
                            chunk_size=1024).loss
    loss.backward()
    hr, wr = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ref = topk_distillation_loss((hr @ wr.T)[mask], ids.long(), top, lse, rest, temperature=temperature)
    ref.backward()
    errors = (rel(loss.detach(), ref.detach()), rel(h.grad, hr.grad), rel(w.grad, wr.grad))
    check(f"cached top-{k} through the head vs topk_distillation_loss, fp32", max(errors) < 1e-5,
          "value/grad h/grad W rel err " + " ".join(f"{e:.1e}" for e in errors))


def check_training(device: str, precision: str) -> None:
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_kd import DistillationConfig, DistillationTrainer

    def llama(hidden, layers, seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0,
            tie_word_embeddings=False))

    teacher, student = llama(256, 4, 0), llama(128, 2, 1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 32000, (64, 128), generator=g)
    lengths = torch.randint(64, 129, (64,), generator=g)
    attention = (torch.arange(128)[None] < lengths[:, None]).long()
    ids = ids * attention  # right padding with pad id 0
    labels = ids.masked_fill(attention == 0, -100)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": attention.tolist(),
                              "labels": labels.tolist()})
    teacher_dtype = {"bf16": "bfloat16", "fp16": "float16"}[precision]
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    with tempfile.TemporaryDirectory() as out:
        args = DistillationConfig(
            output_dir=out, max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
            learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
            kd_loss="forward_kl", temperature=2.0, alpha=0.5, teacher_dtype=teacher_dtype, use_cpu=device == "cpu",
            **{precision: True},
        )
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
        trainer.train()
        t = trainer.teacher
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        t_params = list(t.parameters())
        trainer.save_model(out)
        saved = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    check(f"{precision} train: teacher on {device} in {teacher_dtype}",
          all(p.device.type == device and p.dtype == getattr(torch, teacher_dtype) for p in t_params),
          f"{t_params[0].device} {t_params[0].dtype}")
    check(f"{precision} train: teacher frozen and unchanged",
          not any(p.requires_grad for p in t_params)
          and all(torch.equal(v.float().cpu(), t_before[k].to(v.dtype).float()) for k, v in t.state_dict().items()))
    check(f"{precision} train: teacher not in the optimizer", not any(id(p) in in_optimizer for p in t_params))
    moved = sum(not torch.equal(v.cpu(), s_before[k]) for k, v in trainer.model.state_dict().items())
    check(f"{precision} train: the student's tensors moved", moved == len(s_before), f"{moved}/{len(s_before)}")
    finite = len(losses) == 6 and all(x == x and abs(x) < 1e4 for x in losses)
    check(f"{precision} train: every logged loss finite", finite, " ".join(f"{x:.3f}" for x in losses))
    student_bytes = sum(v.numel() * v.element_size() for v in trainer.model.state_dict().values())
    check(f"{precision} train: saved weights are the student's alone", 0.9 * student_bytes < saved < 1.1 * student_bytes,
          f"{saved / 2**20:.1f} MiB saved, student {student_bytes / 2**20:.1f} MiB")


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: to try the script out without a GPU (bf16 training only)")
    device = parser.parse_args().device
    if device == "cuda" and not torch.cuda.is_available():
        print("[gpu_check] no CUDA device (--device cpu tries the script out on the CPU)", flush=True)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks in true fp32
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"[gpu_check] {name}, torch {torch.__version__}", flush=True)
    check_chunked(device)
    check_topk(device)
    for precision in ("bf16", "fp16") if device == "cuda" else ("bf16",):
        check_training(device, precision)
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"\n[gpu_check] {len(RESULTS) - len(failed)}/{len(RESULTS)} passed" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
