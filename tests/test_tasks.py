"""Every task end to end: the trainer finds each task's logits and masks, and the encoder-decoder layer maps.

Each kd_loss the trainer logs is compared with `reference_kd`, a loop over positions written from the
task's definition (which rows count, the causal shift, the seq2seq decoder inputs), not from hf_kd.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import WORDS, ListDataset, build_tokenizer, make_bert, make_llama, random_batch, rows_from_batch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BartConfig,
    BartForConditionalGeneration,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    DataCollatorForLanguageModeling,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.cli import main
from hf_kd import InputError
from hf_kd.apps.arguments import DataArguments
from hf_kd.apps.data import TOKENIZERS
from hf_kd.apps.evaluation import METRICS

VOCAB = 64
PAD = 0
DECODER_START = 0


def make_t5(layers, decoder_layers, width, heads, seed):
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=VOCAB, d_model=width, d_ff=2 * width, d_kv=4, num_layers=layers, num_decoder_layers=decoder_layers,
        num_heads=heads, dropout_rate=0.0, pad_token_id=PAD, eos_token_id=1, decoder_start_token_id=DECODER_START,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    return T5ForConditionalGeneration(cfg)


def make_bart(layers, decoder_layers, width, heads, seed):
    torch.manual_seed(seed)
    cfg = BartConfig(
        vocab_size=VOCAB, d_model=width, encoder_layers=layers, decoder_layers=decoder_layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=2 * width,
        decoder_ffn_dim=2 * width, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=PAD, bos_token_id=2, eos_token_id=1, decoder_start_token_id=DECODER_START,
        forced_eos_token_id=None, tie_word_embeddings=False, attn_implementation="eager",
    )
    return BartForConditionalGeneration(cfg)


BERT_TASKS = {
    "sequence_classification": (BertForSequenceClassification, AutoModelForSequenceClassification),
    "token_classification": (BertForTokenClassification, AutoModelForTokenClassification),
    "question_answering": (BertForQuestionAnswering, AutoModelForQuestionAnswering),
    "masked_lm": (BertForMaskedLM, AutoModelForMaskedLM),
}
AUTO = {**{k: v[1] for k, v in BERT_TASKS.items()}, "causal_lm": AutoModelForCausalLM, "seq2seq_lm": AutoModelForSeq2SeqLM}
TASKS = [*BERT_TASKS, "causal_lm", "seq2seq_lm"]


def pair(task, arch="t5"):
    """(teacher, student): the student shallower and narrower, with fewer heads; the teacher's logits are
    scaled to a standard deviation near 3 (a random head gives near-uniform outputs, nothing to learn)."""
    if task == "causal_lm":
        teacher, student = make_llama(layers=4, hidden=16, heads=4, seed=1), make_llama(layers=2, hidden=8, heads=2, seed=2)
    elif task == "seq2seq_lm":
        make = make_t5 if arch == "t5" else make_bart
        teacher, student = make(3, 4, 16, 4, seed=1), make(2, 2, 8, 2, seed=2)
    else:
        cls = BERT_TASKS[task][0]
        extra = {"tie_word_embeddings": False} if task == "masked_lm" else {}
        teacher = make_bert(cls, layers=4, hidden=16, heads=4, seed=1, **extra)
        student = make_bert(cls, layers=2, hidden=8, heads=2, seed=2, **extra)
    head = getattr(teacher, "classifier", None) or getattr(teacher, "qa_outputs", None) or teacher.get_output_embeddings()
    if head.weight.data_ptr() == teacher.get_input_embeddings().weight.data_ptr():  # tied (T5): scale the head alone
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    with torch.no_grad():
        out = teacher(**model_inputs(task, task_batch(task)))
        spread = (out.start_logits if task == "question_answering" else out.logits).float().std()
        head.weight.mul_(3 / spread)
        if head.bias is not None:
            head.bias.mul_(3 / spread)
    return teacher, student


def seq2seq_batch(batch=6, source=9, target=7, seed=0, src_from=(9, 6, 3, 8, 5, 9), tgt_from=(7, 4, 2, 6, 7, 1)):
    """Right-padded sources (attention_mask) and targets (labels -100 past each target's end)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, source), generator=g)
    mask = torch.ones(batch, source, dtype=torch.long)
    labels = torch.randint(3, VOCAB, (batch, target), generator=g)
    for i in range(batch):
        ids[i, src_from[i]:] = PAD
        mask[i, src_from[i]:] = 0
        labels[i, tgt_from[i]:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def task_batch(task, unlabelled=False):
    if task == "seq2seq_lm":
        return seq2seq_batch()
    batch = random_batch(task, batch=6, length=10, vocab=VOCAB, pad_from=[10, 7, 3, 9, 5, 10], seed=4)
    if task in ("token_classification", "causal_lm"):
        batch["labels"][1, :2] = -100  # unlabelled positions inside a sequence (e.g. a prompt, a sub-word)
    if unlabelled:
        batch.pop("labels")
    return batch


def make_args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, max_steps=1, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, learning_rate=1e-2,
        lr_scheduler_type="constant",
    )
    base.update(kw)
    return DistillationConfig(**base)


# ------------------------------------------------------------------ independent reference
def kl(teacher_row, student_row, T):
    """KL(softmax(t/T) || softmax(s/T)) of two 1-D logit vectors, in float64."""
    p = torch.softmax(teacher_row.double() / T, 0)
    return float((p * (torch.log_softmax(teacher_row.double() / T, 0) - torch.log_softmax(student_row.double() / T, 0))).sum())


def shift_right(labels):
    """Decoder inputs from seq2seq labels: the start token, then the labels one step late, -100 read as padding."""
    out = torch.full_like(labels, PAD)
    out[:, 0] = DECODER_START
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill(out == -100, PAD)


def model_inputs(task, batch):
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}
    if task == "seq2seq_lm":
        inputs["decoder_input_ids"] = shift_right(batch["labels"])
    return inputs


@torch.no_grad()
def reference_kd(task, student, teacher, batch, T):
    """Mean over the task's valid rows of KL(teacher || student) at temperature T, one position at a time."""
    inputs = model_inputs(task, batch)
    s, t = student(**inputs), teacher(**inputs)
    attention = batch["attention_mask"]
    labels = batch.get("labels")
    terms = []
    if task == "sequence_classification":
        terms = [kl(t.logits[b], s.logits[b], T) for b in range(len(attention))]
    elif task == "question_answering":  # two heads; a row's classes are its non-padding positions
        heads = []
        for s_logits, t_logits in ((s.start_logits, t.start_logits), (s.end_logits, t.end_logits)):
            rows = [kl(t_logits[b][attention[b] == 1], s_logits[b][attention[b] == 1], T) for b in range(len(attention))]
            heads.append(sum(rows) / len(rows))
        return sum(heads) / 2
    else:
        for b in range(attention.shape[0]):
            for i in range(s.logits.shape[1]):
                if task == "causal_lm":  # logits at i predict token i + 1
                    valid = i + 1 < attention.shape[1] and (
                        labels[b, i + 1] != -100 if labels is not None else attention[b, i + 1] == 1
                    )
                elif labels is not None:  # token classification, masked LM with labels, seq2seq
                    valid = labels[b, i] != -100
                else:  # masked LM on unlabelled text: every real token
                    valid = attention[b, i] == 1
                if valid:
                    terms.append(kl(t.logits[b, i], s.logits[b, i], T))
    return sum(terms) / len(terms)


# ------------------------------------------------------------------ every task end to end
@pytest.mark.parametrize("task", TASKS)
def test_each_task_distils_end_to_end(tmp_path, task):
    """Logged kd_loss = the reference on the same batch; the student gets closer; the teacher does not move;
    the saved student loads with the task's Auto class."""
    teacher, student = pair(task)
    batch = task_batch(task)
    initial = copy.deepcopy(student)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    args = make_args(tmp_path, max_steps=8, alpha=0.8, temperature=2.0, hidden_weight=0.5, attention_weight=0.5)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=ListDataset(rows_from_batch(batch))
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 8
    assert {"kd_loss", "ce_loss", "hidden_loss", "attention_loss"} <= logs[0].keys()
    # One batch per step holds every row: the first step's kd_loss is the untrained student's on this batch.
    before = reference_kd(task, initial, teacher, batch, T=2.0)
    assert logs[0]["kd_loss"] == pytest.approx(before, rel=1e-5)
    after = reference_kd(task, student.cpu(), teacher, batch, T=2.0)
    assert after < before, (before, after)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    trainer.save_model(str(tmp_path / "student"))
    loaded = AUTO[task].from_pretrained(str(tmp_path / "student"))
    assert type(loaded) is type(student)
    inputs = model_inputs(task, batch)
    with torch.no_grad():
        out_a, out_b = loaded(**inputs), student(**inputs)
    key = "start_logits" if task == "question_answering" else "logits"
    assert torch.allclose(out_a[key], out_b[key], atol=1e-5)


@pytest.mark.parametrize("task", ["masked_lm", "causal_lm", "sequence_classification"])
def test_unlabelled_text_is_distilled_over_every_real_token(tmp_path, task):
    """No labels at all (task-agnostic distillation): KD over the non-padding positions, no CE term."""
    teacher, student = pair(task)
    batch = task_batch(task, unlabelled=True)
    initial = copy.deepcopy(student)
    args = make_args(tmp_path, max_steps=1, alpha=0.5)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=ListDataset(rows_from_batch(batch))
    )
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert "ce_loss" not in log
    assert log["kd_loss"] == pytest.approx(reference_kd(task, initial, teacher, batch, T=2.0), rel=1e-5)


def test_masked_lm_with_the_collator_distils_the_masked_positions_only(tmp_path):
    """DataCollatorForLanguageModeling gives labels at the masked positions: KD (and CE) cover those alone."""
    tokenizer = build_tokenizer()
    teacher, student = pair("masked_lm")
    texts = ["good film very fun", "the plot was dull and boring", "a movie", "acting is not quite superb really"]
    rows = [tokenizer(t) for t in texts]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.5, seed=3)
    batch = {k: v for k, v in collator(rows).items()}
    assert (batch["labels"] != -100).sum() < batch["attention_mask"].sum()  # some real tokens are not masked
    args = make_args(tmp_path, alpha=1.0, temperature=2.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, data_collator=collator)
    student.train()
    loss = trainer.compute_loss(student, dict(batch))
    masked = reference_kd("masked_lm", student, teacher, batch, T=2.0)
    assert loss.item() == pytest.approx(4 * masked, rel=1e-5)
    unmasked = reference_kd("masked_lm", student, teacher, {k: v for k, v in batch.items() if k != "labels"}, T=2.0)
    assert masked != pytest.approx(unmasked, rel=1e-3)  # the mask made a difference


# ------------------------------------------------------------------ encoder-decoder: two stacks, two maps
def reference_layers(student, teacher, batch, projections, enc_pairs, dec_pairs, enc_attn, dec_attn):
    """Hidden (mse) and attention (mse) losses of both stacks written out: encoder rows = attention_mask,
    decoder rows = labels != -100; the mean over every pair of both stacks."""
    inputs = model_inputs("seq2seq_lm", batch)
    s = student(**inputs, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        t = teacher(**inputs, output_hidden_states=True, output_attentions=True)
    stacks = [
        (batch["attention_mask"].bool(), s.encoder_hidden_states, t.encoder_hidden_states, s.encoder_attentions,
         t.encoder_attentions, enc_pairs, enc_attn),
        (batch["labels"] != -100, s.decoder_hidden_states, t.decoder_hidden_states, s.decoder_attentions,
         t.decoder_attentions, dec_pairs, dec_attn),
    ]
    hidden, attn, k = [], [], 0
    for mask, sh, th, sa, ta, hidden_pairs, attention_pairs in stacks:
        for ks, kt in hidden_pairs:
            diff = (projections[k](sh[ks]) - th[kt]) ** 2  # (B, T, D)
            hidden.append(diff.mean(-1)[mask].mean())
            k += 1
        square = mask[:, :, None] & mask[:, None, :]
        for ks, kt in attention_pairs:
            attn.append(((sa[ks - 1].mean(1) - ta[kt - 1].mean(1)) ** 2)[square].mean())
    return torch.stack(hidden).mean(), torch.stack(attn).mean()


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_hidden_and_attention_losses_use_each_stacks_map_and_mask(tmp_path, arch):
    teacher, student = pair("seq2seq_lm", arch)  # teacher 3 encoder + 4 decoder layers, student 2 + 2
    args = make_args(
        tmp_path, alpha=0.0, hidden_weight=1.0, attention_weight=1.0, layer_map=[[1, 2], [2, 3]],
        decoder_layer_map=[[1, 1], [2, 4]],
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    assert trainer.plan.hidden_pairs == [(1, 2), (2, 3)] and trainer.plan.decoder_hidden_pairs == [(1, 1), (2, 4)]
    assert len(trainer.projections) == 4  # widths 8 -> 16: one per pair, the encoder's first
    batch = seq2seq_batch()
    student.train()
    loss = trainer.compute_loss(student, dict(batch))
    hidden, attn = reference_layers(
        student, teacher, batch, trainer.projections, [(1, 2), (2, 3)], [(1, 1), (2, 4)], [(1, 2), (2, 3)],
        [(1, 1), (2, 4)],
    )
    assert torch.allclose(trainer.meter.sums["hidden_loss"], hidden, rtol=1e-5)
    assert torch.allclose(trainer.meter.sums["attention_loss"], attn, rtol=1e-5)
    assert torch.allclose(loss, hidden + attn + trainer.meter.sums["ce_loss"], rtol=1e-5)  # alpha = 0


def test_changing_the_decoder_layer_map_changes_the_hidden_loss_only(tmp_path):
    batch = seq2seq_batch()
    results = {}
    for name, decoder_map in (("last", "last"), ("first", [[1, 1], [2, 1]])):
        teacher, student = pair("seq2seq_lm")
        args = make_args(tmp_path / name, alpha=0.5, hidden_weight=1.0, layer_map="uniform", decoder_layer_map=decoder_map)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
        student.train()
        trainer.compute_loss(student, dict(batch))
        results[name] = (trainer.plan.hidden_pairs, trainer.plan.decoder_hidden_pairs, dict(trainer.meter.sums))
    (enc_a, dec_a, a), (enc_b, dec_b, b) = results["last"], results["first"]
    assert enc_a == enc_b == [(1, 2), (2, 3)]  # uniform: 2 -> 3 encoder layers
    assert dec_a == [(2, 4)] and dec_b == [(1, 1), (2, 1)]
    assert torch.equal(a["kd_loss"], b["kd_loss"])
    assert not torch.allclose(a["hidden_loss"], b["hidden_loss"])


def test_seq2seq_padding_of_sources_and_targets_does_not_change_the_loss(tmp_path):
    teacher, student = pair("seq2seq_lm")
    args = make_args(tmp_path, hidden_weight=1.0, attention_weight=1.0, attention_loss="kl")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    short = seq2seq_batch()
    longer = {
        "input_ids": torch.cat([short["input_ids"], torch.full((6, 4), PAD)], 1),
        "attention_mask": torch.cat([short["attention_mask"], torch.zeros(6, 4, dtype=torch.long)], 1),
        "labels": torch.cat([short["labels"], torch.full((6, 3), -100)], 1),
    }
    student.train()
    a = trainer.compute_loss(student, dict(short))
    b = trainer.compute_loss(student, dict(longer))
    assert torch.allclose(a, b, atol=1e-5), (a.item(), b.item())


def _seq2seq_accumulation(tmp_path, per_device, accumulation):
    teacher, student = pair("seq2seq_lm")
    rows = rows_from_batch(seq2seq_batch(batch=8, src_from=(9, 2, 7, 3, 9, 1, 5, 8), tgt_from=(7, 1, 6, 2, 7, 3, 1, 5)))
    args = make_args(
        tmp_path, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation, max_steps=2,
        hidden_weight=1.0, attention_weight=1.0,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ListDataset(rows))
    trainer.train()
    return student.state_dict(), [e for e in trainer.state.log_history if "loss" in e]


def test_seq2seq_gradient_accumulation_equals_the_larger_batch(tmp_path):
    big, big_logs = _seq2seq_accumulation(tmp_path / "big", 8, 1)
    acc, acc_logs = _seq2seq_accumulation(tmp_path / "acc", 2, 4)
    for k in big:  # Adam turns float-rounding differences of near-zero gradients into ~1e-6 weight differences
        assert torch.allclose(big[k], acc[k], atol=1e-5, rtol=1e-4), k
    for a, b in zip(big_logs, acc_logs):
        for name in ("kd_loss", "ce_loss", "hidden_loss", "attention_loss"):
            assert a[name] == pytest.approx(b[name], rel=1e-5), name


def test_decoder_depths_come_from_each_config(tmp_path):
    """T5 (num_layers / num_decoder_layers) and BART (encoder_layers / decoder_layers): uniform maps per stack."""
    for arch in ("t5", "bart"):
        teacher, student = pair("seq2seq_lm", arch)
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=make_args(tmp_path, hidden_weight=1.0, attention_weight=1.0)
        )
        assert trainer.plan.hidden_pairs == [(1, 2), (2, 3)], arch  # encoders: 2 -> 3 layers
        assert trainer.plan.decoder_hidden_pairs == [(1, 2), (2, 4)], arch  # decoders: 2 -> 4 layers
        assert trainer.plan.attention_pairs == [(1, 2), (2, 3)] and trainer.plan.decoder_attention_pairs == [(1, 2), (2, 4)]


def test_decoder_layer_map_outside_the_decoders_is_refused(tmp_path):
    teacher, student = pair("seq2seq_lm")
    args = make_args(tmp_path, hidden_weight=1.0, decoder_layer_map=[[1, 5]])  # the teacher's decoder has 4 layers
    with pytest.raises(InputError, match="decoder_layer_map maps the decoders"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args)


def test_decoder_layer_map_on_a_single_stack_model_is_refused(tmp_path):
    teacher, student = pair("sequence_classification")
    with pytest.raises(InputError, match="decoder_layer_map is set but"):
        DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, decoder_layer_map="last"))


def test_bad_decoder_layer_map_is_refused_by_the_config(tmp_path):
    with pytest.raises(ValueError, match="decoder_layer_map"):
        make_args(tmp_path, decoder_layer_map="middle")


# ------------------------------------------------------------------ recipes, run offline on local files
RECIPES = os.path.join(os.path.dirname(__file__), "..", "hf_kd", "recipes", "tasks")


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def _task_files(task, tmp_path):
    """(teacher folder, extra overrides, data folder): a tiny teacher saved with the word-level tokenizer, and a
    folder of train.jsonl (12 rows) and test.jsonl (its first 6 rows)."""
    tokenizer = build_tokenizer()
    teacher, student = pair(task)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    extra = ["--student_layers", "[1, 3]"]
    if task == "seq2seq_lm":
        student.save_pretrained(tmp_path / "student")
        extra = ["--student_model_name_or_path", str(tmp_path / "student")]
    words = WORDS[:12]
    rows = []
    for i in range(12):
        sentence = [words[(i + k) % 12] for k in range(3 + i % 4)]
        rows.append({
            "text": " ".join(sentence), "label": i % 2, "tokens": sentence, "tags": [(i + k) % 2 for k in range(len(sentence))],
            "question": "what was the film", "context": " ".join(sentence),
            "answers": {"text": [sentence[1]], "answer_start": [len(sentence[0]) + 1]},
            "target": " ".join(reversed(sentence)),
        })
    (tmp_path / "data").mkdir()
    _write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    _write_jsonl(tmp_path / "data" / "test.jsonl", rows[:6])
    return str(tmp_path / "teacher"), extra, str(tmp_path / "data")


@pytest.mark.parametrize("task", TASKS)
def test_each_task_recipe_runs_offline_on_local_files(tmp_path, task):
    """A user's own json files, for every task: distil, then the task's metric on the held-out split."""
    recipe = os.path.join(RECIPES, f"{task}.yaml")
    header = open(recipe).read().splitlines()[0]
    assert header == f"# hf-kd distill --config recipes/tasks/{task}.yaml"
    teacher, extra, data = _task_files(task, tmp_path)
    main([
        "distill", "--config", recipe, "--teacher_model_name_or_path", teacher, "--dataset_name", data, *extra,
        "--label_column", "tags" if task == "token_classification" else "label", "--text_column",
        "tokens" if task == "token_classification" else "text", "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--max_length", "32", "--logging_steps", "1",
        "--target_column", "target", "--eval_split", "test",
    ])
    results = json.load(open(tmp_path / "out" / "results.json"))
    summary = results["distilled"]
    assert results["task"] == task and summary["steps"] == 2 and summary["first_log"]["kd_loss"] > 0
    metric = METRICS[task]
    for name in ("teacher_model", "student_at_init", "distilled"):
        assert 0 <= results[name][metric] < float("inf") and (metric == "perplexity" or results[name][metric] <= 1)
    if task == "seq2seq_lm":  # the recipe's decoder_layer_map: the last decoder layers
        provenance = json.load(open(tmp_path / "out" / "hf_kd_provenance.json"))
        assert provenance["distillation"]["decoder_hidden_pairs"] == [[2, 4]]
        assert "hidden_loss" in summary["first_log"]
    loaded = AUTO[task].from_pretrained(str(tmp_path / "out"))
    assert type(loaded).__name__ == type(pair(task)[1]).__name__


def test_question_answering_positions_point_at_the_answer_tokens():
    tokenizer = build_tokenizer()
    rows = [{"question": "what was it", "context": "the film was very good", "answers": {"text": ["very good"], "answer_start": [13]}}]
    import datasets

    tokenize = TOKENIZERS["question_answering"](DataArguments(dataset_name="-"), tokenizer, None)
    data = datasets.Dataset.from_list(rows).map(tokenize, batched=True, remove_columns=["question", "context", "answers"])
    ids = data[0]["input_ids"]
    answer = ids[data[0]["start_positions"]: data[0]["end_positions"] + 1]
    assert tokenizer.decode(answer) == "very good"


def test_token_classification_tags_go_to_first_sub_tokens_and_specials_are_ignored():
    tokenizer = build_tokenizer()
    import datasets

    args = DataArguments(dataset_name="-", text_column="tokens", label_column="tags")
    tokenize = TOKENIZERS["token_classification"](args, tokenizer, None)
    data = datasets.Dataset.from_list([{"tokens": ["good", "film"], "tags": [1, 0]}]).map(tokenize, batched=True,
                                                                                          remove_columns=["tokens", "tags"])
    assert data[0]["labels"] == [-100, 1, 0, -100]  # [CLS] good film [SEP]


def test_a_task_recipe_with_a_teacher_for_another_task_is_refused_with_a_message(tmp_path, capsys):
    teacher, _, data = _task_files("sequence_classification", tmp_path)  # a sequence classifier...
    recipe = os.path.join(RECIPES, "token_classification.yaml")  # ...given to the token-classification recipe
    with pytest.raises(SystemExit, match="not a token classification model"):
        main(["distill", "--config", recipe, "--teacher_model_name_or_path", teacher, "--dataset_name", data,
              "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--student_layers", "[1]"])
    assert not os.path.exists(tmp_path / "out")


def test_seq2seq_without_labels_distils_every_decoder_position_given(tmp_path):
    """decoder_input_ids and no labels (no decoder_attention_mask): KD averages every decoder position."""
    teacher, student = pair("seq2seq_lm")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, alpha=1.0))
    batch = seq2seq_batch()
    inputs = model_inputs("seq2seq_lm", batch)  # input_ids, attention_mask, decoder_input_ids
    student.train()
    loss = trainer.compute_loss(student, dict(inputs))
    with torch.no_grad():
        s, t = student(**inputs).logits, teacher(**inputs).logits
    terms = [kl(t[b, i], s[b, i], 2.0) for b in range(s.shape[0]) for i in range(s.shape[1])]
    assert loss.item() == pytest.approx(4 * sum(terms) / len(terms), rel=1e-5)
