"""hf_kd.distill.cross_tokenizer: a teacher with its own tokenizer (tokenizers trained in the test)."""

import pytest
import torch
from conftest import make_bert, make_llama
from transformers import BertForQuestionAnswering, BertForTokenClassification, T5Config, T5ForConditionalGeneration
from xtok_tokenizers import SENTENCES, byte_bpe, wordpiece

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.distill.cross_tokenizer import spans, token_ends
from hf_kd.errors import InputError


def make_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, report_to=[],
                save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, logit_chunk_size=-1)
    base.update(kw)
    return DistillationConfig(**base)


@pytest.fixture(scope="module")
def toks():
    return byte_bpe(), wordpiece()


@pytest.mark.parametrize("text", SENTENCES)
def test_spans_cover_each_token_exactly_once(toks, text):
    """Accents, CJK (one byte-level token per byte), emoji; both ways round."""
    for a, b in (toks, toks[::-1]):
        oa = a(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        ob = b(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        groups = spans(oa, ob)
        assert [i for g, _ in groups for i in g] == list(range(len(oa)))
        assert [j for _, g in groups for j in g] == list(range(len(ob)))
        for ga, gb in groups:  # each group ends on the same character in both tokenizations
            assert oa[ga[-1]][1] == ob[gb[-1]][1]


def _lm_batch(tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


@pytest.mark.parametrize("kind", ["causal_lm", "seq2seq_lm"])
def test_identical_tokenizers_give_the_plain_kl(tmp_path, toks, kind):
    """On text whose tokens all end on characters (a character split into byte tokens is one span, so the
    predictions inside it are not compared); seq2seq: on targets without an end token (never in a span)."""
    bpe = toks[0]
    texts = [SENTENCES[i] for i in (0, 4, 5)]
    if kind == "causal_lm":
        student, teacher = make_llama(layers=1, vocab=len(bpe), seed=1), make_llama(layers=2, vocab=len(bpe), seed=2)
        batch = _lm_batch(bpe, texts)
    else:
        student, teacher = make_t5(len(bpe), 1, seed=1), make_t5(len(bpe), 2, seed=2)
        batch = _seq2seq_batch(bpe, texts, texts[::-1])
    losses = []
    for cross in (None, "same"):
        args = make_args(tmp_path, alpha=0.6, temperature=1.5, teacher_tokenizer=cross, cross_tokenizer_loss="hybrid")
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=bpe,
                                      teacher_tokenizer=bpe)
        student.train()
        losses.append(trainer.compute_loss(student, dict(batch)))
    assert torch.allclose(losses[0], losses[1], atol=1e-5)


@pytest.mark.parametrize("loss", ["uld", "hybrid"])
def test_causal_lm_across_tokenizers_trains_and_the_teacher_reads_its_own_tokens(tmp_path, toks, loss):
    bpe, wp = toks
    student, teacher = make_llama(layers=1, vocab=len(bpe), seed=1), make_llama(layers=1, vocab=len(wp), seed=2)
    seen = []
    teacher.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=bpe, teacher_tokenizer=wp,
                                  args=make_args(tmp_path, teacher_tokenizer="wp", cross_tokenizer_loss=loss))
    student.train()
    batch = _lm_batch(bpe, SENTENCES[:4])
    value = trainer.compute_loss(student, dict(batch))
    value.backward()
    assert torch.isfinite(value) and value > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert torch.equal(seen[0], wp(SENTENCES[:4], padding=True, return_tensors="pt")["input_ids"])


def test_sequence_classification_is_exact_and_trains(tmp_path, toks):
    bpe, wp = toks
    student, teacher = make_bert(layers=1, vocab=len(bpe)), make_bert(layers=2, vocab=len(wp), seed=3)
    rows = [dict(bpe(t), labels=i % 2) for i, t in enumerate(SENTENCES)]
    seen = []
    teacher.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=bpe, teacher_tokenizer=wp,
                                  train_dataset=rows, args=make_args(tmp_path, teacher_tokenizer="wp", max_steps=2,
                                                                     per_device_train_batch_size=3))
    trainer.train()
    assert len(seen) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history[:-1])
    first = sorted(wp(t)["input_ids"] for t in SENTENCES)
    assert all(sorted(r[r != wp.pad_token_id].tolist() for r in s) [0] in first for s in seen)


def test_token_classification_aligns_by_words_and_qa_by_characters(tmp_path, toks):
    bpe, wp = toks
    text = "Café crème: naïve façade"
    for cls in (BertForTokenClassification, BertForQuestionAnswering):
        student, teacher = make_bert(cls, layers=1, vocab=len(bpe)), make_bert(cls, layers=1, vocab=len(wp))
        trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=bpe, teacher_tokenizer=wp,
                                      args=make_args(tmp_path, teacher_tokenizer="wp"))
        cross = trainer.teacher_set.vocab.cross
        ids = torch.tensor([bpe(text)["input_ids"]])
        t_inputs = cross.teacher_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        s_off = bpe(text, return_offsets_mapping=True)["offset_mapping"]
        t_enc = wp(text, return_offsets_mapping=True)
        assert t_inputs["input_ids"][0].tolist() == t_enc["input_ids"]
        for last in (False, True):
            where = cross.position_map(ids.shape[1], last)[0]
            for p, (s, e) in enumerate(s_off):
                chars = [c for c in range(s, e) if not text[c].isspace()]
                if not chars:  # a token of spaces only: no teacher token, left out of the loss
                    assert where[p] == -1
                    continue
                ts, te = t_enc["offset_mapping"][where[p]]
                assert ts <= (chars[-1] if last else chars[0]) < te  # the teacher token holding that character


def test_refusals_across_tokenizers(tmp_path, toks):
    bpe, wp = toks
    with pytest.raises(ValueError, match=r"hidden_weight > 0 with teacher_tokenizer"):
        make_args(tmp_path, teacher_tokenizer="wp", hidden_weight=1.0)
    with pytest.raises(ValueError, match=r"cross_tokenizer_loss='wasserstein' is unknown"):
        make_args(tmp_path, cross_tokenizer_loss="wasserstein")
    student, teacher = make_llama(layers=1, vocab=len(bpe)), make_llama(layers=1, vocab=len(wp))
    with pytest.raises(InputError, match=r"kd_loss='jsd' compares one vocabulary"):
        DistillationTrainer(model=student, teacher_model=teacher, processing_class=bpe, teacher_tokenizer=wp,
                            args=make_args(tmp_path, teacher_tokenizer="wp", kd_loss="jsd"))
    with pytest.raises(InputError, match=r"the student's tokenizer is unknown: pass processing_class"):
        DistillationTrainer(model=student, teacher_model=teacher, teacher_tokenizer=wp,
                            args=make_args(tmp_path, teacher_tokenizer="wp"))
    with pytest.raises(InputError, match=r"teacher_tokenizer='/nowhere' could not be loaded"):
        DistillationTrainer(model=student, teacher_model=teacher, processing_class=bpe,
                            args=make_args(tmp_path, teacher_tokenizer="/nowhere"))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=bpe, teacher_tokenizer=wp,
                                  args=make_args(tmp_path, teacher_tokenizer="wp"))
    with pytest.raises(InputError, match=r"no teacher to evaluate on the student.s batches"):
        trainer.evaluate_teacher()


def test_a_tokenization_the_tokenizer_would_not_make_is_aligned_by_decoding_prefixes(tmp_path, toks):
    """Generated ids, or a prompt and its completion tokenized apart, need not be the tokenizer's own tokenization:
    "t" "h" "e" where the BPE would write "the". The teacher reads the text; the spans end where both the student's
    tokens and the teacher's end, as for the tokenizer's own tokenization of the text."""
    bpe, wp = toks
    student, teacher = make_llama(layers=1, vocab=len(bpe)), make_llama(layers=1, vocab=len(wp))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=bpe, teacher_tokenizer=wp,
                                  args=make_args(tmp_path, teacher_tokenizer="wp"))
    cross, text = trainer.teacher_set.vocab.cross, "the film was great"
    pieces = ["t", "h", "e"] + bpe.tokenize(" film was great")
    assert bpe.tokenize(text) != pieces  # not the BPE's own tokenization
    t_in = cross.teacher_inputs({"input_ids": torch.tensor([bpe.convert_tokens_to_ids(pieces)])})
    assert torch.equal(t_in["input_ids"], wp([text], return_tensors="pt")["input_ids"])
    row = cross.rows[0]
    assert row.texts == [text] and row.s_offsets[0][:3] == [(0, 1), (1, 2), (2, 3)]
    own = bpe(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    both = sorted(token_ends(own).keys() & token_ends(row.t_offsets[0]).keys())
    assert [row.s_offsets[0][s[-1]][1] for s, _ in spans(row.s_offsets[0], row.t_offsets[0])] == both


def test_left_padding_never_predicts_a_span(tmp_path, toks):
    """A teacher tokenizer that pads on the left: the position before a row's first token is padding, not a prediction."""
    bpe, wp = toks
    wp_left = wordpiece()
    wp_left.padding_side = "left"
    student, teacher = make_llama(layers=1, vocab=len(bpe)), make_llama(layers=1, vocab=len(wp))
    rows = {}
    for name, tok in (("right", wp), ("left", wp_left)):
        trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=bpe, teacher_tokenizer=tok,
                                      args=make_args(tmp_path, teacher_tokenizer="wp"))
        cross = trainer.teacher_set.vocab.cross
        batch = _lm_batch(bpe, SENTENCES[:3])
        t_in = cross.teacher_inputs({k: batch[k] for k in ("input_ids", "attention_mask")})
        b, ps, pt = cross.span_rows()
        assert t_in["attention_mask"][b, pt].all() and batch["attention_mask"][b, ps].all()
        rows[name] = len(b)
    assert rows["left"] == rows["right"] > 0


def test_token_classification_with_identical_tokenizers_equals_the_plain_loss(tmp_path, toks):
    wp = toks[1]
    enc = wp(SENTENCES[:4], padding=True, return_tensors="pt", return_special_tokens_mask=True)
    special = enc.pop("special_tokens_mask").bool()
    labels = torch.randint(0, 2, enc["input_ids"].shape, generator=torch.Generator().manual_seed(0))
    batch = {**enc, "labels": labels.masked_fill(special | (enc["attention_mask"] == 0), -100)}
    student = make_bert(BertForTokenClassification, layers=1, vocab=len(wp))
    teacher = make_bert(BertForTokenClassification, layers=2, vocab=len(wp), seed=4)
    losses = []
    for cross in (None, "same"):
        trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=wp, teacher_tokenizer=wp,
                                      args=make_args(tmp_path, teacher_tokenizer=cross, alpha=0.7))
        student.train()
        losses.append(trainer.compute_loss(student, dict(batch)))
    assert torch.allclose(losses[0], losses[1], atol=1e-6)


def test_question_answering_across_tokenizers_gives_a_finite_loss_and_gradients(tmp_path, toks):
    bpe, wp = toks
    enc = bpe(["Which film?"] * 2, ["The film was great, really great!", "A lovely movie."], padding=True,
              return_tensors="pt")
    batch = {**enc, "start_positions": torch.tensor([3, 4]), "end_positions": torch.tensor([4, 5])}
    student = make_bert(BertForQuestionAnswering, layers=1, vocab=len(bpe))
    teacher = make_bert(BertForQuestionAnswering, layers=1, vocab=len(wp))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=bpe, teacher_tokenizer=wp,
                                  args=make_args(tmp_path, teacher_tokenizer="wp"))
    student.train()
    loss = trainer.compute_loss(student, dict(batch))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def make_t5(vocab: int, layers: int, seed: int):
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=layers,
                                               num_heads=2, dropout_rate=0.0, pad_token_id=0, eos_token_id=0,
                                               decoder_start_token_id=0))


def _seq2seq_batch(tok, sources, targets):
    enc = tok(sources, padding=True, return_tensors="pt")
    labels = tok(targets, padding=True, return_tensors="pt")
    return {**enc, "labels": labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)}


@pytest.mark.parametrize("loss", ["uld", "hybrid"])
def test_seq2seq_across_tokenizers_reads_source_and_target_in_the_teachers_tokens(tmp_path, toks, loss):
    bpe, wp = toks
    student, teacher = make_t5(len(bpe), 1, seed=1), make_t5(len(wp), 1, seed=2)
    seen = []
    teacher.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=bpe, teacher_tokenizer=wp,
                                  args=make_args(tmp_path, teacher_tokenizer="wp", cross_tokenizer_loss=loss))
    sources, targets = SENTENCES[:3], [SENTENCES[i] for i in (5, 1, 4)]
    student.train()
    value = trainer.compute_loss(student, dict(_seq2seq_batch(bpe, sources, targets)))
    value.backward()
    assert torch.isfinite(value) and value > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert torch.equal(seen[0]["input_ids"], wp(sources, padding=True, return_tensors="pt")["input_ids"])
    t_labels = wp(text_target=targets, padding=True, return_tensors="pt")
    expected = teacher.prepare_decoder_input_ids_from_labels(
        labels=t_labels["input_ids"].masked_fill(t_labels["attention_mask"] == 0, -100))
    assert torch.equal(seen[0]["decoder_input_ids"], expected)
    b, ps, pt = trainer.teacher_set.vocab.cross.span_rows()
    assert len(b) > 0  # the rows compared are label positions in both, after the same target text
    labels = _seq2seq_batch(bpe, sources, targets)["labels"]
    for row, s, t in zip(b.tolist(), ps.tolist(), pt.tolist()):
        s_text = bpe.decode(labels[row, :s].tolist())  # the target text both models read before the compared token
        t_text = wp.decode(t_labels["input_ids"][row, :t].tolist(), skip_special_tokens=True)
        normalized = wp.backend_tokenizer.normalizer.normalize_str(s_text)  # lowercased, accents stripped
        assert t_text.replace(" ", "") == normalized.replace(" ", "")
