"""Padding-free batches: `DataCollatorWithFlattening` packs the examples into one row (position_ids mark where
each starts; Transformers masks attention within each example). The trainer must give the same losses and the
same gradients as on the padded batch: no token is spent on padding, by the teacher or the student."""

import torch
from transformers import DataCollatorWithFlattening

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.tasks import logit_row_mask

from conftest import make_llama

LENGTHS = (5, 9, 3, 7)


def _batches():
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 64, (n,), generator=g).tolist()} for n in LENGTHS]
    packed = DataCollatorWithFlattening(return_position_ids=True)(rows)
    width = max(LENGTHS)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    padded = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return dict(packed), padded


def _loss_and_grads(batch, tmp_path, **settings):
    student, teacher = make_llama(layers=1, seed=2), make_llama(seed=1)
    args = DistillationConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **settings)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    student.train()
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return loss.detach(), grads, trainer


def test_packed_batch_gives_the_padded_batch_loss_and_gradients(tmp_path):
    packed, padded = _batches()
    assert packed["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in packed
    settings = dict(alpha=0.5, temperature=2.0, hidden_weight=1.0, attention_weight=0.0)
    loss_p, grads_p, trainer = _loss_and_grads(packed, tmp_path / "p", **settings)
    loss_d, grads_d, _ = _loss_and_grads(padded, tmp_path / "d", **settings)
    # the packed rows: every token but each example's first predicts the next one of the same example
    assert int(logit_row_mask(trainer.task, packed).sum()) == sum(n - 1 for n in LENGTHS)
    torch.testing.assert_close(loss_p, loss_d, rtol=1e-4, atol=1e-6)
    assert grads_p.keys() == grads_d.keys()
    for name in grads_p:
        torch.testing.assert_close(grads_p[name], grads_d[name], rtol=1e-3, atol=1e-6, msg=name)


def test_packing_without_position_ids_would_leak_across_examples(tmp_path):
    """The check above can fail: without position_ids the packed row is one long sequence, and the loss moves."""
    packed, padded = _batches()
    packed.pop("position_ids")
    loss_p, _, _ = _loss_and_grads(packed, tmp_path / "p", alpha=1.0)
    loss_d, _, _ = _loss_and_grads(padded, tmp_path / "d", alpha=1.0)
    assert not torch.allclose(loss_p, loss_d, rtol=1e-3)
