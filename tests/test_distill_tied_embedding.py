"""hf_kd.distill.tied_embedding: a student whose embedding is its head holds one (V, D) gradient in a step, and
gets the same gradient and the same training as without the saving."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ListDataset, random_batch, rows_from_batch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.distill.tied_embedding import sparse_embedding_grad, tied_embedding

V, D = 96, 16


def tied_llama(seed=0, tie=True, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      attn_implementation="eager", pad_token_id=0, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def make_trainer(tmp_path, student, teacher, chunk, **kw):
    batch = random_batch("causal_lm", batch=8, length=10, vocab=V, pad_from=[10, 7, 5, 9, 10, 3, 8, 6])
    settings = dict(output_dir=str(tmp_path / f"out{chunk}"), per_device_train_batch_size=4, max_steps=3,
                    report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, logit_chunk_size=chunk,
                    alpha=0.5, kd_loss="reverse_kl", optim="sgd", learning_rate=0.5, lr_scheduler_type="constant")
    args = DistillationConfig(**{**settings, **kw})
    return DistillationTrainer(model=student, teacher_model=teacher, args=args,
                               train_dataset=ListDataset(rows_from_batch(batch)))


def test_only_a_plain_embedding_shared_with_the_head_qualifies():
    model = tied_llama()
    assert tied_embedding(model) is model.model.embed_tokens
    assert tied_embedding(tied_llama(tie=False)) is None
    frozen = tied_llama()
    frozen.model.embed_tokens.weight.requires_grad_(False)
    assert tied_embedding(frozen) is None  # LoRA and other frozen embeddings: nothing to save
    normed = tied_llama()
    normed.model.embed_tokens.max_norm = 1.0  # max_norm renormalises rows in forward: left alone
    assert tied_embedding(normed) is None


@pytest.mark.parametrize("accumulate", [1, 2])
def test_training_a_tied_student_through_the_head_route_equals_training_on_the_full_logits(tmp_path, accumulate):
    """Three optimizer steps (SGD, lr 0.5: differences in the gradient show in the weights) with the route on and
    the saving used from its second batch, against the unchunked loss on the full logits (plain autograd)."""
    start, teacher = tied_llama(seed=1), tied_llama(seed=2, layers=3)
    results, sparse_seen = {}, []
    for chunk in (5, -1):
        student = copy.deepcopy(start)
        emb = student.model.embed_tokens
        emb.register_forward_pre_hook(lambda m, a: sparse_seen.append((chunk, m.sparse)))
        make_trainer(tmp_path, student, copy.deepcopy(teacher), chunk, gradient_accumulation_steps=accumulate,
                     per_device_train_batch_size=4 // accumulate).train()
        assert emb.sparse is False and student.lm_head.weight is emb.weight
        results[chunk] = {n: p.detach().clone() for n, p in student.named_parameters()}
    assert [s for c, s in sparse_seen if c == 5][0] is False  # the first batch checks the route: dense
    assert any(s for c, s in sparse_seen if c == 5) and not any(s for c, s in sparse_seen if c == -1)
    for name, p in results[-1].items():
        torch.testing.assert_close(results[5][name], p, rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(results[-1]["model.embed_tokens.weight"], start.model.embed_tokens.weight)


def test_the_step_makes_no_second_vocabulary_sized_gradient(tmp_path):
    """Counted with the profiler on the route's second batch (a dispatch mode would itself change how autograd
    accumulates): no dense embedding gradient (V, D) and no out-of-place sum of two; the weight's .grad is dense and
    equals autograd's on the full logits."""
    from torch.profiler import profile

    teacher = tied_llama(seed=2, layers=3)
    grads = {}
    for chunk in (5, -1):
        student = tied_llama(seed=1)
        trainer = make_trainer(tmp_path, student, teacher, chunk)
        batches = [trainer.data_collator([trainer.train_dataset[i] for i in range(j, j + 4)]) for j in (0, 4)]
        student.train()
        trainer.compute_loss(student, batches[0]).backward()  # the route's check
        student.zero_grad(set_to_none=True)
        with profile(record_shapes=True) as prof:
            trainer.compute_loss(student, batches[1]).backward()
        # a (V, D) result: the dense embedding gradient, or the sum of two gradients (add without out=; the
        # in-place dense += sparse shows as add with out=, a fourth input)
        made = {e.key: e.count for e in prof.key_averages(group_by_input_shape=True)
                if e.key == "aten::embedding_dense_backward"
                or (e.key == "aten::add" and e.input_shapes[:1] == [[V, D]] and len(e.input_shapes) == 3)}
        if chunk == 5:
            assert made == {}, made
        else:
            assert made.get("aten::embedding_dense_backward") == 1  # the full-logits path: the ordinary two
        grads[chunk] = student.lm_head.weight.grad
        assert grads[chunk].layout == torch.strided
    torch.testing.assert_close(grads[5], grads[-1], rtol=1e-4, atol=1e-7)


def test_a_backward_pass_that_skips_the_head_still_leaves_a_dense_gradient_once():
    """The hook that densifies a sparse .grad (a loss without the head term) fires once and goes."""
    model = tied_llama()
    emb = model.model.embed_tokens
    ids = torch.tensor([[1, 2, 3, 2]])
    with sparse_embedding_grad(emb):
        out = emb(ids)
    assert emb.sparse is False
    (out * 3).sum().backward()
    assert emb.weight.grad.layout == torch.strided
    expected = torch.zeros(V, D)
    expected[1], expected[2], expected[3] = 3.0, 6.0, 3.0
    torch.testing.assert_close(emb.weight.grad, expected)
    emb.weight.grad = None
    emb.sparse = True  # a user's own sparse embedding afterwards: the hook is gone
    emb(ids).sum().backward()
    assert emb.weight.grad.is_sparse


def test_untied_students_and_cut_vocabularies_keep_the_dense_embedding_gradient(tmp_path):
    from hf_kd.distill.head_route import HeadRoute

    route = HeadRoute(DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True), "causal_lm",
                      tied_llama(seed=2), tied_llama(seed=2), 1, chunk=5)
    route.active = True
    for student, classes, expected in ((tied_llama(tie=False), None, False), (tied_llama(), V - 4, False),
                                       (tied_llama(), None, True)):
        seen = []
        student.model.embed_tokens.register_forward_pre_hook(lambda m, a: seen.append(m.sparse))
        s_tap, _ = route.taps(student, type("B", (), {"kind": "single", "name": "one process"}))
        with route.student_forward(s_tap, student, classes):
            student(input_ids=torch.tensor([[1, 2, 3]]))
        assert seen == [expected] and route.into_grad is expected
        assert student.model.embed_tokens.sparse is False
