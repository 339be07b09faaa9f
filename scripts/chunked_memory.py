"""Peak memory of the logit loss, unchunked vs chunked (hf_kd.chunked), on CPU.

    OMP_NUM_THREADS=1 python scripts/chunked_memory.py [--tokens 4096] [--vocab 32768] [--hidden 1024]

For each way of computing forward KL (T=2) + its backward pass, torch.profiler records every CPU allocation
and free (profile_memory=True); the peak is the largest running total of allocated bytes (each operator's net allocation, in time order) above what existed
before the call (the inputs: hidden states, head weights, and for the "from logits" rows the logits).
"""

from __future__ import annotations

import argparse
import gc

import torch
from torch.profiler import ProfilerActivity, profile

from hf_kd.chunked import chunked_logit_distillation_loss, linear_head_loss
from hf_kd.losses import logit_distillation_loss


def peak_mib(fn) -> float:
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each operator's own net allocation (self), and the frees outside operators ("[memory]"), in time order.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    running = peak = 0
    for e in events:
        running += e.self_cpu_memory_usage
        peak = max(peak, running)
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=1024)
    a = parser.parse_args()
    n, v, d = a.tokens, a.vocab, a.hidden
    torch.manual_seed(0)
    hs = torch.randn(n, d, requires_grad=True)
    ws = (torch.randn(v, d) / d**0.5).requires_grad_()
    ht, wt = torch.randn(n, d), torch.randn(v, d) / d**0.5
    with torch.no_grad():
        zs0, zt = hs @ ws.T, ht @ wt.T  # (N, V) the models' logits, for the "from logits" rows
    zs = zs0.requires_grad_()
    kw = dict(kind="forward_kl", temperature=2.0)

    def logits_unchunked():
        logit_distillation_loss(zs, zt, **kw).backward()

    def logits_chunked():
        chunked_logit_distillation_loss(zs, zt, chunk_size=a.chunk, **kw).backward()

    def head_unchunked():
        logit_distillation_loss(hs @ ws.T, ht @ wt.T, **kw).backward()

    def head_chunked():
        linear_head_loss(hs, ws, ht, wt, chunk_size=a.chunk, **kw).loss.backward()

    fp32_logits = n * v * 4 / 2**20
    print(f"N={n} tokens, V={v}, D={d}, chunk={a.chunk}; one fp32 (N, V) tensor = {fp32_logits:.0f} MiB")
    print("| loss + backward | peak MiB above the inputs |\n| --- | --- |")
    for name, fn in (
        ("from full logits, unchunked (hf_kd.losses)", logits_unchunked),
        ("from full logits, chunked (chunked_logit_distillation_loss)", logits_chunked),
        ("through the heads, unchunked (logits made, then the loss)", head_unchunked),
        ("through the heads, chunked (linear_head_loss)", head_chunked),
    ):
        for t in (zs, hs, ws):
            t.grad = None
        print(f"| {name} | {peak_mib(fn):.0f} |")


if __name__ == "__main__":
    main()
