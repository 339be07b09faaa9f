"""Peak memory of the logit loss (forward + backward), unchunked vs chunked (hf_kd.chunked), on CPU.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/chunked_memory.py [--tokens 4096] [--vocab 32768] [--hidden 1024]

Each case runs in a fresh process: it builds its inputs (student and teacher hidden states and heads, and for
the "from logits" cases both models' fp32 logits), notes its resident memory, runs forward KL (T=2) and its
backward pass, and reports the process's peak resident memory (getrusage ru_maxrss) above that mark. With
MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB (set here), glibc maps and unmaps every tensor of 1 MiB or more on its
own, so resident memory follows the live tensors.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys

CASES = {
    "logits": "from full logits, unchunked (hf_kd.losses)",
    "logits_chunked": "from full logits, chunked (chunked_logit_distillation_loss)",
    "head": "through the heads, unchunked (logits made, then the loss)",
    "head_chunked": "through the heads, chunked (linear_head_loss)",
}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_case(case: str, n: int, v: int, d: int, chunk: int) -> float:
    import torch

    from hf_kd.chunked import chunked_logit_distillation_loss, linear_head_loss
    from hf_kd.losses import logit_distillation_loss

    torch.manual_seed(0)
    hs = torch.randn(n, d, requires_grad=True)
    ws = (torch.randn(v, d) / d**0.5).requires_grad_()
    ht, wt = torch.randn(n, d), torch.randn(v, d) / d**0.5
    kw = dict(kind="forward_kl", temperature=2.0)
    if case.startswith("logits"):
        with torch.no_grad():
            zs, zt = (hs @ ws.T).requires_grad_(), ht @ wt.T  # (N, V) the models' logits
    start = rss_mib()
    if case == "logits":
        logit_distillation_loss(zs, zt, **kw).backward()
    elif case == "logits_chunked":
        chunked_logit_distillation_loss(zs, zt, chunk_size=chunk, **kw).backward()
    elif case == "head":
        logit_distillation_loss(hs @ ws.T, ht @ wt.T, **kw).backward()
    else:
        linear_head_loss(hs, ws, ht, wt, chunk_size=chunk, **kw).loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return peak - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.case:
        print(run_case(a.case, a.tokens, a.vocab, a.hidden, a.chunk))
        return
    sizes = ["--tokens", str(a.tokens), "--vocab", str(a.vocab), "--hidden", str(a.hidden), "--chunk", str(a.chunk)]
    print(f"N={a.tokens} tokens, V={a.vocab}, D={a.hidden}, chunk={a.chunk}; "
          f"one fp32 (N, V) tensor = {a.tokens * a.vocab * 4 / 2**20:.0f} MiB")
    print("| loss + backward | peak MiB above the inputs |\n| --- | --- |")
    for case in a.cases:
        name = CASES[case]
        out = subprocess.run([sys.executable, __file__, *sizes, "--case", case], capture_output=True, text=True,
                             check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
        print(f"| {name} | {float(out.stdout.split()[-1]):.0f} |", flush=True)


if __name__ == "__main__":
    main()
