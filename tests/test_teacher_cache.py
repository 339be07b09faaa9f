"""Cached teacher outputs: the top-k loss, the cache on disk, and training from it (hf_kd/teacher_cache.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import WORDS, make_bert, make_llama
from datasets import Dataset
from transformers import DataCollatorWithPadding

from hf_kd import DistillationConfig, DistillationTrainer, InputError, read_provenance
from hf_kd import teacher_cache as tc
from hf_kd.losses import logit_distillation_loss, topk_distillation_loss


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, logging_steps=1,
                report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, learning_rate=1e-2,
                temperature=2.0, alpha=0.7)
    base.update(kw)
    return DistillationConfig(**base)


def buckets(z_t, k, temperature):
    ids, top, lse, rest = tc.teacher_buckets(z_t.reshape(-1, z_t.shape[-1]), k, temperature)
    lead = z_t.shape[:-1]
    return ids.reshape(*lead, k), top.reshape(*lead, k), lse.reshape(lead), rest.reshape(lead)


# --------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_k_equal_to_vocabulary_gives_the_full_loss_and_gradient(kind, temperature):
    g = torch.Generator().manual_seed(0)
    z_s = (3 * torch.randn(3, 5, 11, generator=g)).requires_grad_(True)
    z_t = 3 * torch.randn(3, 5, 11, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3
    full = logit_distillation_loss(z_s, z_t, mask, kind=kind, temperature=temperature, jsd_beta=0.3)
    (g_full,) = torch.autograd.grad(full, z_s)
    cached = topk_distillation_loss(z_s, *buckets(z_t, 11, temperature), mask, kind=kind, temperature=temperature,
                                    jsd_beta=0.3)
    (g_cached,) = torch.autograd.grad(cached, z_s)
    assert abs(full.item() - cached.item()) < 1e-6
    torch.testing.assert_close(g_cached, g_full, atol=1e-6, rtol=0)


def _loop_loss(z_s, z_t, k, temperature, kind, beta=0.5):
    """Divergence on k + 1 buckets, written with loops and python floats."""
    total = 0.0
    for zs_row, zt_row in zip(z_s.tolist(), z_t.tolist()):
        def softmax(z):
            m = max(z)
            e = [math.exp((v - m) / temperature) for v in z]
            return [v / sum(e) for v in e]

        p_t, p_s = softmax(zt_row), softmax(zs_row)
        top = sorted(range(len(zt_row)), key=lambda c: -zt_row[c])[:k]
        bt = [p_t[c] for c in top] + [sum(p_t[c] for c in range(len(zt_row)) if c not in top)]
        bs = [p_s[c] for c in top] + [sum(p_s[c] for c in range(len(zs_row)) if c not in top)]
        for a, b in zip(bt, bs):
            if kind == "forward_kl":
                total += a * (math.log(a) - math.log(b))
            elif kind == "reverse_kl":
                total += b * (math.log(b) - math.log(a))
            else:
                m = beta * a + (1 - beta) * b
                total += beta * a * math.log(a / m) + (1 - beta) * b * math.log(b / m)
    return total / len(z_s)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_top_k_matches_a_loop_over_buckets(kind, k):
    g = torch.Generator().manual_seed(k)
    z_s, z_t = 2 * torch.randn(6, 9, generator=g), 2 * torch.randn(6, 9, generator=g)
    got = topk_distillation_loss(z_s, *buckets(z_t, k, 1.7), kind=kind, temperature=1.7, jsd_beta=0.5)
    assert got.item() == pytest.approx(_loop_loss(z_s.double(), z_t.double(), k, 1.7, kind), rel=1e-5, abs=1e-6)


def test_top_k_never_exceeds_the_full_divergence():
    # Merging classes into one bucket cannot increase a KL divergence (data processing inequality).
    g = torch.Generator().manual_seed(3)
    z_s, z_t = 3 * torch.randn(20, 30, generator=g), 3 * torch.randn(20, 30, generator=g)
    full = logit_distillation_loss(z_s, z_t, temperature=2.0)
    for k in (1, 4, 16, 29):
        assert topk_distillation_loss(z_s, *buckets(z_t, k, 2.0), temperature=2.0) <= full + 1e-6


def test_all_masked_rows_give_zero_with_finite_gradient():
    z_s = torch.randn(2, 3, 7, requires_grad=True)
    z_t = torch.randn(2, 3, 7)
    parts = list(buckets(z_t, 2, 1.0))
    parts[1] = torch.full_like(parts[1], float("nan"))  # garbage at masked rows reaches nothing
    loss = topk_distillation_loss(z_s, *parts, torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z_s.grad).all()


# --------------------------------------------------------------------------- data and caches
def classification_data(tokenizer, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(torch.randint(2, 9, (1,), generator=g)),),
                                                           generator=g).tolist()) for _ in range(n)]
    labels = torch.randint(0, 2, (n,), generator=g).tolist()
    ds = Dataset.from_dict({"text": texts, "labels": labels})
    return ds.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])


def lm_data(n=8, vocab=64, seed=0):
    """Rows of different lengths with some -100 labels (a prompt that is not trained on)."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(n):
        length = int(torch.randint(4, 11, (1,), generator=g))
        ids = torch.randint(5, vocab, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, 3, (1,), generator=g))
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * length)
        rows["labels"].append([-100] * prompt + ids[prompt:])
    rows["labels"][1] = [-100] * len(rows["labels"][1])  # a row with nothing to learn: no cached rows
    return Dataset.from_dict(rows)


def pad_collator(rows):
    """Right padding: input_ids 0, attention_mask 0, labels -100."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {}
    for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
        out[key] = torch.tensor([list(r[key]) + [fill] * (width - len(r[key])) for r in rows])
    return out


def train_one_step(student, teacher, args, dataset, collator):
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  data_collator=collator)
    trainer.train()
    return trainer


def assert_same_weights(a, b, atol=1e-6):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=name)


@pytest.fixture
def cls_setup(tokenizer, tmp_path):
    teacher = make_bert(layers=4, hidden=16, heads=4, seed=1)
    student = make_bert(layers=2, hidden=8, heads=2, seed=2)
    data = classification_data(tokenizer)
    collator = DataCollatorWithPadding(tokenizer)
    path = tmp_path / "cache"
    tc.cache_teacher_outputs(teacher, data, collator, top_k=64, temperature=2.0, output_dir=path,
                             hidden_layers=[2, 4], batch_size=5)
    return teacher, student, data, collator, path


def test_cache_on_disk_holds_the_teacher_targets(cls_setup):
    teacher, _, data, collator, path = cls_setup
    meta = tc.read_cache_metadata(path)
    assert (meta["top_k"], meta["num_classes"], meta["temperature"], meta["hidden_layers"]) == (2, 2, 2.0, [2, 4])
    cached = tc.load_cached_dataset(path)
    assert cached.column_names[: len(data.column_names)] == data.column_names and len(cached) == len(data)
    row = cached[3]
    with torch.no_grad():
        batch = collator([data[3]])
        out = teacher(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    z = out.logits[0]
    assert row[tc.IDS][0] == z.argsort(descending=True).tolist()
    torch.testing.assert_close(torch.tensor(row[tc.LOGITS][0]), z.sort(descending=True).values)
    assert row[tc.LSE][0] == pytest.approx(torch.logsumexp(z / 2.0, -1).item(), abs=1e-6)
    torch.testing.assert_close(torch.tensor(row[tc.hidden_column(4)]), out.hidden_states[4][0], atol=1e-2, rtol=1e-2)


def test_cached_step_equals_live_step_for_sequence_classification(cls_setup, tmp_path, monkeypatch):
    teacher, student, data, collator, path = cls_setup
    live = copy.deepcopy(student)
    train_one_step(live, teacher, make_args(tmp_path / "live", gradient_accumulation_steps=2), data, collator)

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded although teacher_cache is set")

    monkeypatch.setattr("hf_kd.teachers.load_teacher", no_teacher)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    args = make_args(tmp_path / "cached", gradient_accumulation_steps=2, teacher_cache=str(path))
    trainer = train_one_step(student, None, args, tc.load_cached_dataset(path), collator)
    assert trainer.teacher is None and not calls
    assert_same_weights(student, live)
    assert "kd_loss" in trainer.state.log_history[0]


def test_cached_hidden_states_train_like_the_live_teacher(cls_setup, tmp_path):
    teacher, student, data, collator, path = cls_setup
    live = copy.deepcopy(student)
    kw = dict(hidden_weight=1.0, layer_map=[[1, 2], [2, 4]])
    a = train_one_step(live, teacher, make_args(tmp_path / "live", **kw), data, collator)
    b = train_one_step(student, None, make_args(tmp_path / "cached", teacher_cache=str(path), **kw),
                       tc.load_cached_dataset(path), collator)
    assert len(b.projections) == 2
    # fp16 hidden states on disk: the same update up to fp16 rounding of the targets.
    assert_same_weights(student, live, atol=1e-4)
    assert_same_weights(b.projections, a.projections, atol=1e-4)


def test_cached_step_equals_live_step_for_causal_lm(tmp_path):
    teacher, student = make_llama(layers=3, hidden=16, heads=4, seed=1), make_llama(layers=2, hidden=8, heads=2, seed=2)
    data = lm_data()
    path = tmp_path / "cache"
    tc.cache_teacher_outputs(teacher, data, pad_collator, top_k=64, temperature=2.0, output_dir=path, batch_size=3)
    meta = tc.read_cache_metadata(path)
    # Causal LM: row i predicts token i+1, labels -100 and padding excluded.
    assert meta["logit_rows"] == sum(sum(x != -100 for x in r[1:]) for r in data["labels"])
    live = copy.deepcopy(student)
    kw = dict(per_device_train_batch_size=3, gradient_accumulation_steps=2, max_steps=2)
    train_one_step(live, teacher, make_args(tmp_path / "live", **kw), data, pad_collator)
    train_one_step(student, None, make_args(tmp_path / "cached", teacher_cache=str(path), **kw),
                   tc.load_cached_dataset(path), pad_collator)
    assert_same_weights(student, live)


@pytest.mark.parametrize("k", [8, 64])
def test_cached_step_through_the_head_equals_the_full_logit_cached_step(tmp_path, k):
    """logit_chunk_size > 0: the cached loss goes from the hidden states through the student's lm_head, chunk by
    chunk (closed form), and the student's full logits are never made after the first batch; the weights after
    two accumulated steps equal those of the unchunked cached loss (full logits, autograd)."""
    teacher, student = make_llama(layers=3, hidden=16, heads=4, seed=1), make_llama(layers=2, hidden=8, heads=2, seed=2)
    data = lm_data()
    path = tmp_path / "cache"
    tc.cache_teacher_outputs(teacher, data, pad_collator, top_k=k, temperature=2.0, output_dir=path, batch_size=3)
    full = copy.deepcopy(student)
    positions = []
    student.lm_head.register_forward_hook(lambda m, a, out: positions.append(out.shape[-2]))
    # SGD: Adam would turn rounding-level differences of near-zero gradients into steps of size lr
    kw = dict(per_device_train_batch_size=3, gradient_accumulation_steps=2, max_steps=2, optim="sgd", learning_rate=1.0)
    train_one_step(full, None, make_args(tmp_path / "full", teacher_cache=str(path), logit_chunk_size=-1, **kw),
                   tc.load_cached_dataset(path), pad_collator)
    trainer = train_one_step(student, None, make_args(tmp_path / "head", teacher_cache=str(path), logit_chunk_size=5,
                                                      **kw), tc.load_cached_dataset(path), pad_collator)
    assert trainer.head_route.active is True
    assert positions[1:] == [1] * (len(positions) - 1) and positions[0] > 1  # the first batch checks the head once
    assert_same_weights(student, full, atol=1e-5)
    assert any(not torch.equal(p, q) for p, q in zip(full.parameters(), make_llama(layers=2, hidden=8, heads=2,
                                                                                    seed=2).parameters()))


def test_small_k_trains_from_the_cache(tmp_path):
    teacher, student = make_llama(layers=3, seed=1), make_llama(layers=2, hidden=8, heads=2, seed=2)
    path = tmp_path / "cache"
    tc.cache_teacher_outputs(teacher, lm_data(), pad_collator, top_k=4, temperature=1.0, output_dir=path)
    cached = tc.load_cached_dataset(path)
    assert all(len(ids) == 4 for row in cached[tc.IDS] for ids in row)
    before = copy.deepcopy(student)
    train_one_step(student, None, make_args(tmp_path / "o", teacher_cache=str(path), temperature=1.0), cached,
                   pad_collator)
    assert any(not torch.equal(p, q) for p, q in zip(student.parameters(), before.parameters()))


# --------------------------------------------------------------------------- refusals
def refusal(tmp_path, path, student, dataset, collator, **kw):
    with pytest.raises(InputError) as err:
        DistillationTrainer(model=student, teacher_model=None, args=make_args(tmp_path, teacher_cache=str(path), **kw),
                            train_dataset=dataset, data_collator=collator)
    return str(err.value)


def test_refuses_another_temperature(cls_setup, tmp_path):
    _, student, _, collator, path = cls_setup
    message = refusal(tmp_path, path, student, tc.load_cached_dataset(path), collator, temperature=3.0)
    assert "temperature 2.0" in message and "temperature=3.0" in message


def test_refuses_a_dataset_without_the_cached_columns(cls_setup, tmp_path):
    _, student, data, collator, path = cls_setup
    assert "lacks the cached columns" in refusal(tmp_path, path, student, data, collator)


def test_refuses_a_layer_map_needing_uncached_hidden_states(cls_setup, tmp_path):
    _, student, _, collator, path = cls_setup
    message = refusal(tmp_path, path, student, tc.load_cached_dataset(path), collator, hidden_weight=1.0,
                      layer_map=[[1, 1], [2, 4]])
    assert "layers [1]" in message and "--cache_hidden" in message


def test_refuses_another_vocabulary_and_a_k_above_it(tmp_path):
    teacher = make_llama(layers=2, seed=1, vocab=64)
    path = tmp_path / "cache"
    tc.cache_teacher_outputs(teacher, lm_data(vocab=32), pad_collator, top_k=40, temperature=2.0, output_dir=path)
    message = refusal(tmp_path, path, make_llama(layers=1, seed=2, vocab=32), tc.load_cached_dataset(path), pad_collator)
    assert "32 classes" in message and "64" in message and "top_k=40" in message


def test_refuses_a_folder_that_is_not_a_cache(tmp_path):
    assert "not a folder written by" in refusal(tmp_path, tmp_path, make_bert(), None, None)


def test_refuses_a_dataset_changed_after_caching(cls_setup, tmp_path):
    _, student, _, collator, path = cls_setup
    cached = tc.load_cached_dataset(path)
    changed = cached.map(lambda r: {tc.IDS: r[tc.IDS] * 2, tc.LOGITS: r[tc.LOGITS] * 2, tc.LSE: r[tc.LSE] * 2,
                                    tc.REST: r[tc.REST] * 2})
    trainer = DistillationTrainer(model=student, teacher_model=None, args=make_args(tmp_path, teacher_cache=str(path)),
                                  train_dataset=changed, data_collator=collator)
    with pytest.raises(InputError, match="do not line up"):
        trainer.train()


def test_config_refuses_attention_and_mse_with_a_cache(tmp_path):
    with pytest.raises(ValueError, match="attention_weight=0"):
        make_args(tmp_path, teacher_cache="x", attention_weight=1.0)
    with pytest.raises(ValueError, match="top k"):
        make_args(tmp_path, teacher_cache="x", kd_loss="mse")


def test_trainer_wants_the_teacher_or_the_cache_not_both(cls_setup, tmp_path):
    teacher, student, _, collator, path = cls_setup
    with pytest.raises(ValueError, match="teacher_model=None"):
        DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, teacher_cache=str(path)))


def test_saved_student_names_the_cache_and_its_teacher(cls_setup, tmp_path):
    _, student, data, collator, path = cls_setup
    args = make_args(tmp_path, teacher_cache=str(path))
    trainer = train_one_step(student, None, args, tc.load_cached_dataset(path), collator)
    trainer.save_model(args.output_dir)
    record = read_provenance(args.output_dir)
    meta = tc.read_cache_metadata(path)
    assert record["teacher"]["weights_sha256"] == meta["teacher"]["weights_sha256"]
    assert str(path) in record["teacher"]["note"]
    assert str(path) in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(InputError, match="no teacher to evaluate"):
        trainer.evaluate_teacher()


# --------------------------------------------------------------------------- command line
from test_cli import tiny_recipe  # noqa: E402,F401 - the fixture: tiny models and a toy CSV in tmp_path


def test_cli_caches_the_recipe_teacher_and_distils_from_it_like_the_live_teacher(tiny_recipe, monkeypatch):
    from safetensors.torch import load_file

    from hf_kd.cli import main

    path, tmp, _ = tiny_recipe
    common = ["--config", str(path), "--attention_weight", "0", "--baseline", "false", "--report", "false",
              "--save_strategy", "no"]
    cache = tmp / "cache"
    assert main(["cache-teacher", *common, "--top_k", "64", "--cache_hidden", "true", "--output_dir", str(cache)]) == 0
    meta = tc.read_cache_metadata(cache)
    # 2 classes: top_k is capped, the cache holds the full distribution; uniform map of 2 student layers onto 4.
    assert (meta["top_k"], meta["rows"], meta["hidden_layers"]) == (2, 64, [2, 4])
    # The comparison below is exact with the logit loss alone (fp16 hidden states would blur it, see above).
    common += ["--hidden_weight", "0"]
    assert main(["distill", *common, "--output_dir", str(tmp / "live")]) == 0

    def no_teacher(*a, **k):
        raise AssertionError("the trainer loaded a teacher although teacher_cache is set")

    monkeypatch.setattr("hf_kd.teachers.load_teacher", no_teacher)
    assert main(["distill", *common, "--teacher_cache", str(cache), "--output_dir", str(tmp / "cached")]) == 0
    live, cached = (load_file(str(tmp / d / "model.safetensors")) for d in ("live", "cached"))
    for name, value in live.items():
        torch.testing.assert_close(cached[name], value, atol=1e-6, rtol=0, msg=name)
    assert str(cache) in read_provenance(str(tmp / "cached"))["teacher"]["note"]


def test_cli_refuses_a_cache_of_other_rows(tiny_recipe):
    from hf_kd.cli import main

    path, tmp, _ = tiny_recipe
    common = ["--config", str(path), "--attention_weight", "0", "--baseline", "false", "--report", "false"]
    assert main(["cache-teacher", *common, "--max_train_samples", "16", "--output_dir", str(tmp / "cache")]) == 0
    with pytest.raises(SystemExit, match="does not hold this recipe's training rows"):
        main(["distill", *common, "--hidden_weight", "0", "--teacher_cache", str(tmp / "cache")])
