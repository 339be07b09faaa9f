"""scripts/bench.py compares like with like: its tutorial-style loss is the divergence hf_kd computes."""

import importlib.util
from pathlib import Path

import torch

from hf_kd.losses import logit_distillation_loss

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_loss_is_hf_kd_forward_kl_on_shifted_valid_positions():
    bench = _bench()
    torch.manual_seed(0)
    s, t = torch.randn(3, 7, 50) * 3, torch.randn(3, 7, 50) * 3
    labels = torch.randint(0, 50, (3, 7))
    labels[0, 4:] = -100
    labels[2, :3] = -100
    mask = labels[:, 1:] != -100  # position i predicts token i+1
    expected = logit_distillation_loss(s[:, :-1], t[:, :-1], mask, kind="forward_kl", temperature=1.0)
    got = bench.plain_kl(s, t, labels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # and it is a real divergence: zero for equal logits, larger for further ones
    assert bench.plain_kl(s, s, labels).abs() < 1e-6
    assert bench.plain_kl(s, 2 * t, labels) > got


def test_presets_meet_the_issue_sizes():
    """>= 32k vocabulary, >= 4k tokens a batch, and a teacher with >= 4x the student's parameters (the
    size at which the cached teacher must pay off). Built on the meta device: no memory, no time."""
    bench = _bench()
    for name in ("cpu", "cpu_deep", "gpu"):
        p = bench.PRESETS[name]
        assert p["vocab"] >= 32_000 and p["batch"] * p["length"] >= 4096
        teacher, student = bench.build_models(p, "meta")
        assert teacher.config.vocab_size == student.config.vocab_size == p["vocab"]
        assert bench.n_params(teacher) >= 4 * bench.n_params(student), name
    # cpu_deep: the same student as cpu, a deeper teacher (over a third of its parameters in its layers)
    assert {k: v for k, v in bench.PRESETS["cpu_deep"].items() if k.startswith("s_")} == \
        {k: v for k, v in bench.PRESETS["cpu"].items() if k.startswith("s_")}
    teacher, _ = bench.build_models(bench.PRESETS["cpu_deep"], "meta")
    vocab_params = teacher.model.embed_tokens.weight.numel() + teacher.lm_head.weight.numel()
    assert bench.n_params(teacher) - vocab_params > 0.35 * bench.n_params(teacher)


def test_trl_gkd_with_beta_0_is_the_same_divergence():
    """The TRL variant computes the same loss as hf_kd's forward KL (when trl is installed: hf_kd[bench])."""
    import pytest

    pytest.importorskip("trl")
    from trl.experimental.gkd import GKDTrainer

    torch.manual_seed(1)
    s, t = torch.randn(2, 6, 40) * 2, torch.randn(2, 6, 40) * 2
    labels = torch.randint(0, 40, (2, 6))
    labels[1, :2] = -100
    trl_loss = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=0.0, temperature=1.0)
    ours = logit_distillation_loss(s, t, labels != -100, kind="forward_kl", temperature=1.0)
    torch.testing.assert_close(trl_loss, ours, rtol=1e-5, atol=1e-6)


def test_bf16_runs_every_variant_alike(tmp_path):
    """--precision bf16 (the CUDA default): the teacher's weights in bf16, the student keeps fp32 master weights
    and runs its forward in autocast, as `bf16=True` training does; the Trainer variants get bf16=True."""
    bench = _bench()
    p = bench.PRESETS["smoke"]
    teacher, student = bench.build_models(p, "cpu", "bf16")
    assert {t.dtype for t in teacher.parameters()} == {torch.bfloat16}
    assert {t.dtype for t in student.parameters()} == {torch.float32}
    batch = bench.make_batch(p, "cpu")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    assert student(**inputs).logits.dtype == torch.float32
    bench.mixed(student, "bf16", "cpu")
    assert student(**inputs).logits.dtype == torch.bfloat16
    assert {t.dtype for t in student.parameters()} == {torch.float32}
    runner = bench.hf_kd_runner(teacher, student, 1e-4, str(tmp_path / "out"), precision="bf16")
    assert runner.trainer.args.bf16 and runner.trainer.args.teacher_dtype == "bfloat16"
