"""hf_kd.pruning: planted dead units pruned exactly give the teacher's outputs, kept weights are copied bit for bit,
configs and shapes agree, and sizes the model cannot take are refused (issue 18)."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import build_tokenizer, forward_hooks, make_bert, random_batch
from transformers import (
    AutoModelForSequenceClassification,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_kd.errors import InputError
from hf_kd.pruning import (
    calibration_batches,
    check_sizes,
    choose_layers,
    family_of,
    layer_importance,
    measure_importance,
    prune_student,
    prune_width,
)


def calibration(n=2, vocab=64):
    return [{k: v for k, v in random_batch("causal_lm", batch=4, length=10, vocab=vocab, seed=s,
                                           pad_from=[10, 6, 8, 4]).items() if k != "labels"} for s in range(n)]


def inputs():
    return {k: v for k, v in random_batch("causal_lm", batch=3, length=9, seed=7, pad_from=[9, 5, 7]).items()
            if k != "labels"}


def make_gqa_llama(layers=3, hidden=16, heads=4, kv=2, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, attn_implementation="eager", pad_token_id=0,
    )).eval()


def close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol


# ---------------------------------------------------------------------------- planted dead units
def test_bert_dead_mlp_neurons_pruned_exactly_give_the_same_outputs():
    teacher = make_bert(layers=2, hidden=16, heads=4, seed=1).eval()  # intermediate 32
    dead = [[0, 3, 5, 9, 17, 20, 30, 31], [1, 2, 4, 8, 16, 22, 25, 28]]
    for block, cols in zip(teacher.bert.encoder.layer, dead):
        block.output.dense.weight.data[:, cols] = 0  # these neurons reach nothing
    student, plan = prune_student(teacher, calibration(), intermediate_size=24)
    assert plan.neurons == [[i for i in range(32) if i not in cols] for cols in dead]
    assert forward_hooks(teacher) == {}  # no hook left behind
    teacher.train()
    prune_student(teacher, calibration(), intermediate_size=24, layers=1)
    assert teacher.training and forward_hooks(teacher) == {}  # measured in eval mode, its mode given back
    x = inputs()
    with torch.no_grad():
        assert close(student.eval()(**x).logits, teacher(**x).logits)
        s_hidden = student(**x, output_hidden_states=True).hidden_states
        t_hidden = teacher(**x, output_hidden_states=True).hidden_states
    assert all(close(s, t) for s, t in zip(s_hidden, t_hidden))


def test_llama_dead_kv_groups_and_neurons_pruned_exactly_give_the_same_outputs():
    """Grouped-query heads (4 query heads, 2 key/value heads) go by whole groups."""
    teacher = make_gqa_llama(layers=2, heads=4, kv=2)
    d = 4  # head_dim = 16 / 4
    dead_groups = [1, 0]
    dead_neurons = [[2, 7, 11, 19, 23, 31, 0, 5], [3, 4, 9, 10, 12, 13, 26, 27]]
    for block, g, cols in zip(teacher.model.layers, dead_groups, dead_neurons):
        block.self_attn.o_proj.weight.data[:, g * 2 * d:(g + 1) * 2 * d] = 0  # both query heads of group g
        block.mlp.down_proj.weight.data[:, cols] = 0
    student, plan = prune_student(teacher, calibration(), num_attention_heads=2, intermediate_size=24)
    assert plan.kv_heads == [[0], [1]] and plan.heads == [[0, 1], [2, 3]]
    assert plan.neurons == [[i for i in range(32) if i not in cols] for cols in dead_neurons]
    assert student.config.num_attention_heads == 2 and student.config.num_key_value_heads == 1
    assert student.config.head_dim == d  # the teacher's head size, whatever the head count
    x = inputs()
    with torch.no_grad():
        assert close(student.eval()(**x).logits, teacher(**x).logits)


def test_a_layer_that_changes_nothing_is_the_one_dropped_and_outputs_stay_the_same():
    """Block Importance: a pre-norm block whose attention and MLP outputs are zero is the identity (importance 0)."""
    teacher = make_gqa_llama(layers=3)
    block = teacher.model.layers[1]
    block.self_attn.o_proj.weight.data.zero_()
    block.mlp.down_proj.weight.data.zero_()
    scores = layer_importance(teacher, calibration())
    assert abs(scores[1]) < 1e-6 and min(scores[0], scores[2]) > 1e-4
    assert choose_layers(scores, 2) == [1, 3]
    student, plan = prune_student(teacher, calibration(), layers=2)
    assert plan.layers == [1, 3] and student.config.num_hidden_layers == 2
    x = inputs()
    with torch.no_grad():
        assert close(student.eval()(**x).logits, teacher(**x).logits)


def test_planted_dead_heads_and_channels_of_a_bert_measure_zero_and_are_the_ones_removed():
    """In BERT the heads span the hidden size, so dropping heads drops hidden channels, and LayerNorm then
    normalises over fewer channels: the outputs change (that is not asserted); what is exact is which units go."""
    teacher = make_bert(layers=2, hidden=16, heads=4, seed=3).eval()
    dead_channels = [1, 6, 9, 14]
    for module in teacher.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.weight.data[dead_channels] = 0
            module.bias.data[dead_channels] = 0
    for block, head in zip(teacher.bert.encoder.layer, (2, 0)):
        block.attention.output.dense.weight.data[:, head * 4:(head + 1) * 4] = 0
    imp = measure_importance(teacher, calibration())
    assert all(float(imp.channels[c]) == 0 for c in dead_channels)
    assert float(imp.heads[0][2]) == 0 and float(imp.heads[1][0]) == 0
    student, plan = prune_student(teacher, calibration(), hidden_size=12)
    assert plan.channels == [c for c in range(16) if c not in dead_channels]
    assert plan.heads == [[0, 1, 3], [1, 2, 3]]


# ---------------------------------------------------------------------------- bit-identical copies, configs, shapes
def test_every_kept_bert_weight_is_copied_bit_for_bit():
    teacher = make_bert(layers=3, hidden=16, heads=4, seed=2).eval()
    student, plan = prune_student(teacher, calibration(), hidden_size=8, intermediate_size=20, layers=[1, 3])
    c = torch.tensor(plan.channels)
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight[:, c])
    assert torch.equal(student.bert.embeddings.position_embeddings.weight,
                       teacher.bert.embeddings.position_embeddings.weight[:, c])
    assert torch.equal(student.bert.embeddings.LayerNorm.weight, teacher.bert.embeddings.LayerNorm.weight[c])
    for k, t_index in enumerate(plan.layers):
        s, t = student.bert.encoder.layer[k], teacher.bert.encoder.layer[t_index - 1]
        q = torch.tensor([h * 4 + j for h in plan.heads[k] for j in range(4)])
        f = torch.tensor(plan.neurons[k])
        for name in ("query", "key", "value"):
            assert torch.equal(getattr(s.attention.self, name).weight, getattr(t.attention.self, name).weight[q][:, c])
            assert torch.equal(getattr(s.attention.self, name).bias, getattr(t.attention.self, name).bias[q])
        assert torch.equal(s.attention.output.dense.weight, t.attention.output.dense.weight[c][:, q])
        assert torch.equal(s.attention.output.dense.bias, t.attention.output.dense.bias[c])
        assert torch.equal(s.attention.output.LayerNorm.bias, t.attention.output.LayerNorm.bias[c])
        assert torch.equal(s.intermediate.dense.weight, t.intermediate.dense.weight[f][:, c])
        assert torch.equal(s.intermediate.dense.bias, t.intermediate.dense.bias[f])
        assert torch.equal(s.output.dense.weight, t.output.dense.weight[c][:, f])
        assert torch.equal(s.output.LayerNorm.weight, t.output.LayerNorm.weight[c])
    assert torch.equal(student.bert.pooler.dense.weight, teacher.bert.pooler.dense.weight[c][:, c])
    assert torch.equal(student.classifier.weight, teacher.classifier.weight[:, c])
    assert torch.equal(student.classifier.bias, teacher.classifier.bias)


def test_every_kept_llama_weight_is_copied_bit_for_bit():
    teacher = make_gqa_llama(layers=2, hidden=16, heads=4, kv=2)
    student, plan = prune_student(teacher, calibration(), hidden_size=12, num_attention_heads=2, intermediate_size=20)
    c = torch.tensor(plan.channels)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, c])
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight[:, c])
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight[c])
    for k in range(2):
        s, t = student.model.layers[k], teacher.model.layers[k]
        q = torch.tensor([h * 4 + j for h in plan.heads[k] for j in range(4)])
        kv = torch.tensor([h * 4 + j for h in plan.kv_heads[k] for j in range(4)])
        f = torch.tensor(plan.neurons[k])
        assert torch.equal(s.self_attn.q_proj.weight, t.self_attn.q_proj.weight[q][:, c])
        assert torch.equal(s.self_attn.k_proj.weight, t.self_attn.k_proj.weight[kv][:, c])
        assert torch.equal(s.self_attn.v_proj.weight, t.self_attn.v_proj.weight[kv][:, c])
        assert torch.equal(s.self_attn.o_proj.weight, t.self_attn.o_proj.weight[c][:, q])
        assert torch.equal(s.mlp.gate_proj.weight, t.mlp.gate_proj.weight[f][:, c])
        assert torch.equal(s.mlp.up_proj.weight, t.mlp.up_proj.weight[f][:, c])
        assert torch.equal(s.mlp.down_proj.weight, t.mlp.down_proj.weight[c][:, f])
        assert torch.equal(s.input_layernorm.weight, t.input_layernorm.weight[c])
        assert torch.equal(s.post_attention_layernorm.weight, t.post_attention_layernorm.weight[c])


def test_config_and_shapes_agree_and_the_folder_loads_with_from_pretrained(tmp_path):
    teacher = make_bert(layers=3, hidden=16, heads=4, seed=4).eval()
    student, plan = prune_student(teacher, calibration(), hidden_size=8, intermediate_size=12, layers=2)
    cfg = student.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.num_hidden_layers) == (8, 2, 12, 2)
    assert type(student) is type(teacher) and cfg.vocab_size == teacher.config.vocab_size
    fresh = type(teacher)(cfg)  # a model built from the config has exactly these shapes
    assert {n: p.shape for n, p in fresh.state_dict().items()} == {n: p.shape for n, p in student.state_dict().items()}
    student.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(loaded) is type(teacher)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), student.state_dict().values()))
    assert teacher.config.hidden_size == 16 and len(teacher.bert.encoder.layer) == 3  # the teacher is untouched


def test_tied_output_embeddings_stay_tied():
    torch.manual_seed(0)
    teacher = make_bert(cls=BertForMaskedLM, layers=2, hidden=16, heads=4, seed=5).eval()
    student, _ = prune_student(teacher, calibration(), hidden_size=8)
    assert student.cls.predictions.decoder.weight.data_ptr() == student.bert.embeddings.word_embeddings.weight.data_ptr()


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("sizes, message", [
    ({"hidden_size": 32}, "above the teacher's 16"),
    ({"intermediate_size": 64}, "above the teacher's 32"),
    ({"num_attention_heads": 8}, "above the teacher's 4"),
    ({"hidden_size": 10}, "multiple of 4"),
    ({"hidden_size": 12, "num_attention_heads": 2}, "hidden_size = 4 x num_attention_heads"),
    ({"intermediate_size": 0}, "positive integer"),
])
def test_bert_sizes_it_cannot_take_are_refused(sizes, message):
    teacher = make_bert(layers=2, hidden=16, heads=4)
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        prune_student(teacher, calibration(), **sizes)


def test_llama_heads_that_do_not_divide_into_groups_are_refused():
    teacher = make_gqa_llama(heads=4, kv=2)
    with pytest.raises(InputError, match="does not divide into the teacher's key/value groups of 2"):
        prune_student(teacher, calibration(), num_attention_heads=3)
    with pytest.raises(InputError, match="layers=5 is above the teacher's 3"):
        prune_student(teacher, calibration(), layers=5)


def test_an_architecture_it_does_not_know_is_refused():
    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=64, dim=16, n_layers=2, n_heads=4,
                                                                 hidden_dim=32, max_position_embeddings=32))
    with pytest.raises(InputError, match="BERT-style encoders .* Llama-style decoders"):
        family_of(model)


def test_sizes_are_checked_before_anything_is_measured():
    teacher = make_bert(layers=2, hidden=16, heads=4)
    with pytest.raises(InputError):
        prune_width(teacher, batches=[], hidden_size=20)  # no calibration needed to refuse
    assert check_sizes({"hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 4,
                        "intermediate_size": 32, "layers": 2}, family_of(teacher), hidden_size=8)["num_attention_heads"] == 2


# ---------------------------------------------------------------------------- calibration and the command
def test_calibration_batches_pad_and_mask_and_refuse_empty_text():
    tok = build_tokenizer()
    batches = calibration_batches(tok, ["good film", "a very dull plot was not fun", ""], batch_size=2)
    assert len(batches) == 1 and batches[0]["input_ids"].shape[0] == 2
    assert batches[0]["attention_mask"].sum(1).tolist() == [4, 9]
    with pytest.raises(InputError, match="no text"):
        calibration_batches(tok, ["", "  "])


def test_init_student_prune_writes_a_plain_transformers_folder(tmp_path, capsys):
    from hf_kd.cli import main

    teacher_dir, out = tmp_path / "teacher", tmp_path / "student"
    teacher = make_bert(layers=3, hidden=16, heads=4, seed=6)
    teacher.save_pretrained(teacher_dir)
    build_tokenizer().save_pretrained(teacher_dir)
    data = tmp_path / "calib.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([["good film very fun"], ["a dull plot"], ["the acting was not great"], ["superb story"]])
    code = main(["init-student", "--teacher", str(teacher_dir), "--prune", "width", "--hidden_size", "8",
                 "--intermediate_size", "12", "--layers", "2", "--calibration", str(data), "--output_dir", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "pruned" in printed and "2 of 3 layers" in printed
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert (loaded.config.hidden_size, loaded.config.num_attention_heads, loaded.config.num_hidden_layers) == (8, 2, 2)
    assert (out / "tokenizer.json").is_file() and (out / "hf_kd_pruning.json").is_file()


def test_init_student_prune_refuses_before_writing(tmp_path):
    from hf_kd.cli import main

    teacher_dir, out = tmp_path / "teacher", tmp_path / "student"
    make_bert(layers=2, hidden=16, heads=4).save_pretrained(teacher_dir)
    build_tokenizer().save_pretrained(teacher_dir)
    data = tmp_path / "calib.txt"
    data.write_text("good film\nbad plot\n")
    with pytest.raises(SystemExit, match="above the teacher's 16"):
        main(["init-student", "--teacher", str(teacher_dir), "--prune", "width", "--hidden_size", "64",
              "--calibration", str(data), "--output_dir", str(out)])
    assert not out.exists()


def test_a_recipes_student_prune_prunes_the_teacher_on_the_training_rows():
    from datasets import Dataset

    from hf_kd.apps.arguments import ModelArguments
    from hf_kd.apps.models import make_student

    tok = build_tokenizer()
    texts = ["good film very fun", "a dull plot", "the acting was not great", "superb story", "bad and boring"] * 4
    train = Dataset.from_dict(dict(tok(texts)))
    teacher = make_bert(layers=3, hidden=16, heads=4, vocab=len(tok), seed=8)
    args = ModelArguments(teacher_model_name_or_path="t", student_prune="{hidden_size: 8, layers: 2, calibration_samples: 12}")
    student, made = make_student(args, teacher, train=train, tokenizer=tok)
    assert (student.config.hidden_size, student.config.num_attention_heads, student.config.num_hidden_layers) == (8, 2, 2)
    assert "pruned by importance on 12 training rows" in made
    with pytest.raises(ValueError, match="student_prune has no key 'hidden'"):
        ModelArguments(teacher_model_name_or_path="t", student_prune="{hidden: 8}")
    with pytest.raises(ValueError, match="student_prune .* alone"):
        ModelArguments(teacher_model_name_or_path="t", student_prune="{hidden_size: 8}", student_layers="2")
