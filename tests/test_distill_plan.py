"""hf_kd.distill.plan: which terms and layer pairs a run computes, and what it refuses."""

import pytest
from transformers import BertForMaskedLM, T5Config, T5ForConditionalGeneration

from conftest import make_bert, make_llama
from hf_kd import DistillationConfig, InputError
from hf_kd.distill.plan import LossPlan, build_plan, decoder_depth, pair_problems


def _args(tmp_path, **kw):
    return DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def test_uniform_map_pairs_every_student_layer_with_a_teacher_layer(tmp_path):
    student, teacher = make_bert(layers=2), make_bert(layers=4)
    plan = build_plan(student, teacher, _args(tmp_path, hidden_weight=1.0, attention_weight=1.0), "sequence_classification")
    assert plan.hidden_pairs == [(1, 2), (2, 4)]  # every other teacher layer, the last included
    assert plan.attention_pairs == [(1, 2), (2, 4)]  # attention maps start at layer 1
    assert plan.hidden and plan.attention_maps and not plan.minilm and plan.needs_teacher()
    assert plan.n_hidden_pairs == 2 and not plan.encoder_decoder


def test_logits_only_plan_has_no_layer_pairs(tmp_path):
    plan = build_plan(make_bert(layers=2), make_bert(layers=4), _args(tmp_path), "sequence_classification")
    assert plan.hidden_pairs == plan.attention_pairs == [] and not plan.hidden and plan.needs_teacher()
    cached = LossPlan(_args(tmp_path, alpha=0.0, hidden_weight=1.0), [])  # a cache's plan: no live pairs here
    assert not cached.hidden and cached.needs_teacher() is False


def test_every_problem_is_listed_at_once(tmp_path):
    student = make_bert(layers=2, num_labels=3)
    teacher = make_bert(cls=BertForMaskedLM, layers=4)
    with pytest.raises(InputError) as err:
        build_plan(student, teacher, _args(tmp_path, layer_map=[[5, 1]], hidden_weight=1.0), "sequence_classification")
    message = str(err.value)
    assert "solves sequence_classification but the teacher BertForMaskedLM solves masked_lm" in message
    assert "layer_map" in message and message.count("\n  - ") >= 2


def test_label_and_vocabulary_mismatches_are_refused(tmp_path):
    args = _args(tmp_path)
    labels = pair_problems(make_bert(num_labels=3), make_bert(num_labels=2), args, "sequence_classification")
    assert any("3 labels and the teacher 2" in p for p in labels)
    vocab = pair_problems(make_llama(vocab=64), make_llama(vocab=96), args, "causal_lm")
    assert not any("vocabulary" in p for p in vocab)  # hf_kd.distill.vocab decides (cut or refusal)


def test_minilm_finds_qkv_and_fixes_the_relation_heads(tmp_path):
    args = _args(tmp_path, attention_weight=1.0, attention_loss="minilm", layer_map=[[2, 4]])
    plan = build_plan(make_bert(layers=2), make_bert(layers=4), args, "sequence_classification")
    assert plan.minilm and plan.minilm_relation_heads == 4  # the teacher's heads
    assert set(plan.minilm_modules) == {"student", "teacher"} and set(plan.minilm_modules["teacher"]) == {4}
    with pytest.raises(InputError, match="minilm_relation_heads=3 does not divide"):
        build_plan(make_bert(layers=2), make_bert(layers=4), _args(tmp_path, attention_weight=1.0,
                   attention_loss="minilm", layer_map=[[2, 4]], minilm_relation_heads=3), "sequence_classification")


def _t5(layers, decoder_layers):
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=layers,
                                               num_decoder_layers=decoder_layers, num_heads=4))


def test_encoder_decoder_pairs_each_stack_with_its_own_map(tmp_path):
    student, teacher = _t5(1, 2), _t5(2, 4)
    assert decoder_depth(teacher.config) == 4
    args = _args(tmp_path, hidden_weight=1.0, layer_map=[[1, 2]], decoder_layer_map=[[1, 3], [2, 4]])
    plan = build_plan(student, teacher, args, "seq2seq_lm")
    assert plan.encoder_decoder and plan.hidden_pairs == [(1, 2)]
    assert plan.decoder_hidden_pairs == [(1, 3), (2, 4)] and plan.n_hidden_pairs == 3


def test_record_lists_only_the_fields_in_use(tmp_path):
    plan = build_plan(make_bert(layers=2), make_bert(layers=4), _args(tmp_path, hidden_weight=1.0), "sequence_classification")
    record = plan.record(projections=0)
    assert record["hidden_pairs"] == [[1, 2], [2, 4]] and record["projections"] == 0
    assert not any(k.startswith(("relation", "minilm", "decoder", "temperature_")) for k in record)
    scheduled = LossPlan(_args(tmp_path, temperature_schedule="linear", temperature_end=1.0), []).record(0)
    assert scheduled["temperature_schedule"] == "linear" and scheduled["temperature_end"] == 1.0
