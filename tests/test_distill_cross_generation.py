"""Generated completions with a teacher that has its own tokenizer: the student's (lmbda) reach the teacher as text;
the teacher's (seq_kd, hf_kd.distill.cross_generation) reach the student as text. Tiny Llamas, tokenizers trained here."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_llama
from datasets import Dataset
from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration
from xtok_tokenizers import SENTENCES, byte_bpe, wordpiece

from hf_kd import DistillationConfig, DistillationTrainer, InputError
from hf_kd.distill.cross_generation import TeacherWriter
from hf_kd.distill.cross_tokenizer import CrossTokenizer
from hf_kd.distill.rollout import Rollout

ROWS = [{"prompt": "The film", "completion": " was great, really great!"},
        {"prompt": "A lovely,", "completion": " superb movie."},
        {"prompt": "not quite", "completion": " the story I wanted"},
        {"prompt": "What a plot", "completion": " truly boring acting"}]


@pytest.fixture(scope="module")
def toks():
    texts = SENTENCES + [r["prompt"] + r["completion"] for r in ROWS]
    return byte_bpe(300, texts), wordpiece(150, texts)


def make_trainer(tmp_path, toks, **kw):
    bpe, wp = toks
    args = DistillationConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, alpha=1.0,
                              save_strategy="no", per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                              generation_config={"max_new_tokens": 6}, disable_tqdm=True, seed=0,
                              teacher_tokenizer="wp", **kw)
    return DistillationTrainer(model=make_llama(layers=1, vocab=len(bpe), seed=1),
                               teacher_model=make_llama(layers=2, vocab=len(wp), seed=2), args=args,
                               train_dataset=Dataset.from_list(ROWS), processing_class=bpe, teacher_tokenizer=wp)


@pytest.fixture
def recorded(monkeypatch):
    """Per step, the student's LM batch (one micro-batch a window) and the teacher's input_ids; per generation,
    (model, prompt ids, prompt mask, output)."""
    seen = {"student": [], "teacher": [], "generated": []}
    inputs, generate, window = CrossTokenizer.teacher_inputs, Rollout.generate, Rollout.window

    def teacher_inputs(self, model_inputs, labels=None):
        out = inputs(self, model_inputs, labels)
        seen["teacher"].append(out["input_ids"].clone())
        return out

    def recording_window(self, *args, **kwargs):
        batches = window(self, *args, **kwargs)
        seen["student"] += [{k: v.clone() for k, v in b.items()} for b in batches]
        return batches

    def recording_generate(self, model, ids, mask, greedy=False, config=None):
        out = generate(self, model, ids, mask, greedy, config)
        seen["generated"].append((model, ids.clone(), mask.clone(), out.clone()))
        return out

    monkeypatch.setattr(CrossTokenizer, "teacher_inputs", teacher_inputs)
    monkeypatch.setattr(Rollout, "generate", recording_generate)
    monkeypatch.setattr(Rollout, "window", recording_window)
    return seen


def content(ids: torch.Tensor, mask: torch.Tensor, special) -> list[int]:
    return [i for i, m in zip(ids.tolist(), mask.tolist()) if m and i not in special]


def test_on_policy_student_completions_reach_the_teacher_as_its_own_tokens(tmp_path, toks, recorded):
    bpe, wp = toks
    trainer = make_trainer(tmp_path, toks, lmbda=1.0)
    trainer.train()
    assert trainer.rollout.windows["student"] == 2 and len(recorded["student"]) == len(recorded["teacher"]) == 2
    assert {m is trainer.model for m, *_ in recorded["generated"]} == {True}  # the student wrote every completion
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    special = set(bpe.all_special_ids)
    for batch, teacher_ids in zip(recorded["student"], recorded["teacher"]):
        # the student's rows hold its prompt then its own completion; the teacher read the WordPiece tokens of that text
        texts = [bpe.decode(content(i, m, special)) for i, m in zip(batch["input_ids"], batch["attention_mask"])]
        expected = wp(texts, padding=True, return_tensors="pt")["input_ids"]
        assert torch.equal(teacher_ids, expected)
        assert (batch["labels"] != -100).any()


def test_seq_kd_teacher_completions_are_rewritten_in_the_students_tokens(tmp_path, toks, recorded):
    bpe, wp = toks
    trainer = make_trainer(tmp_path, toks, seq_kd=True)
    trainer.train()
    assert trainer.rollout.windows["teacher"] == 2 and len(recorded["student"]) == len(recorded["teacher"]) == 2
    generated = [g for g in recorded["generated"] if g[0] is trainer.teacher]
    assert len(generated) == 2
    special = set(bpe.all_special_ids)
    writer = trainer.rollout.teacher_writer
    for (_, t_ids, t_mask, written), batch, teacher_ids in zip(generated, recorded["student"], recorded["teacher"]):
        # the teacher was prompted with its own tokenization of the student's prompts (left-padded)
        prompts = [bpe.decode(content(i, m, special)) for i, m in zip(batch["input_ids"], batch["labels"] == -100)]
        assert torch.equal(t_ids, writer.t_tok(prompts, padding=True, return_tensors="pt")["input_ids"])
        for row, (p, m, c) in enumerate(zip(t_ids, t_mask, written)):
            prompt = [i for i, k in zip(p.tolist(), m.tolist()) if k]
            ends = [k for k, i in enumerate(c.tolist()) if i in writer.t_eos]
            c = c.tolist()[: ends[0]] if ends else c.tolist()
            head = wp.decode(prompt, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            full = wp.decode(prompt + c, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            labels = batch["labels"][row]
            completion = labels[labels != -100].tolist()
            assert bpe.decode([i for i in completion if i not in special]) == full[len(head):]
            assert (completion[-1:] == [bpe.eos_token_id]) == bool(ends)  # the student's EOS where the teacher ended
        # at the loss step the teacher reads its own tokens of prompt + completion again
        texts = [bpe.decode(content(i, m, special)) for i, m in zip(batch["input_ids"], batch["attention_mask"])]
        assert torch.equal(teacher_ids, wp(texts, padding=True, return_tensors="pt")["input_ids"])


def test_eval_generation_across_tokenizers_is_refused(tmp_path, toks):
    with pytest.raises(InputError, match=r"eval_generation scores the student's completions"):
        make_trainer(tmp_path, toks, lmbda=1.0, eval_generation=True)


def test_teacher_writer_keeps_the_text_after_the_prompt_and_ends_where_the_teacher_ended(toks):
    """A WordPiece decoder joins words with spaces: the completion keeps the space after its prompt; the teacher's
    EOS becomes the student's, and what follows it is dropped."""
    bpe, wp = toks
    teacher = make_llama(layers=1, vocab=len(wp))
    writer = TeacherWriter(bpe, wp, teacher, GenerationConfig(max_new_tokens=4), bpe.eos_token_id, bpe.pad_token_id)
    eos = writer.t_eos[0]
    enc = bpe(["The film", "A lovely,"], padding=True, return_tensors="pt")
    ended = wp("was great", add_special_tokens=False)["input_ids"] + [eos, wp.convert_tokens_to_ids("movie")]
    going = wp("superb movie", add_special_tokens=False)["input_ids"]
    width = max(len(ended), len(going))
    pad = wp.pad_token_id  # a special token, not an EOS: the second row never ends
    assert pad not in writer.t_eos
    written = torch.tensor([ended + [pad] * (width - len(ended)), going + [pad] * (width - len(going))])
    seen = []

    def generate(model, ids, mask, config):
        seen.append((ids, config))
        return written

    c_ids, c_mask = writer.completions(generate, teacher, enc["input_ids"], enc["attention_mask"])
    rows = [bpe(" was great", add_special_tokens=False)["input_ids"] + [bpe.eos_token_id],
            bpe(" superb movie", add_special_tokens=False)["input_ids"]]
    assert [r[m.bool()].tolist() for r, m in zip(c_ids, c_mask)] == rows
    ids, config = seen[0]
    assert ids[:, -1].eq(wp.sep_token_id).all() and config.eos_token_id == writer.t_eos  # left-padded, its own EOS


def test_seq_kd_with_encoder_decoders_across_tokenizers(tmp_path, toks, recorded):
    """T5-style models: the teacher's completion (its decoder's output) is decoded alone and becomes the labels."""
    bpe, wp = toks

    def t5(vocab, layers, seed):
        torch.manual_seed(seed)
        return T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=layers,
                                                   num_heads=2, dropout_rate=0.0, pad_token_id=0, eos_token_id=0,
                                                   decoder_start_token_id=0))

    args = DistillationConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, alpha=1.0,
                              save_strategy="no", per_device_train_batch_size=2, max_steps=2, logging_steps=1,
                              generation_config={"max_new_tokens": 6}, disable_tqdm=True, seed=0,
                              teacher_tokenizer="wp", seq_kd=True)
    trainer = DistillationTrainer(model=t5(len(bpe), 1, 1), teacher_model=t5(len(wp), 1, 2), args=args,
                                  train_dataset=Dataset.from_list(ROWS), processing_class=bpe, teacher_tokenizer=wp)
    trainer.train()
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)
    generated = [g for g in recorded["generated"] if g[0] is trainer.teacher]
    writer, special = trainer.rollout.teacher_writer, set(bpe.all_special_ids)
    assert len(generated) == 2 and writer.encoder_decoder
    assert any((b["labels"] != -100).any() for b in recorded["student"])  # the teacher wrote something to learn
    for (_, t_ids, _, written), batch in zip(generated, recorded["student"]):
        sources = [bpe.decode(content(i, m, special)) for i, m in zip(batch["input_ids"], batch["attention_mask"])]
        assert torch.equal(t_ids, wp(sources, padding=True, return_tensors="pt")["input_ids"])  # right-padded
        for c, labels in zip(written.tolist(), batch["labels"]):
            ends = [k for k, i in enumerate(c) if i in writer.t_eos]
            text = wp.decode(c[: ends[0]] if ends else c, skip_special_tokens=True)
            assert bpe.decode([i for i in labels.tolist() if i != -100 and i not in special]) == text
