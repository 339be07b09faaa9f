"""hf_kd.distill.targets: inputs vs targets, the causal shift, normalisers, layer stacks."""

from types import SimpleNamespace

import torch

from conftest import make_bert, make_llama, random_batch
from hf_kd import DistillationConfig
from hf_kd.distill.plan import LossPlan
from hf_kd.distill.targets import count_items, layer_stacks, logit_targets, split_inputs, takes_use_cache, window_counts


def test_split_inputs_drops_targets_and_cached_columns():
    batch = {"input_ids": torch.ones(2, 3), "labels": torch.zeros(2), "start_positions": torch.zeros(2),
             "kd_teacher_ids": torch.zeros(2, 4)}
    assert set(split_inputs("sequence_classification", batch, None)) == {"input_ids"}


def test_causal_lm_targets_are_shifted_by_one():
    batch = random_batch("causal_lm", batch=2, length=5)
    batch["labels"][0, 2] = -100
    out = SimpleNamespace(logits=torch.randn(2, 5, 64))
    t = logit_targets("causal_lm", batch, out, out)
    assert t.student[0].shape == (2, 4, 64) and torch.equal(t.student[0], out.logits[:, :-1])
    assert torch.equal(t.labels[0], batch["labels"][:, 1:])  # position i predicts token i + 1
    assert t.mask.shape == (2, 4) and not t.mask[0, 1]  # the ignored label at 2 masks position 1


def test_question_answering_targets_have_two_heads_and_a_class_mask():
    batch = random_batch("question_answering", batch=2, length=6, pad_from=[6, 4])
    out = SimpleNamespace(start_logits=torch.randn(2, 6), end_logits=torch.randn(2, 6))
    t = logit_targets("question_answering", batch, out, None)
    assert len(t.student) == 2 and t.teacher == [None, None] and t.mask is None
    assert torch.equal(t.class_mask, batch["attention_mask"].bool())


def test_counts_sum_over_micro_batches_to_the_counts_of_the_whole_batch():
    whole = random_batch("token_classification", batch=4, length=6, pad_from=[6, 3, 5, 2])
    halves = [{k: v[:2] for k, v in whole.items()}, {k: v[2:] for k, v in whole.items()}]
    full = count_items("token_classification", whole, "cpu")
    window = window_counts("token_classification", halves, "cpu")
    for key in ("logit", "label", "token", "pair"):
        assert window[key] == full[key], key
    assert window["micro_batch"] == 2


def test_unlabelled_rows_do_not_count_for_the_hard_label_loss():
    batch = random_batch("sequence_classification", batch=4)
    batch["labels"][:3] = -100
    counts = count_items("sequence_classification", batch, "cpu")
    assert counts["logit"] == 4 and counts["label"] == 1


def test_an_all_masked_window_divides_by_one():
    batch = random_batch("token_classification", batch=2, length=4)
    batch["labels"][:] = -100
    assert window_counts("token_classification", [batch], "cpu")["logit"] == 1


def test_layer_stacks_of_a_single_stack_model(tmp_path):
    args = DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, hidden_weight=1.0)
    plan = LossPlan(args, hidden_pairs=[(1, 2)])
    batch = random_batch("sequence_classification", batch=2, length=5, pad_from=[5, 3])
    out = SimpleNamespace(hidden_states=("h0", "h1", "h2"), attentions=None)
    counts = count_items("sequence_classification", batch, "cpu")
    [stack] = layer_stacks(plan, "sequence_classification", batch, out, out, counts)
    assert stack.hidden_pairs == [(1, 2)] and stack.s_hidden[1] == "h1" and torch.equal(stack.token, counts["token"])
    assert torch.equal(stack.mask, batch["attention_mask"].bool())


def test_decoders_take_use_cache_and_encoders_do_not():
    assert takes_use_cache([make_llama()]) and not takes_use_cache([make_llama(), make_bert()])
