"""hf_kd.distill.vocab: tokenizers compared at start-up, padded vocabularies cut, ids the teacher cannot embed."""

import logging

import pytest
import torch
from conftest import ListDataset, build_tokenizer, make_bert, make_llama, random_batch, rows_from_batch
from transformers import AutoTokenizer, BertForQuestionAnswering, BertForTokenClassification
from xtok_tokenizers import byte_bpe, wordpiece

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.errors import InputError
from hf_kd.losses import cross_entropy_loss, logit_distillation_loss
from hf_kd.tasks import shift_predictions, shift_targets


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, report_to=[],
                save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    base.update(kw)
    return DistillationConfig(**base)


def _refused(tmp_path, match, student, teacher, **kwargs):
    out = tmp_path / "refused"
    args = kwargs.pop("args", None) or make_args(tmp_path, output_dir=str(out))
    with pytest.raises(InputError, match=match):
        DistillationTrainer(model=student, teacher_model=teacher, args=args, **kwargs)
    assert not out.exists()


@pytest.mark.parametrize("chunk", [-1, 4])
def test_one_tokenizer_padded_to_two_sizes_is_cut_to_its_vocabulary(tmp_path, caplog, chunk):
    tok = build_tokenizer()  # 34 tokens
    student, teacher = make_llama(layers=1, vocab=64, seed=1), make_llama(layers=2, vocab=80, seed=2)
    with caplog.at_level(logging.WARNING, logger="hf_kd.distill.vocab"):
        trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=tok, teacher_tokenizer=tok,
                                      args=make_args(tmp_path, alpha=0.7, temperature=2.0, logit_chunk_size=chunk))
    assert f"first {len(tok)} logits of both" in caplog.text and "64 and 80 rows" in caplog.text
    batch = random_batch("causal_lm", vocab=len(tok), pad_from=[10, 7, 10, 5])
    student.train()
    loss = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():  # by hand: both models' logits sliced to the tokenizer's 34 tokens
        zs = shift_predictions(student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
        zt = shift_predictions(teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    labels = shift_targets(batch["labels"])
    n = len(tok)
    kd = logit_distillation_loss(zs[..., :n], zt[..., :n], labels != -100, temperature=2.0)
    ce = cross_entropy_loss(zs[..., :n], labels)
    assert torch.allclose(loss, 0.7 * 4 * kd + 0.3 * ce, atol=1e-5)


def test_logits_of_two_sizes_with_unknown_tokenizers_are_refused(tmp_path):
    _refused(tmp_path, r"vocabulary has 64 tokens and the teacher's 80, and their tokenizers are unknown.*"
             r"processing_class", make_llama(layers=1, vocab=64), make_llama(layers=2, vocab=80))


def test_different_tokenizers_are_refused_naming_both_and_the_option(tmp_path):
    byte_bpe().save_pretrained(tmp_path / "student_tok")
    wordpiece().save_pretrained(tmp_path / "teacher_tok")
    s_tok, t_tok = (AutoTokenizer.from_pretrained(tmp_path / n) for n in ("student_tok", "teacher_tok"))
    _refused(tmp_path, r"student's tokenizer \('.*student_tok', 300 tokens\) and the teacher's \('.*teacher_tok', "
             r"\d+ tokens\) differ.*teacher_tokenizer='.*teacher_tok'", make_bert(layers=2, vocab=300),
             make_bert(layers=2, vocab=300), processing_class=s_tok, teacher_tokenizer=t_tok)


TASKS = {"sequence_classification": None, "token_classification": BertForTokenClassification,
         "question_answering": BertForQuestionAnswering}


@pytest.mark.parametrize("task", [*TASKS, "causal_lm"])
def test_ids_the_teacher_cannot_embed_are_a_clear_error_not_an_index_error(tmp_path, task):
    """The issue's report: a 96-token teacher and a 120-token student died with IndexError inside the embedding."""
    if task == "causal_lm":  # one tokenizer (34 tokens) padded to 120 and 96 rows; a batch holds id 100 anyway
        student, teacher = make_llama(layers=1, vocab=120), make_llama(layers=2, vocab=96)
        kwargs = dict(processing_class=build_tokenizer(), teacher_tokenizer=build_tokenizer())
    else:
        cls = TASKS[task] or make_bert().__class__
        student, teacher = make_bert(cls, layers=2, vocab=120), make_bert(cls, layers=2, vocab=96)
        kwargs = {}
    batch = random_batch(task, vocab=120, seed=3)
    batch["input_ids"][0, 2] = 100
    if task == "causal_lm":
        batch["labels"] = batch["labels"].clamp_max(30)
    # At start-up, from the training set:
    _refused(tmp_path, r"train_dataset's input_ids \(first 4 rows\) holds token id \d+ but the teacher embeds only 96 "
             r"tokens.*teacher_tokenizer", student, teacher, train_dataset=ListDataset(rows_from_batch(batch)), **kwargs)
    # At a batch the scan did not see:
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path), **kwargs)
    student.train()
    with pytest.raises(InputError, match=r"this batch's input_ids holds token id \d+ but the teacher embeds only 96"):
        trainer.compute_loss(student, dict(batch))
