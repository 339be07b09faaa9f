"""hf_kd.relations: each loss against a slow float64 loop over heads / pairs / triples, and its properties."""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from hf_kd.relations import (
    QKVCapture,
    batch_similarity_loss,
    find_qkv_modules,
    minilm_relation_loss,
    pool_examples,
    rkd_angle_loss,
    rkd_distance_loss,
    sample_relation_loss,
)


def lengths_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)


# --------------------------------------------------------------------------- MiniLM, the slow way
def minilm_reference(s_qkv, t_qkv, lengths, R):
    """Loop over examples, relation types, relation heads and query rows; only the first n tokens exist."""
    total, rows = 0.0, 0
    for b, n in enumerate(lengths):
        for q in range(n):
            row = 0.0
            for xs, xt in zip(s_qkv, t_qkv):
                for r in range(R):
                    dists = []
                    for x in (xt, xs):
                        x = x[b, :n].double()
                        d = x.shape[-1] // R
                        head = x[:, r * d:(r + 1) * d]
                        logits = [float(head[q] @ head[k]) / math.sqrt(d) for k in range(n)]
                        top = max(logits)
                        z = sum(math.exp(v - top) for v in logits)
                        dists.append([math.exp(v - top) / z for v in logits])
                    pt, ps = dists
                    row += sum(a * (math.log(a) - math.log(c)) for a, c in zip(pt, ps) if a > 0)
            total += row / (R * len(s_qkv))
            rows += 1
    return total / max(rows, 1)


def qkv(B, T, D, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(B, T, D, generator=g) for _ in range(3)]


@pytest.mark.parametrize("R", [1, 2, 4])
def test_minilm_matches_the_loop_with_different_widths(R):
    lengths = [6, 3, 5]
    s, t = qkv(3, 6, 8, 0), qkv(3, 6, 16, 1)
    ours = minilm_relation_loss(s, t, lengths_mask(lengths, 6), R)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(minilm_reference(s, t, lengths, R), rel=1e-5, abs=1e-7)


def test_minilm_widths_may_differ_between_q_k_and_v():
    """Grouped-query attention: key and value vectors narrower than the queries."""
    s = [torch.randn(2, 5, 8), torch.randn(2, 5, 4), torch.randn(2, 5, 4)]
    t = [torch.randn(2, 5, 16), torch.randn(2, 5, 8), torch.randn(2, 5, 8)]
    ours = minilm_relation_loss(s, t, None, 2)
    assert ours.item() == pytest.approx(minilm_reference(s, t, [5, 5], 2), rel=1e-5)


def test_minilm_is_zero_for_equal_relations_and_positive_otherwise():
    x = qkv(2, 5, 8, 0)
    mask = lengths_mask([5, 2], 5)
    assert minilm_relation_loss(x, [v.clone() for v in x], mask, 2).item() == pytest.approx(0.0, abs=1e-6)
    assert minilm_relation_loss(x, qkv(2, 5, 8, 1), mask, 2).item() > 1e-3


def test_minilm_padding_never_changes_it_even_when_it_holds_nan():
    s, t = qkv(2, 4, 8, 0), qkv(2, 4, 12, 1)
    base = minilm_relation_loss(s, t, lengths_mask([4, 3], 4), 4)
    # Two more padded positions holding garbage, one a NaN.
    pad = lambda xs, fill: [torch.cat([x, torch.full((2, 2, x.shape[-1]), fill)], 1) for x in xs]  # noqa: E731
    s_pad = [x.clone().requires_grad_() for x in pad(s, float("nan"))]
    padded = minilm_relation_loss(s_pad, pad(t, 1e30), lengths_mask([4, 3], 6), 4)
    assert padded.item() == pytest.approx(base.item(), rel=1e-6)
    padded.backward()
    assert all(torch.isfinite(x.grad).all() for x in s_pad)
    assert all((x.grad[:, 4:] == 0).all() for x in s_pad)


def test_minilm_normalizer_and_all_masked():
    s, t = qkv(2, 4, 8, 0), qkv(2, 4, 8, 1)
    mask = lengths_mask([4, 2], 4)
    assert minilm_relation_loss(s, t, mask, 2, normalizer=12.0).item() == pytest.approx(
        minilm_relation_loss(s, t, mask, 2).item() * 6 / 12, rel=1e-6
    )
    s = [x.requires_grad_() for x in s]
    zero = minilm_relation_loss(s, t, torch.zeros(2, 4, dtype=torch.bool), 2)
    zero.backward()
    assert zero.item() == 0.0 and all(torch.isfinite(x.grad).all() for x in s)


def test_minilm_refuses_relation_heads_that_do_not_divide_a_width():
    with pytest.raises(ValueError, match="does not divide the teacher's width 12"):
        minilm_relation_loss(qkv(1, 3, 8, 0), qkv(1, 3, 12, 1), None, 8)


# --------------------------------------------------------------------------- sample relations, the slow way
def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def rkd_distance_reference(s, t, keep):
    idx = [i for i in range(len(keep)) if keep[i]]
    pairs = [(i, j) for i in idx for j in idx if i != j]

    def psi(e):
        d = {(i, j): math.dist(e[i].double().tolist(), e[j].double().tolist()) for i, j in pairs}
        mu = sum(d.values()) / len(d)
        return {p: v / mu for p, v in d.items()}

    ps, pt = psi(s), psi(t)
    return sum(huber(ps[p] - pt[p]) for p in pairs) / len(pairs)


def rkd_angle_reference(s, t, keep):
    idx = [i for i in range(len(keep)) if keep[i]]
    triples = [(i, j, k) for i, j, k in itertools.permutations(idx, 3)]

    def cos_at_j(e, i, j, k):
        a, b = (e[i] - e[j]).double(), (e[k] - e[j]).double()
        return float(a @ b) / (float(a.norm()) * float(b.norm()))

    return sum(huber(cos_at_j(s, *x) - cos_at_j(t, *x)) for x in triples) / len(triples)


def similarity_reference(s, t, keep):
    idx = [i for i in range(len(keep)) if keep[i]]

    def g(e):
        rows = []
        for i in idx:
            row = [float(e[i].double() @ e[j].double()) for j in idx]
            norm = math.sqrt(sum(v * v for v in row))
            rows.append([v / norm for v in row])
        return rows

    gs, gt = g(s), g(t)
    n = len(idx)
    return sum((gs[a][b] - gt[a][b]) ** 2 for a in range(n) for b in range(n)) / n**2


REFERENCES = [
    (rkd_distance_loss, rkd_distance_reference),
    (rkd_angle_loss, rkd_angle_reference),
    (batch_similarity_loss, similarity_reference),
]


def embeddings(seed, B=6, Ds=5, Dt=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Ds, generator=g), 3 * torch.randn(B, Dt, generator=g)


@pytest.mark.parametrize("fn,reference", REFERENCES, ids=lambda f: getattr(f, "__name__", ""))
def test_sample_relations_match_the_loops_with_masked_rows(fn, reference):
    s, t = embeddings(0)
    keep = [True, False, True, True, False, True]
    ours = fn(s, t, torch.tensor(keep))
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(reference(s, t, keep), rel=1e-5, abs=1e-7)
    assert ours.item() > 1e-4  # the test compares something non-trivial


@pytest.mark.parametrize("fn", [f for f, _ in REFERENCES], ids=lambda f: f.__name__)
def test_sample_relations_are_zero_when_student_equals_teacher(fn):
    s, _ = embeddings(1)
    assert fn(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("fn", [f for f, _ in REFERENCES], ids=lambda f: f.__name__)
def test_padding_rows_never_change_sample_relations(fn):
    s, t = embeddings(2)
    base = fn(s, t)
    s_pad = torch.cat([s, torch.full((2, s.shape[1]), float("nan"))]).requires_grad_()
    t_pad = torch.cat([t, torch.full((2, t.shape[1]), 1e30)])
    mask = torch.tensor([True] * 6 + [False] * 2)
    perm = torch.tensor([6, 0, 1, 7, 2, 3, 4, 5])  # padding rows anywhere in the batch
    padded = fn(s_pad[perm], t_pad[perm], mask[perm])
    assert padded.item() == pytest.approx(base.item(), rel=1e-5)
    padded.backward()
    assert torch.isfinite(s_pad.grad).all() and (s_pad.grad[6:] == 0).all()


@pytest.mark.parametrize("fn", [rkd_distance_loss, rkd_angle_loss], ids=lambda f: f.__name__)
def test_rkd_is_invariant_to_scaling_either_embedding(fn):
    s, t = embeddings(3)
    base = fn(s, t).item()
    assert fn(7.5 * s, t).item() == pytest.approx(base, rel=1e-5)
    assert fn(s, 0.01 * t).item() == pytest.approx(base, rel=1e-5)


@pytest.mark.parametrize("kind", ["rkd_distance", "rkd_angle", "rkd", "similarity"])
def test_duplicate_examples_give_finite_gradients(kind):
    s, t = embeddings(4)
    s = torch.cat([s, s[:2]]).requires_grad_()  # two examples twice: distances 0 in the student
    t = torch.cat([t, t[:1], t[3:4]])
    loss = sample_relation_loss(s, t, kind=kind)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0


def test_all_duplicates_or_too_few_examples_give_zero():
    s = torch.ones(4, 3, requires_grad=True)
    t = torch.randn(4, 5)
    for kind in ("rkd_distance", "rkd_angle", "similarity"):
        loss = sample_relation_loss(s, t, torch.tensor([True, False, False, False]), kind=kind)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(s.grad).all()
    assert torch.isfinite(rkd_distance_loss(s, t)) and torch.isfinite(rkd_angle_loss(s, t))


def test_rkd_combines_distance_and_twice_the_angle():
    s, t = embeddings(5)
    expected = rkd_distance_loss(s, t) + 2 * rkd_angle_loss(s, t)
    assert sample_relation_loss(s, t, kind="rkd").item() == pytest.approx(expected.item(), rel=1e-6)


def test_pooling_first_valid_token_and_mean():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]])  # right padding, then left padding
    assert torch.equal(pool_examples(h, mask, "first"), torch.stack([h[0, 0], h[1, 2]]))
    assert torch.allclose(pool_examples(h, mask, "mean"), torch.stack([h[0, :2].mean(0), h[1, 2:].mean(0)]))


# --------------------------------------------------------------------------- hooks
def test_capture_reads_bert_qkv_and_removes_its_hooks():
    from conftest import forward_hooks, make_bert

    model = make_bert(layers=2, hidden=8, heads=2).eval()
    modules = find_qkv_modules(model, 2, [2], who="student")
    ids = torch.randint(5, 60, (2, 5))
    model(input_ids=ids, output_hidden_states=True)  # transformers installs its own output-capturing hooks
    before = forward_hooks(model)
    with QKVCapture(modules) as cap:
        assert all(m._forward_hooks for m in modules[2])
        out = model(input_ids=ids, output_hidden_states=True)
    q, k, v = cap.get(2)
    layer = model.bert.encoder.layer[1].attention.self
    h = out.hidden_states[1]  # the input of layer 2
    assert torch.allclose(q, layer.query(h)) and torch.allclose(k, layer.key(h)) and torch.allclose(v, layer.value(h))
    assert forward_hooks(model) == before
    assert all(not m._forward_hooks for m in modules[2])


def test_llama_projections_are_found_and_fused_ones_refused():
    from conftest import make_llama
    from transformers import GPT2Config, GPT2LMHeadModel

    llama = make_llama(layers=2)
    found = find_qkv_modules(llama, 2, [1, 2])
    assert found[2] == tuple(getattr(llama.model.layers[1].self_attn, n) for n in ("q_proj", "k_proj", "v_proj"))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ValueError, match="fused projections are not supported"):
        find_qkv_modules(gpt2, 2, [2], who="teacher")


# --------------------------------------------------------------------------- trainer wiring
def relation_args(tmp_path, **kw):
    from hf_kd import DistillationConfig

    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=2, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, alpha=0.5,
        attention_weight=1.0, attention_loss="minilm", layer_map=[[2, 3]], relation_weight=1.0,
    )
    base.update(kw)
    return DistillationConfig(**base)


def minilm_pair():
    """Teacher: 4 layers, width 64, 4 heads; student: 2 layers, width 32, 2 heads (4 relation heads divide both)."""
    from conftest import make_bert

    return make_bert(layers=4, hidden=64, heads=4, seed=1), make_bert(layers=2, hidden=32, heads=2, seed=2)


def fixed_dataset(n=8, pad_from=(10, 7, 5, 9, 10, 3, 8, 6)):
    from conftest import ListDataset, random_batch, rows_from_batch

    return ListDataset(rows_from_batch(random_batch("sequence_classification", batch=n, pad_from=list(pad_from))))


def qkv_by_hand(model, inputs, layer):
    """q, k, v of a BERT layer recomputed from the layer's input hidden state, without hooks."""
    out = model(**inputs, output_hidden_states=True)
    attn = model.bert.encoder.layer[layer - 1].attention.self
    h = out.hidden_states[layer - 1]  # (B, T, D) the input of that layer
    return [attn.query(h), attn.key(h), attn.value(h)], out.hidden_states[-1]


@pytest.mark.parametrize("kind", ["rkd", "similarity"])
def test_trainer_components_equal_the_functions_on_what_the_models_compute(tmp_path, kind):
    from conftest import random_batch

    teacher, student = minilm_pair()
    from hf_kd import DistillationTrainer

    args = relation_args(tmp_path, relation_loss=kind, relation_pooling="mean" if kind == "similarity" else "first")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    assert trainer.plan.minilm_relation_heads == 4  # the teacher's heads divide 64 and 32
    batch = random_batch("sequence_classification", batch=5, pad_from=[10, 6, 4, 8, 3])
    student.train()
    trainer.compute_loss(student, dict(batch))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    s_qkv, s_last = qkv_by_hand(student, inputs, 2)
    with torch.no_grad():
        t_qkv, t_last = qkv_by_hand(teacher, inputs, 3)
    mask = batch["attention_mask"].bool()
    expected = minilm_relation_loss(s_qkv, t_qkv, mask, 4)
    assert trainer.meter.sums["attention_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    if kind == "rkd":
        s_emb, t_emb = s_last[:, 0], t_last[:, 0]  # [CLS]: right padding, so the first token
        expected = rkd_distance_loss(s_emb, t_emb) + 2 * rkd_angle_loss(s_emb, t_emb)
    else:
        s_emb, t_emb = pool_examples(s_last, mask, "mean"), pool_examples(t_last, mask, "mean")
        expected = batch_similarity_loss(s_emb, t_emb)
    assert trainer.meter.sums["relation_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_minilm_and_relations_train_log_decrease_and_leave_no_hook(tmp_path):
    from conftest import forward_hooks

    from hf_kd import DistillationTrainer

    teacher, student = minilm_pair()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    # Random initial q/k/v give near-uniform relations, so the MiniLM loss starts small: weigh it up.
    args = relation_args(tmp_path, max_steps=6, learning_rate=2e-3, relation_loss="rkd", attention_weight=100.0)
    data = fixed_dataset()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  eval_dataset=data)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 6
    for name in ("attention_loss", "relation_loss", "kd_loss", "ce_loss"):
        assert all(math.isfinite(e[name]) for e in logs)
    for name in ("attention_loss", "relation_loss"):
        values = [e[name] for e in logs]
        assert all(b < a for a, b in zip(values, values[1:])), values
        assert values[-1] < 0.7 * values[0], values
    # No hook of ours is left on either model (transformers keeps its own output-capturing hooks).
    for model in (student, teacher):
        assert not [h for hooks in forward_hooks(model).values() for group in hooks for h in group
                    if getattr(h, "__module__", "") == "hf_kd.relations"]
        for trio in trainer.plan.minilm_modules["student" if model is student else "teacher"].values():
            assert all(not m._forward_hooks for m in trio)
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_relations_average_over_micro_batches_with_accumulation(tmp_path):
    """Batch-level: the logged relation loss is the mean of the two micro-batches' own relation losses."""
    from hf_kd import DistillationTrainer

    teacher, student = minilm_pair()
    args = relation_args(tmp_path, max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         train_sampling_strategy="sequential", attention_weight=0.0, relation_loss="rkd_distance")
    data = fixed_dataset()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    student.eval()  # dropout is 0 anyway; the forward passes below see the weights before the step
    expected = []
    with torch.no_grad():
        for rows in (data.rows[:4], data.rows[4:]):
            batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}
            s = student(**batch, output_hidden_states=True).hidden_states[-1][:, 0]
            t = teacher(**batch, output_hidden_states=True).hidden_states[-1][:, 0]
            expected.append(rkd_distance_loss(s, t).item())
    trainer.train()
    logged = trainer.state.log_history[0]["relation_loss"]
    assert logged == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_minilm_refusals_name_the_fix(tmp_path):
    from conftest import make_bert
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from hf_kd import DistillationTrainer, InputError

    teacher = make_bert(layers=4, hidden=16, heads=4, seed=1)
    student = make_bert(layers=2, hidden=6, heads=2, seed=2)  # 4 does not divide 6
    with pytest.raises(InputError, match="Set minilm_relation_heads to a common divisor"):
        DistillationTrainer(model=student, teacher_model=teacher, args=relation_args(tmp_path))
    with pytest.raises(InputError, match="minilm_relation_heads=3 does not divide"):
        DistillationTrainer(model=make_bert(layers=2, hidden=8, heads=2), teacher_model=teacher,
                            args=relation_args(tmp_path, minilm_relation_heads=3))
    cfg = dict(n_layer=2, n_embd=8, n_head=2, vocab_size=64, n_positions=16, pad_token_id=0)
    gpt2 = GPT2ForSequenceClassification(GPT2Config(**cfg))
    with pytest.raises(InputError, match="fused projections are not supported"):
        DistillationTrainer(model=GPT2ForSequenceClassification(GPT2Config(**cfg)), teacher_model=gpt2,
                            args=relation_args(tmp_path, layer_map="last"))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("relation_loss", "rkd_cosine", "relation_loss='rkd_cosine' is unknown"),
        ("relation_pooling", "cls", "relation_pooling='cls' is unknown"),
        ("relation_weight", -1.0, "relation_weight=-1.0 is negative"),
        ("minilm_relation_heads", 0, "minilm_relation_heads=0 must be a positive integer"),
    ],
)
def test_bad_relation_settings_are_refused(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        relation_args(tmp_path, **{field: value})


def test_relation_weight_alone_uses_the_teacher(tmp_path):
    args = relation_args(tmp_path, alpha=0.0, attention_weight=0.0, relation_weight=0.5)
    assert args.uses_relations and not args.uses_attention_maps


@pytest.mark.parametrize("task", ["causal_lm", "token_classification", "question_answering"])
def test_minilm_and_relations_for_other_tasks(tmp_path, task):
    """Llama's q_proj/k_proj/v_proj and BERT heads for token tasks and QA; token tasks pool by the mean."""
    from conftest import ListDataset, random_batch, rows_from_batch
    from test_trainer import task_pair

    from hf_kd import DistillationTrainer

    teacher, student = task_pair(task)  # widths 16 and 8, 4 and 2 heads: 4 relation heads divide both
    data = ListDataset(rows_from_batch(random_batch(task, batch=6, pad_from=[10, 7, 5, 9, 4, 8])))
    args = relation_args(tmp_path, layer_map="last", relation_loss="rkd", max_steps=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all(math.isfinite(e["attention_loss"]) and e["attention_loss"] > 0 for e in logs)
    assert all(math.isfinite(e["relation_loss"]) and e["relation_loss"] > 0 for e in logs)
