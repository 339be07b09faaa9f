"""Several teachers: the mixture target of `hf_kd.teachers`, and the trainer with a list of teachers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ListDataset, make_bert, random_batch, rows_from_batch
from safetensors.torch import load_file

from hf_kd import DistillationConfig, DistillationTrainer, InputError
from hf_kd.hub import CARD_NAME, PROVENANCE_NAME
from hf_kd.losses import logit_distillation_loss
from hf_kd.teachers import average_teacher_logits, normalise_weights


def make_args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
    )
    base.update(kw)
    return DistillationConfig(**base)


def _softmax(row, temperature, keep=None):
    keep = keep if keep is not None else [True] * len(row)
    top = max(v for v, k in zip(row, keep) if k)
    e = [math.exp((v - top) / temperature) if k else 0.0 for v, k in zip(row, keep)]
    total = sum(e)
    return [x / total for x in e]


def _divergence(p, q, kind, beta=0.5):
    """D between teacher distribution p and student q, written out with plain floats."""
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)  # noqa: E731
    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def _mixture_loss(student, teachers, weights, kind, temperature, keep=None):
    """Mean over rows of D(sum_i w_i softmax(z_i / T) || softmax(z_s / T)), one row at a time."""
    total = 0.0
    rows = student.tolist()
    for r, s_row in enumerate(rows):
        k = keep[r] if keep is not None else None
        p = [0.0] * len(s_row)
        for w, t in zip(weights, teachers):
            for c, v in enumerate(_softmax(t[r].tolist(), temperature, k)):
                p[c] += w * v
        total += _divergence(p, _softmax(s_row, temperature, k), kind)
    return total / len(rows)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_mixture_target_gives_the_kl_to_the_averaged_softened_probabilities(kind, temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, 5, generator=g) * 3
    teachers = [torch.randn(6, 5, generator=g) * 3 for _ in range(3)]
    weights = normalise_weights([1.0, 2.0, 5.0], 3)
    target = average_teacher_logits(teachers, weights, kind=kind, temperature=temperature)
    got = logit_distillation_loss(student, target, kind=kind, temperature=temperature)
    expected = _mixture_loss(student, teachers, weights, kind, temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # Not the same as distilling the averaged logits (the check above would pass for any target otherwise).
    naive = logit_distillation_loss(student, sum(w * t for w, t in zip(weights, teachers)), kind=kind, temperature=temperature)
    assert abs(naive.item() - expected) > 1e-3


def test_mixture_target_with_a_class_mask_averages_over_existing_classes_only():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(4, 7, generator=g)
    teachers = [torch.randn(4, 7, generator=g) * 2 for _ in range(2)]
    keep = torch.ones(4, 7, dtype=torch.bool)
    keep[1, 4:] = False  # QA: positions past the sequence are no answer
    keep[3, 2:] = False
    weights = [0.3, 0.7]
    target = average_teacher_logits(teachers, weights, kind="forward_kl", temperature=2.0, class_mask=keep)
    assert torch.isfinite(target).all()
    got = logit_distillation_loss(student, target, kind="forward_kl", temperature=2.0, class_mask=keep)
    expected = _mixture_loss(student, teachers, weights, "forward_kl", 2.0, keep=keep.tolist())
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_mse_target_is_the_weighted_average_of_the_logits():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    target = average_teacher_logits([a, b], [0.25, 0.75], kind="mse", temperature=4.0)
    for i in range(3):
        for c in range(4):
            assert target[i, c].item() == pytest.approx(0.25 * a[i, c].item() + 0.75 * b[i, c].item(), abs=1e-6)


def test_weights_are_normalised_and_default_to_equal():
    assert normalise_weights(None, 4) == [0.25] * 4
    assert normalise_weights([1, 3], 2) == [0.25, 0.75]
    with pytest.raises(ValueError, match="teacher_weights has 3 values for 2 teachers"):
        normalise_weights([1, 1, 1], 2)


@pytest.mark.parametrize("weights", [[-1.0, 2.0], [0.0, 0.0]])
def test_config_refuses_unusable_teacher_weights(tmp_path, weights):
    with pytest.raises(ValueError, match="teacher_weights"):
        make_args(tmp_path, teacher_weights=weights)


def _three_models():
    """Teacher 1, teacher 2, student; heads scaled so that their distributions differ well above rounding."""
    models = (make_bert(layers=4, hidden=16, heads=4, seed=1), make_bert(layers=3, hidden=12, heads=2, seed=3),
              make_bert(layers=2, hidden=8, heads=2, seed=2))
    with torch.no_grad():
        for m in models:
            m.classifier.weight.mul_(50)
    return models


def test_trainer_kd_loss_is_the_loss_against_the_weighted_mixture(tmp_path):
    t1, t2, student = _three_models()
    batch = random_batch("sequence_classification", batch=6)
    args = make_args(tmp_path, teacher_weights=[1.0, 3.0], temperature=2.0, alpha=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=[t1, t2], args=args,
                                  train_dataset=ListDataset(rows_from_batch(batch)))
    student.train()
    trainer.compute_loss(student, dict(batch))
    got = trainer.meter.sums["kd_loss"].item()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        s, a, b = student(**inputs).logits, t1(**inputs).logits, t2(**inputs).logits
    expected = _mixture_loss(s, [a, b], [0.25, 0.75], "forward_kl", 2.0)
    assert expected > 1e-4 and got == pytest.approx(expected, rel=1e-5)
    # Weight 0 for the second teacher is the first teacher alone.
    args0 = make_args(tmp_path, teacher_weights=[1.0, 0.0], temperature=2.0, alpha=1.0)
    trainer0 = DistillationTrainer(model=student, teacher_model=[t1, t2], args=args0,
                                   train_dataset=ListDataset(rows_from_batch(batch)))
    trainer0.compute_loss(student, dict(batch))
    alone = logit_distillation_loss(s, a, temperature=2.0).item()
    assert trainer0.meter.sums["kd_loss"].item() == pytest.approx(alone, rel=1e-5)


def test_every_teacher_frozen_absent_from_optimizer_and_the_card_lists_them(tmp_path):
    t1, t2, student = _three_models()
    before = [{k: v.clone() for k, v in t.state_dict().items()} for t in (t1, t2)]
    seen = []
    for t in (t1, t2):
        forward = t.forward
        t.forward = lambda *a, _f=forward, _t=t, **kw: (seen.append((_t.training, torch.is_grad_enabled())), _f(*a, **kw))[1]
    batch = random_batch("sequence_classification", batch=8)
    trainer = DistillationTrainer(model=student, teacher_model=[t1, t2], args=make_args(tmp_path, learning_rate=1e-2),
                                  train_dataset=ListDataset(rows_from_batch(batch)))
    t2.train()  # someone switches a teacher to training mode: it is put back in eval mode
    trainer.train()
    assert len(seen) == 4 and all(mode is False and grad is False for mode, grad in seen)
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for t, state in zip((t1, t2), before):
        assert not in_optimizer & {id(p) for p in t.parameters()}
        assert all(not p.requires_grad for p in t.parameters())
        assert all(torch.equal(v, state[k]) for k, v in t.state_dict().items())
    folder = tmp_path / "final"
    trainer.save_model(str(folder))
    assert set(load_file(str(folder / "model.safetensors"))) == set(student.state_dict())
    record = json.loads((folder / PROVENANCE_NAME).read_text())
    assert [t["class"] for t in record["teachers"]] == ["BertForSequenceClassification"] * 2
    assert [t["weight"] for t in record["teachers"]] == [0.5, 0.5]
    assert record["teachers"][0]["weights_sha256"] == record["teacher"]["weights_sha256"]
    assert record["teachers"][0]["weights_sha256"] != record["teachers"][1]["weights_sha256"]
    card = (folder / CARD_NAME).read_text()
    assert "teacher 1" in card and "teacher 2" in card and record["teachers"][1]["weights_sha256"] in card


def test_one_teacher_keeps_the_single_teacher_record(tmp_path):
    t1, _, student = _three_models()
    batch = random_batch("sequence_classification", batch=4)
    trainer = DistillationTrainer(model=student, teacher_model=[t1], args=make_args(tmp_path, max_steps=1),
                                  train_dataset=ListDataset(rows_from_batch(batch)))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    record = json.loads((tmp_path / "final" / PROVENANCE_NAME).read_text())
    assert "teachers" not in record and record["teacher"]["class"] == "BertForSequenceClassification"


def test_refuses_teachers_with_different_label_counts_naming_both(tmp_path):
    t1 = make_bert(layers=2, hidden=16, heads=4, num_labels=2, seed=1)
    t2 = make_bert(layers=2, hidden=16, heads=4, num_labels=3, seed=3)
    student = make_bert(layers=2, hidden=8, heads=2, seed=2)
    with pytest.raises(InputError, match=r"teacher 2 \(BertForSequenceClassification\) has 3 labels and teacher 1 .* has 2"):
        DistillationTrainer(model=student, teacher_model=[t1, t2], args=make_args(tmp_path))
    assert not (tmp_path / "out").exists()


def test_refuses_teachers_with_different_vocabularies(tmp_path):
    from transformers import BertForMaskedLM

    t1 = make_bert(BertForMaskedLM, layers=2, hidden=16, heads=4, vocab=64, seed=1)
    t2 = make_bert(BertForMaskedLM, layers=2, hidden=16, heads=4, vocab=80, seed=3)
    student = make_bert(BertForMaskedLM, layers=2, hidden=8, heads=2, vocab=64, seed=2)
    with pytest.raises(InputError, match="has 80 vocabulary tokens and teacher 1 .* has 64"):
        DistillationTrainer(model=student, teacher_model=[t1, t2], args=make_args(tmp_path))


@pytest.mark.parametrize("config", [dict(hidden_weight=1.0), dict(attention_weight=1.0)])
def test_refuses_hidden_and_attention_losses_with_several_teachers(tmp_path, config):
    t1, t2, student = _three_models()
    with pytest.raises(InputError, match="need a single teacher, and 2 are given"):
        DistillationTrainer(model=student, teacher_model=[t1, t2], args=make_args(tmp_path, **config))


def test_refuses_a_weight_count_other_than_the_teacher_count(tmp_path):
    t1, t2, student = _three_models()
    with pytest.raises(InputError, match="teacher_weights has 3 values for 2 teachers"):
        DistillationTrainer(model=student, teacher_model=[t1, t2], args=make_args(tmp_path, teacher_weights=[1, 1, 1]))
    with pytest.raises(InputError, match="empty list"):
        DistillationTrainer(model=student, teacher_model=[], args=make_args(tmp_path))
