"""Where the resident memory of an on-policy step goes: hf_kd against trl.DistillationTrainer, event by event.

    python scripts/onpolicy_memory_trace.py            # both variants, one fresh process each
    python scripts/onpolicy_memory_trace.py --malloc fixed

Runs `bench.onpolicy_case` (the pair, prompts and settings of `scripts/bench.py --onpolicy`) for one warm-up and two
timed steps on one thread, and prints the resident set (MiB) at the events of the last step: its start, the start and
end of `loss.backward()`, the tied head/embedding weight's gradient hook (after its summed vocabulary x width gradient
is in .grad), the optimizer step and the step's end, and the step's highest resident set (sampled every 2 ms).
scripts/bench.py reports the peak; this says when it is reached and by what (docs/generation.md reads it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def trace(name: str) -> None:
    import torch
    import transformers
    from transformers import TrainerCallback

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench

    torch.set_num_threads(1)
    log: list[tuple[int, str, float]] = []
    step = [0]
    highest: dict[int, float] = {}  # the step's largest resident set, sampled every 2 ms by a thread
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            highest[step[0]] = max(highest.get(step[0], 0.0), rss_mib())

    threading.Thread(target=sample, daemon=True).start()

    def mark(what: str) -> None:
        log.append((step[0], what, rss_mib()))

    class Events(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            weight = model.get_input_embeddings().weight  # tied to the head in SmolLM2
            weight.register_post_accumulate_grad_hook(lambda p: mark(f"weight gradient {tuple(p.grad.shape)}"))

        def on_step_begin(self, args, state, control, **kwargs):
            step[0] = state.global_step
            mark("step begins")

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            mark("optimizer step")

        def on_step_end(self, args, state, control, **kwargs):
            mark("step ends")

    init = transformers.Trainer.__init__

    def with_events(self, *a, callbacks=None, **kw):
        init(self, *a, callbacks=list(callbacks or []) + [Events()], **kw)

    transformers.Trainer.__init__ = with_events
    backward = torch.Tensor.backward

    def traced_backward(self, *a, **kw):
        mark("loss.backward() begins")
        out = backward(self, *a, **kw)
        mark("loss.backward() ends")
        return out

    torch.Tensor.backward = traced_backward
    args = argparse.Namespace(warmup=1, steps=2, onpolicy_batch=4, onpolicy_layers=[10, 20, 30])
    bench.onpolicy_case(name, args, 16)
    done.set()
    last = max(s for s, _, _ in log)
    start = next(r for s, w, r in log if s == last and w == "step begins")
    for s, what, r in log:
        if s == last:
            print(f"{name:6s} {what:32s} {r:7.0f} MiB  ({r - start:+5.0f} from the step's start)", flush=True)
    top = highest[last]
    print(f"{name:6s} {'the step at its highest':32s} {top:7.0f} MiB  ({top - start:+5.0f})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--malloc", choices=("default", "fixed"), default="default",
                        help="fixed: glibc's mmap threshold at 1 MiB (MALLOC_MMAP_THRESHOLD_), "
                        "as bench.py --malloc fixed")
    parser.add_argument("--_variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._variant:
        trace(args._variant)
        return 0
    env = dict(os.environ)
    if args.malloc == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    for name in ("hf_kd", "trl"):
        done = subprocess.run([sys.executable, __file__, "--_variant", name], env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith(name)]
        print("\n".join(lines) if done.returncode == 0 else done.stderr[-2000:], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
