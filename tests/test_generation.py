"""Generated completions (hf_kd/distill/rollout.py, hf_kd/prompts.py, hf_kd/distill/generation_eval.py): on-policy
(lmbda), sequence-level KD (seq_kd) and dataset completions, their masks and losses, on tiny causal and T5 models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import WORDS, make_llama
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (BartConfig, BartForConditionalGeneration, GenerationConfig, PreTrainedTokenizerFast, T5Config,
                          T5ForConditionalGeneration)

from hf_kd import DistillationConfig, DistillationTrainer, InputError
from hf_kd.distill import generation_eval
from hf_kd.distill.generation_eval import GeneratedTexts
from hf_kd.distill.rollout import Rollout
from hf_kd.prompts import PromptCollator, first_eos_mask

PAD, UNK, EOS = 0, 1, 2
CHAT = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}")
ROWS = [
    {"prompt": "the film was", "completion": "very good"},
    {"prompt": "a story", "completion": "quite dull really"},
    {"prompt": "the acting is not", "completion": "great"},
    {"prompt": "plot", "completion": "was weak and the movie boring"},
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is many times faster than several fighting over 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen_tokenizer(pad_is_eos: bool = False) -> PreTrainedTokenizerFast:
    """Word-level: [PAD]=0, [UNK]=1, [EOS]=2, then the words; no special tokens added around text."""
    words = ["[PAD]", "[UNK]", "[EOS]", *WORDS, "and", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]",
                                   pad_token="[EOS]" if pad_is_eos else "[PAD]")


def make_t5(layers=2, d_model=16, seed=0):
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=64, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers, num_heads=2, dropout_rate=0.0,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD))


# BART's ids: <s>=0, <pad>=1, </s>=2 (the EOS, and the decoder's start token), <unk>=3.
BART_BOS, BART_PAD = 0, 1


def bart_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, laid out like BART's: text is wrapped as <s> ... </s>."""
    words = ["<s>", "<pad>", "</s>", "<unk>", *WORDS, "and"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                       special_tokens=[("<s>", BART_BOS), ("</s>", EOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_bart(layers=2, d_model=16, seed=0):
    """BART's quirks: the decoder starts from the EOS id, the first generated token is forced to <s>, the last to
    </s>; the logits carry final_logits_bias (random here, so that a route that drops it is caught)."""
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=64, d_model=d_model, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model,
        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=BART_PAD, bos_token_id=BART_BOS, eos_token_id=EOS, decoder_start_token_id=EOS,
        forced_eos_token_id=EOS))
    model.generation_config.forced_bos_token_id = BART_BOS  # as facebook/bart-large-cnn's generation_config.json
    with torch.no_grad():
        model.final_logits_bias.normal_()
    return model


def config(tmp_path, **kw) -> DistillationConfig:
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, alpha=1.0, save_strategy="no",
                per_device_train_batch_size=2, max_steps=2, generation_config={"max_new_tokens": 5},
                logging_steps=1, disable_tqdm=True, seed=0)
    return DistillationConfig(**{**base, **kw})


def trainer(tmp_path, student=None, teacher=None, rows=ROWS, tok=None, **kw) -> DistillationTrainer:
    return DistillationTrainer(model=student if student is not None else make_llama(seed=1),
                               teacher_model=teacher if teacher is not None else make_llama(layers=3, seed=2),
                               args=config(tmp_path, **kw), train_dataset=Dataset.from_list(rows),
                               processing_class=tok or gen_tokenizer())


def fake_completion(prompt: list[int]) -> list[int]:
    """The completion `fake_generate` gives a prompt: 1 to 4 tokens (by the prompt's id sum), then EOS."""
    return [3 + (sum(prompt) + k) % 20 for k in range(1 + sum(prompt) % 4)] + [EOS]


def fake_generate(model, encoder_decoder=False, calls=None):
    """A deterministic `generate`: each row's `fake_completion`, then pad, after the prompt (decoder-only) or one
    start token (encoder-decoder)."""
    def generate(input_ids, attention_mask, generation_config):
        assert generation_config.use_cache and not model.training  # the KV cache on, dropout off
        if calls is not None:
            calls.append((input_ids.clone(), attention_mask.clone()))
        rows = [fake_completion(ids[m].tolist()) for ids, m in zip(input_ids, attention_mask.bool())]
        width = generation_config.max_new_tokens
        out = torch.full((len(rows), width), PAD)
        for i, r in enumerate(rows):
            out[i, : len(r[:width])] = torch.tensor(r[:width])
        head = torch.full((len(rows), 1), PAD) if encoder_decoder else input_ids
        return torch.cat([head, out], dim=1)
    return generate


def counting(model, calls: list):
    real = model.generate

    def generate(*a, **k):
        calls.append(k.get("input_ids"))
        out = real(*a, **k)
        calls[-1] = (k["input_ids"], k["attention_mask"], out)
        return out
    return generate


# ------------------------------------------------------------------------------ configuration and data
def test_config_validates_lmbda_and_normalises_generation_config(tmp_path):
    with pytest.raises(ValueError, match="lmbda=1.5 must be in"):
        config(tmp_path, lmbda=1.5)
    with pytest.raises(ValueError, match="lmbda_schedule='linear' needs lmbda_end"):
        config(tmp_path, lmbda_schedule="linear")
    with pytest.raises(ValueError, match="generation_config"):
        config(tmp_path, generation_config={"max_new_tokens": 0})
    assert config(tmp_path, generation_config='{"max_new_tokens": 7, "top_p": 0.9}').generation_config.top_p == 0.9
    GenerationConfig(max_new_tokens=3, do_sample=False).save_pretrained(tmp_path / "gen")
    args = config(tmp_path, generation_config=str(tmp_path / "gen"), temperature=3.0)
    assert args.generation_config.max_new_tokens == 3 and args.temperature == 3.0
    assert args.to_dict()["generation_config"]["max_new_tokens"] == 3  # JSON-able for the record


def test_lmbda_schedule_moves_windows_from_the_dataset_to_the_student(tmp_path):
    args = config(tmp_path, lmbda=0.0, lmbda_schedule="linear", lmbda_end=1.0)
    rollout = Rollout(args, "causal_lm", gen_tokenizer(), make_llama())
    assert rollout.source(0, 11) == "dataset" and rollout.source(10, 11) == "student"
    half = Rollout(config(tmp_path, lmbda=0.5), "causal_lm", gen_tokenizer(), make_llama())
    draws = [half.source(s, 100) for s in range(100)]
    assert 30 < draws.count("student") < 70 and set(draws) == {"student", "dataset"}
    seq = Rollout(config(tmp_path, lmbda=0.0, seq_kd=True), "causal_lm", gen_tokenizer(), make_llama())
    assert {seq.source(s, 10) for s in range(10)} == {"teacher"}


def test_first_eos_mask_keeps_the_completion_up_to_and_including_the_first_eos():
    ids = torch.tensor([[5, 6, EOS, PAD, PAD], [5, EOS, EOS, EOS, EOS], [5, 6, 7, 8, 9], [EOS, 5, 6, EOS, 7]])
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(first_eos_mask(ids, [EOS]), want)
    valid = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert first_eos_mask(ids, [EOS], valid)[1].tolist() == [False, True, False, False, False]
    assert first_eos_mask(ids, [EOS], valid)[2].tolist() == [True, True, True, False, False]


def test_collator_left_pads_prompts_and_appends_eos_to_completions():
    tok = gen_tokenizer()
    batch = PromptCollator(tok)(ROWS[:2])
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert batch["prompt_input_ids"][1].tolist() == [PAD, *ids("a story")]  # left padding
    assert batch["prompt_attention_mask"][1].tolist() == [0, 1, 1]
    assert batch["completion_input_ids"][0].tolist() == [*ids("very good"), EOS, PAD]
    assert batch["completion_attention_mask"][0].tolist() == [1, 1, 1, 0]
    lm = PromptCollator(tok, lm=True)(ROWS[:1])  # the dataset's completions as an LM batch (plain Trainer)
    assert lm["input_ids"][0].tolist() == [*ids("the film was very good"), EOS]
    assert lm["labels"][0].tolist() == [-100] * 3 + [*ids("very good"), EOS]
    seq2seq = PromptCollator(tok, encoder_decoder=True, max_prompt_length=2)(ROWS[:2])
    assert seq2seq["prompt_input_ids"][0].tolist() == ids("film was")  # the last 2 tokens, right padding


def test_chat_messages_go_through_the_chat_template():
    tok = gen_tokenizer()
    tok.chat_template = CHAT
    row = {"messages": [{"role": "user", "content": "the film"}, {"role": "assistant", "content": "good"}]}
    batch = PromptCollator(tok)([row])
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert batch["prompt_input_ids"][0].tolist() == ids("user the film assistant")
    assert batch["completion_input_ids"][0].tolist() == [*ids("good"), EOS]
    conversational = {"prompt": row["messages"][:1], "completion": row["messages"][1:]}
    assert PromptCollator(tok)([conversational])["completion_input_ids"].tolist() == [[*ids("good"), EOS]]


# ------------------------------------------------------------------------------ who generates, and what is scored
@pytest.mark.parametrize("lmbda, calls_per_window", [(1.0, 1), (0.0, 0)])
def test_generate_runs_once_per_window_at_lmbda_1_and_never_at_0(tmp_path, lmbda, calls_per_window):
    student, calls = make_llama(seed=1), []
    student.generate = counting(student, calls)
    t = trainer(tmp_path, student=student, lmbda=lmbda, gradient_accumulation_steps=2, per_device_train_batch_size=1,
                max_steps=3)
    t.train()
    assert len(calls) == 3 * calls_per_window
    assert all(ids.shape[0] == 2 for ids, _, _ in calls)  # both micro-batches' prompts in one call
    assert student.training  # training mode restored after generating


def test_seq_kd_makes_the_teacher_generate(tmp_path):
    student, teacher, s_calls, t_calls = make_llama(seed=1), make_llama(layers=3, seed=2), [], []
    student.generate, teacher.generate = counting(student, s_calls), counting(teacher, t_calls)
    trainer(tmp_path, student=student, teacher=teacher, seq_kd=True, max_steps=2).train()
    assert len(t_calls) == 2 and not s_calls


def test_the_teacher_scores_exactly_the_prompt_plus_the_generated_ids(tmp_path):
    student, teacher, calls, seen = make_llama(seed=1), make_llama(layers=3, seed=2), [], []
    student.generate = counting(student, calls)
    teacher.register_forward_pre_hook(lambda m, a, k: seen.append((k["input_ids"], k["attention_mask"])), with_kwargs=True)
    t = trainer(tmp_path, student=student, teacher=teacher, lmbda=1.0, max_steps=1, per_device_train_batch_size=4,
                generation_config={"max_new_tokens": 4, "do_sample": True})
    t.train()
    (prompt, prompt_mask, out), = calls
    (ids, mask), = seen
    for i in range(4):
        generated = out[i, prompt.shape[1]:]
        keep = first_eos_mask(generated[None], [EOS])[0]
        expected = torch.cat([prompt[i][prompt_mask[i].bool()], generated[keep]])
        assert ids[i][mask[i].bool()].tolist() == expected.tolist()


def test_an_on_policy_step_runs_each_model_as_trl_does_and_no_more(tmp_path):
    """Per optimizer step of on-policy reverse KL through the heads (the profile behind scripts/bench.py --onpolicy,
    compared with trl.DistillationTrainer): the student runs max_new_tokens forward passes in `generate` and one
    with autograd, the teacher one, neither is asked for hidden states or attention maps, and after the first
    step (which checks the route on full logits) each head computes logits for one position only."""
    student, teacher = make_llama(seed=1), make_llama(layers=3, seed=2)
    calls, heads = [], []
    for name, model in (("student", student), ("teacher", teacher)):
        model.register_forward_pre_hook(
            lambda m, a, k, name=name: calls.append((name, torch.is_grad_enabled(), k.get("output_hidden_states"),
                                                     k.get("output_attentions"))), with_kwargs=True)
        model.lm_head.register_forward_hook(
            lambda m, a, out, name=name: heads.append((name, torch.is_grad_enabled(), out.shape[-2])))
    steps, new = 3, 4
    trainer(tmp_path, student=student, teacher=teacher, lmbda=1.0, kd_loss="reverse_kl", max_steps=steps,
            logit_chunk_size=4, per_device_train_batch_size=4,
            generation_config={"max_new_tokens": new, "min_new_tokens": new, "do_sample": True}).train()
    assert calls.count(("student", False, None, None)) == steps * new  # generate: the KV cache, no autograd
    assert calls.count(("student", True, None, None)) == steps
    assert calls.count(("teacher", False, None, None)) == steps and len(calls) == steps * (new + 2)
    trained = [(name, kept) for name, grad, kept in heads if grad or name == "teacher"]  # not generate's
    assert [name for name, _ in trained] == ["student", "teacher"] * steps
    assert all(kept > 1 for _, kept in trained[:2]) and all(kept == 1 for _, kept in trained[2:])


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_labels_mask_the_prompt_and_everything_after_the_first_eos(tmp_path, pad_is_eos):
    tok = gen_tokenizer(pad_is_eos)
    t = trainer(tmp_path, tok=tok, lmbda=1.0)
    student = t._student()
    student.generate = fake_generate(student)
    batch = PromptCollator(tok)(ROWS)
    out, = t.rollout.window([batch], student, t.teacher, 0, 1)
    for i in range(len(ROWS)):
        prompt = batch["prompt_input_ids"][i][batch["prompt_attention_mask"][i].bool()].tolist()
        completion = fake_completion(prompt)
        real = out["attention_mask"][i].bool()
        assert out["input_ids"][i][real].tolist() == prompt + completion
        assert out["labels"][i][real].tolist() == [-100] * len(prompt) + completion  # EOS carries loss
        assert (out["labels"][i][~real] == -100).all()


# ------------------------------------------------------------------------------ the losses on generated sequences
def divergence(s_logits, t_logits, kind, beta, temperature):
    """Full-vocabulary divergence per position, written out from the definitions."""
    ps = torch.softmax(s_logits.double() / temperature, -1)
    pt = torch.softmax(t_logits.double() / temperature, -1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)  # noqa: E731
    if kind == "forward_kl":
        return kl(pt, ps)
    if kind == "reverse_kl":
        return kl(ps, pt)
    m = beta * pt + (1 - beta) * ps
    return beta * kl(pt, m) + (1 - beta) * kl(ps, m)


def generated_batch(t, seed=0):
    """A batch of the student's completions; the teacher's logits sharpened so the divergences are far from 0."""
    with torch.no_grad():
        t.teacher.lm_head.weight.mul_(20.0)
    torch.manual_seed(seed)
    batch = PromptCollator(t.processing_class)(ROWS)
    return t.rollout.window([batch], t._student(), t.teacher, 0, 1)[0]


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk", [-1, 3])
def test_loss_equals_a_full_vocabulary_divergence_on_the_generated_sequence(tmp_path, kind, chunk):
    t = trainer(tmp_path, lmbda=1.0, kd_loss=kind, jsd_beta=0.3, temperature=2.0, logit_chunk_size=chunk,
                generation_config={"max_new_tokens": 6, "do_sample": True})
    batch = generated_batch(t)
    student = t._student().train()
    loss = t.compute_loss(student, batch)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        te = t.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    expected = 2.0**2 * divergence(s[mask], te[mask], kind, 0.3, 2.0).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_identical_teacher_and_student_give_zero_loss_and_gradients(tmp_path):
    teacher = make_llama(seed=3)
    t = trainer(tmp_path, student=copy.deepcopy(teacher), teacher=teacher, lmbda=1.0, kd_loss="jsd")
    torch.manual_seed(0)
    batch = t.rollout.window([PromptCollator(t.processing_class)(ROWS)], t._student(), t.teacher, 0, 1)[0]
    assert (batch["labels"] != -100).sum() > len(ROWS)
    student = t._student().train()
    loss = t.compute_loss(student, batch)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert max(p.grad.abs().max().item() for p in student.parameters() if p.grad is not None) < 1e-6


def _one_step(tmp_path, name, make_student, make_teacher, encoder_decoder, **kw):
    student = make_student()
    student.generate = fake_generate(student, encoder_decoder)
    t = trainer(tmp_path / name, student=student, teacher=make_teacher(), lmbda=1.0, max_steps=1, optim="sgd",
                learning_rate=0.5, lr_scheduler_type="constant", kd_loss="forward_kl", **kw)
    t.train()
    return {n: p.detach().clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "t5", "bart"])
def test_accumulation_with_completions_of_different_lengths_equals_the_larger_batch(tmp_path, arch):
    makers = {"llama": (lambda: make_llama(seed=1), lambda: make_llama(layers=3, seed=2)),
              "t5": (lambda: make_t5(seed=1), lambda: make_t5(layers=3, seed=2)),
              "bart": (lambda: make_bart(seed=1), lambda: make_bart(layers=3, seed=2))}[arch]
    tok = bart_tokenizer() if arch == "bart" else gen_tokenizer()
    lengths = {len(fake_completion(p)) for p in PromptCollator(tok)(ROWS)["prompt_input_ids"].tolist()}
    assert len(lengths) > 1  # (left padding adds 0s, which do not change a sum)
    start = {n: p.detach().clone() for n, p in makers[0]().named_parameters()}
    big = _one_step(tmp_path, "big", *makers, arch != "llama", tok=tok, per_device_train_batch_size=4)
    small = _one_step(tmp_path, "small", *makers, arch != "llama", tok=tok, per_device_train_batch_size=1,
                      gradient_accumulation_steps=4)
    assert any(not torch.equal(start[n], big[n]) for n in big)  # the step moved the weights
    for n in big:
        torch.testing.assert_close(small[n], big[n], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ seq2seq
def test_t5_decoder_generates_and_its_ids_are_the_labels(tmp_path):
    tok = gen_tokenizer()
    t = trainer(tmp_path, student=make_t5(seed=1), teacher=make_t5(layers=3, seed=2), lmbda=1.0, kd_loss="reverse_kl")
    student = t._student()
    calls = []
    student.generate = counting(student, calls)
    batch = PromptCollator(tok, encoder_decoder=True)(ROWS)
    out, = t.rollout.window([batch], student, t.teacher, 0, 1)
    (_, _, generated), = calls
    assert torch.equal(out["input_ids"], batch["prompt_input_ids"])  # the prompt is the encoder's input
    completion = generated[:, 1:]  # after the decoder's start token
    keep = first_eos_mask(completion, [EOS])
    width = out["labels"].shape[1]
    assert torch.equal(out["labels"], torch.where(keep, completion, -100)[:, :width])
    student.train()
    loss = t.compute_loss(student, out)
    with torch.no_grad():
        decoder_input_ids = student.prepare_decoder_input_ids_from_labels(labels=out["labels"])
        assert torch.equal(decoder_input_ids[:, 1:][keep[:, : width - 1]], completion[:, : width - 1][keep[:, : width - 1]])
        s = student(input_ids=out["input_ids"], attention_mask=out["attention_mask"], decoder_input_ids=decoder_input_ids).logits
        te = t.teacher(input_ids=out["input_ids"], attention_mask=out["attention_mask"], decoder_input_ids=decoder_input_ids).logits
    mask = out["labels"] != -100
    expected = 2.0**2 * divergence(s[mask], te[mask], "reverse_kl", 0.5, 2.0).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_bart_generates_once_per_window_and_the_teacher_scores_exactly_the_generated_decoder_ids(tmp_path):
    student, teacher, calls, seen = make_bart(seed=1), make_bart(layers=3, seed=2), [], []
    student.generate = counting(student, calls)
    teacher.register_forward_pre_hook(
        lambda m, a, k: seen.append((k["input_ids"], k["attention_mask"], k["decoder_input_ids"])), with_kwargs=True)
    t = trainer(tmp_path, student=student, teacher=teacher, tok=bart_tokenizer(), lmbda=1.0, max_steps=2,
                gradient_accumulation_steps=2, generation_config={"max_new_tokens": 5, "do_sample": True})
    t.train()
    assert len(calls) == 2 and all(ids.shape[0] == 4 for ids, _, _ in calls)  # both micro-batches' prompts at once
    assert len(seen) == 4  # one teacher forward per micro-batch
    for w, (prompt, prompt_mask, out) in enumerate(calls):
        assert (out[:, 0] == EOS).all() and (out[:, 1] == BART_BOS).all()  # BART's start token, then the forced <s>
        for half in range(2):
            ids, mask, decoder_ids = seen[2 * w + half]
            rows = slice(2 * half, 2 * half + 2)
            assert torch.equal(ids, prompt[rows]) and torch.equal(mask, prompt_mask[rows])
            kept = first_eos_mask(out[rows, 1:], [EOS]).sum(-1)  # generated tokens up to the first EOS
            assert decoder_ids.shape[1] == kept.max()
            for i, n in enumerate(kept.tolist()):  # the decoder reads what generate fed it: start, <s>, tokens
                assert decoder_ids[i, :n].tolist() == out[rows][i, :n].tolist()
                assert (decoder_ids[i, n:] == BART_PAD).all()


def bart_generated_batch(t, seed=0):
    with torch.no_grad():
        t.teacher.lm_head.weight.mul_(20.0)
    torch.manual_seed(seed)
    batch = PromptCollator(t.processing_class, encoder_decoder=True)(ROWS)
    return t.rollout.window([batch], t._student(), t.teacher, 0, 1)[0]


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk", [-1, 3])
def test_bart_loss_equals_a_full_vocabulary_divergence_on_the_generated_sequence(tmp_path, kind, chunk):
    t = trainer(tmp_path, student=make_bart(seed=1), teacher=make_bart(layers=3, seed=2), tok=bart_tokenizer(),
                lmbda=1.0, kd_loss=kind, jsd_beta=0.3, temperature=2.0, logit_chunk_size=chunk,
                generation_config={"max_new_tokens": 6, "do_sample": True})
    batch = bart_generated_batch(t)
    labels = batch["labels"]
    mask = labels != -100
    assert mask.sum() > 2 * len(ROWS) and (labels[:, 0] == BART_BOS).all()
    student = t._student().train()
    loss = t.compute_loss(student, batch)
    # BART's decoder inputs written out: the start token (EOS), then the labels, -100 read as pad
    decoder_ids = torch.cat([torch.full_like(labels[:, :1], EOS), labels[:, :-1]], 1).masked_fill(
        torch.cat([torch.zeros_like(mask[:, :1]), ~mask[:, :-1]], 1), BART_PAD)
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "decoder_input_ids": decoder_ids}
        s, te = student(**inputs).logits, t.teacher(**inputs).logits
    expected = 2.0**2 * divergence(s[mask], te[mask], kind, 0.3, 2.0).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_bart_dataset_completions_have_the_form_the_decoder_generates(tmp_path):
    tok = bart_tokenizer()
    words = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    batch = PromptCollator(tok, encoder_decoder=True)(ROWS[:2])
    assert batch["prompt_input_ids"][0].tolist() == [BART_BOS, *words("the film was"), EOS]
    # the labels of BART's tokenizer (text_target): <s> first, as generate forces it, and one </s>
    assert batch["completion_input_ids"][0].tolist() == [BART_BOS, *words("very good"), EOS, BART_PAD]
    t = trainer(tmp_path, student=make_bart(seed=1), teacher=make_bart(layers=3, seed=2), tok=tok, lmbda=0.5,
                max_steps=4)
    t.train()
    assert t.rollout.windows["student"] > 0 and t.rollout.windows["dataset"] > 0
    assert all(math.isfinite(log["loss"]) for log in t.state.log_history if "loss" in log)
    generated = t.rollout.window([batch], t._student(), t.teacher, 0, 1)[0]["labels"]
    dataset = t.rollout.dataset_batch(batch)["labels"]
    assert (generated[:, 0] == BART_BOS).all() and (dataset[:, 0] == BART_BOS).all()


# ------------------------------------------------------------------------------ equality with TRL's losses
@pytest.mark.parametrize("beta, kind", [(0.0, "forward_kl"), (1.0, "reverse_kl"), (0.3, "jsd")])
def test_loss_equals_trl_gkd_generalized_jsd(tmp_path, beta, kind):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    t = trainer(tmp_path, lmbda=1.0, kd_loss=kind, jsd_beta=0.3 if kind == "jsd" else 0.5, temperature=1.0,
                generation_config={"max_new_tokens": 6, "do_sample": True})
    batch = generated_batch(t, seed=1)
    student = t._student().train()
    loss = t.compute_loss(student, batch)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        te = t.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    trl_loss = gkd.GKDTrainer.generalized_jsd_loss(s, te, labels=batch["labels"][:, 1:], beta=beta, temperature=1.0)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)


@pytest.mark.parametrize("beta, kind", [(0.0, "forward_kl"), (1.0, "reverse_kl"), (0.5, "jsd")])
def test_loss_equals_trl_distillation_trainer_chunked_loss(tmp_path, beta, kind):
    dt = pytest.importorskip("trl.trainer.distillation_trainer")
    t = trainer(tmp_path, lmbda=1.0, kd_loss=kind, temperature=1.0, generation_config={"max_new_tokens": 6})
    batch = generated_batch(t, seed=2)
    student = t._student().train()
    loss = t.compute_loss(student, batch)
    with torch.no_grad():  # what trl.DistillationTrainer._compute_loss gives its loss: last hidden states and heads
        hs = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ht = t.teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    completion_mask = (batch["labels"][:, 1:] != -100).long()
    trl_loss, _, _ = dt._chunked_divergence_loss(hs[:, :-1], ht[:, :-1], student.lm_head.weight, t.teacher.lm_head.weight,
                                                 completion_mask, beta, temperature=1.0)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)


# ------------------------------------------------------------------------------ evaluation
def test_generation_evaluation_logs_metrics_and_gives_compute_metrics_the_texts(tmp_path):
    teacher, received = make_llama(seed=3), []

    def compute_metrics(texts):
        received.append(texts)
        return {"exact": sum(p == r for p, r in zip(texts.predictions, texts.references)) / len(texts.predictions)}

    t = DistillationTrainer(model=copy.deepcopy(teacher), teacher_model=teacher, processing_class=gen_tokenizer(),
                            args=config(tmp_path, eval_generation=True, per_device_eval_batch_size=2),
                            train_dataset=Dataset.from_list(ROWS), eval_dataset=Dataset.from_list(ROWS),
                            compute_metrics=compute_metrics)
    metrics = t.evaluate()
    assert "eval_loss" in metrics  # the student's loss on the dataset's completions, as before
    assert metrics["eval_gen_reverse_kl"] == pytest.approx(0.0, abs=1e-6)  # identical models
    assert metrics["eval_gen_teacher_agreement"] == 1.0
    assert 1 <= metrics["eval_gen_length"] <= 5 and 0 <= metrics["eval_gen_eos_rate"] <= 1
    assert 0 < metrics["eval_gen_distinct_2"] <= 1 and metrics["eval_gen_teacher_nll"] > 0
    texts, = received
    assert isinstance(texts, GeneratedTexts) and len(texts.predictions) == len(ROWS)
    assert texts.references[0] == "very good" and texts.prompts[0] == "the film was"
    assert "eval_exact" in metrics


def test_the_teacher_generates_its_greedy_completions_once_over_evaluations(tmp_path):
    t = DistillationTrainer(model=make_llama(seed=1), teacher_model=make_llama(layers=3, seed=2),
                            processing_class=gen_tokenizer(), args=config(tmp_path, eval_generation=True,
                                                                          per_device_eval_batch_size=2),
                            train_dataset=Dataset.from_list(ROWS), eval_dataset=Dataset.from_list(ROWS))
    student, teacher = t._student(), t.teacher
    s_calls, t_calls = [], []
    student.generate, teacher.generate = counting(student, s_calls), counting(teacher, t_calls)
    batches = -(-len(ROWS) // 2)
    first, second = t.evaluate_generation(), t.evaluate_generation()
    assert len(s_calls) == 2 * batches and len(t_calls) == batches  # the student each time, the teacher once
    assert first == second
    # the same metrics as an evaluation that makes the teacher's completions afresh
    fresh = generation_eval.prefixed_metrics(t.rollout, t.task, student, teacher, t.get_eval_dataloader(),
                                             t.processing_class, None, None, "eval")
    assert len(t_calls) == 2 * batches and fresh == {k: v for k, v in first.items() if k != "epoch"}  # log's
    # other greedy settings are other completions
    t.rollout.greedy_config.max_new_tokens = 3
    t.evaluate_generation()
    assert len(t_calls) == 3 * batches


def test_teacher_nll_of_generation_matches_a_hand_computation(tmp_path):
    t = DistillationTrainer(model=make_llama(seed=1), teacher_model=make_llama(layers=3, seed=2),
                            processing_class=gen_tokenizer(), args=config(tmp_path, eval_generation=True,
                                                                          per_device_eval_batch_size=4),
                            train_dataset=Dataset.from_list(ROWS), eval_dataset=Dataset.from_list(ROWS))
    student = t._student()
    student.generate = fake_generate(student)
    metrics = t.evaluate_generation()
    batch = PromptCollator(t.processing_class)(ROWS)
    lm = t.rollout.dataset_batch({**batch, **dict(zip(("completion_input_ids", "completion_attention_mask"),
                                                      _fake_completions(batch)))})
    with torch.no_grad():
        logits = t.teacher(input_ids=lm["input_ids"], attention_mask=lm["attention_mask"]).logits[:, :-1]
    labels = lm["labels"][:, 1:]
    mask = labels != -100
    nll = -torch.log_softmax(logits[mask], -1).gather(-1, labels[mask][:, None]).mean()
    assert metrics["eval_gen_teacher_nll"] == pytest.approx(nll.item(), rel=1e-5)
    assert metrics["eval_gen_eos_rate"] == 1.0


def _fake_completions(batch):
    ids = fake_generate(torch.nn.Linear(1, 1).eval())(batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                                      GenerationConfig(max_new_tokens=5, use_cache=True))
    c = ids[:, batch["prompt_input_ids"].shape[1]:]
    return c, first_eos_mask(c, [EOS]).long()


def test_generation_metric_selects_the_best_model(tmp_path):
    t = DistillationTrainer(
        model=make_llama(seed=1), teacher_model=make_llama(layers=3, seed=2), processing_class=gen_tokenizer(),
        args=config(tmp_path, eval_generation=True, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                    save_steps=1, max_steps=2, metric_for_best_model="gen_teacher_nll", greater_is_better=False,
                    load_best_model_at_end=True),
        train_dataset=Dataset.from_list(ROWS), eval_dataset=Dataset.from_list(ROWS))
    t.train()
    nlls = [log["eval_gen_teacher_nll"] for log in t.state.log_history if "eval_gen_teacher_nll" in log]
    assert len(nlls) == 2 and t.state.best_metric == pytest.approx(min(nlls))


# ------------------------------------------------------------------------------ refusals before training
def test_bad_generation_inputs_are_refused_before_training(tmp_path):
    chat = [{"messages": [{"role": "user", "content": "the film"}, {"role": "assistant", "content": "good"}]}]
    with pytest.raises(InputError, match="no chat template to render them; set tokenizer.chat_template"):
        trainer(tmp_path, rows=chat)
    with pytest.raises(InputError, match=r"a prompt has 62 tokens and 5 more are generated, past the models' context "
                                         r"of 64 positions \(max_position_embeddings\). Set max_prompt_length <= 59"):
        trainer(tmp_path, rows=[{"prompt": " ".join(["the"] * 62), "completion": "good"}], lmbda=1.0)
    with pytest.raises(InputError, match="prompts without completions"):
        trainer(tmp_path, rows=[{"prompt": "the film"}], lmbda=0.5)
    trainer(tmp_path, rows=[{"prompt": "the film"}], lmbda=1.0)  # prompt-only data serves on-policy training
    with pytest.raises(InputError, match="eval_dataset has no prompt"):
        DistillationTrainer(model=make_llama(seed=1), teacher_model=make_llama(seed=2), processing_class=gen_tokenizer(),
                            args=config(tmp_path, eval_generation=True), train_dataset=Dataset.from_list(ROWS),
                            eval_dataset=Dataset.from_list([{"input_ids": [5, 6, 7]}]))
    with pytest.raises(InputError, match=r"the teacher embeds 24 token ids but the tokenizer has 31 tokens and the "
                                         r"models generate up to 64 ids: the teacher cannot read every token"):
        trainer(tmp_path, teacher=make_llama(vocab=24), lmbda=1.0)
    from conftest import make_bert

    with pytest.raises(InputError, match="generative student"):
        DistillationTrainer(model=make_bert(), teacher_model=make_bert(seed=1), args=config(tmp_path, lmbda=1.0))
    tok = gen_tokenizer()
    tok.pad_token = None
    trainer(tmp_path, tok=tok, lmbda=1.0)
    assert tok.pad_token_id == EOS  # padded with EOS, as the warning says
    tok.pad_token = tok.eos_token = None
    with pytest.raises(InputError, match="no pad token and no EOS token to pad with.*Set tokenizer.pad_token to a "):
        trainer(tmp_path, tok=tok, lmbda=1.0)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_generation_without_any_pad_or_eos_id_is_refused(tmp_path):
    student = make_llama(seed=1)
    student.config.pad_token_id = student.config.eos_token_id = None
    student.generation_config.pad_token_id = student.generation_config.eos_token_id = None
    with pytest.raises(InputError, match="neither the tokenizer nor the generation configs give a pad or an "
                                         "end-of-sequence token id.*processing_class"):
        Rollout(config(tmp_path, lmbda=1.0), "causal_lm", None, student)
    ok = Rollout(config(tmp_path, lmbda=1.0, generation_config={"max_new_tokens": 3, "eos_token_id": 7}), "causal_lm",
                 None, student)
    assert ok.eos_ids == [7] and ok.pad_id == 7


@pytest.mark.parametrize("arch", ["llama", "bart"])
def test_prompts_and_max_new_tokens_past_the_context_are_refused_before_training(tmp_path, arch):
    """Llama and BART embed 64 positions here: a decoder-only model's prompt and completion share them; BART's
    encoder holds the prompt and its decoder the start token and the completion."""
    make, tok = (make_llama, gen_tokenizer) if arch == "llama" else (make_bart, bart_tokenizer)
    def build(rows=ROWS, **kw):
        return trainer(tmp_path, student=make(seed=1), teacher=make(seed=2), tok=tok(), rows=rows, lmbda=1.0, **kw)
    if arch == "llama":  # max_prompt_length is checked itself, although every prompt here is short
        with pytest.raises(InputError, match=r"max_prompt_length=62 lets a prompt have 62 tokens and 5 more are "
                                             r"generated, past the models' context of 64 .*max_prompt_length <= 59"):
            build(max_prompt_length=62)
        with pytest.raises(InputError, match=r"max_new_tokens=64 leaves no room for a prompt .* context of 64"):
            build(generation_config={"max_new_tokens": 64})
    else:
        with pytest.raises(InputError, match=r"max_new_tokens=64 tokens after the decoder's start token exceed the "
                                             r"decoder's context of 64 positions .*Set max_new_tokens <= 63"):
            build(generation_config={"max_new_tokens": 64})
        with pytest.raises(InputError, match=r"a prompt has 72 tokens, past the encoder's context of 64 positions "
                                             r".*Set max_prompt_length <= 64"):
            build(rows=[{"prompt": " ".join(["the"] * 70), "completion": "good"}])
        with pytest.raises(InputError, match=r"max_prompt_length=65 lets a prompt have 65 tokens, past the encoder's"):
            build(max_prompt_length=65)
    build(max_prompt_length=59 if arch == "llama" else 64)  # what the messages advise is accepted
    t = build()  # a prompt longer than the start-up check saw (it reads the first rows) is refused when met
    ids = torch.full((1, 70), 5)
    with pytest.raises(InputError, match="a prompt of this batch has 70 tokens"):
        t.rollout.generate(t._student(), ids, torch.ones_like(ids))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_t5_has_no_position_limit_and_takes_long_prompts(tmp_path):
    t = trainer(tmp_path, student=make_t5(seed=1), teacher=make_t5(seed=2), lmbda=1.0, max_steps=1,
                rows=[{"prompt": " ".join(["the"] * 70), "completion": "good"}] * 2)
    t.train()
    assert t.rollout.windows["student"] == 1


@pytest.mark.parametrize("seq_kd", [False, True])
def test_padding_ids_a_reader_cannot_embed_are_never_generated(tmp_path, seq_kd):
    """One tokenizer (31 tokens), embeddings padded to two sizes: the model that generates is pushed towards its
    padding ids; the ids the other model cannot embed are suppressed, and training runs."""
    small, large = make_llama(vocab=48, seed=1), make_llama(layers=3, seed=2)
    student, teacher = (large, small) if not seq_kd else (small, make_llama(layers=3, vocab=96, seed=2))
    generator = teacher if seq_kd else student
    with torch.no_grad():
        generator.lm_head.weight[48:] *= 50.0  # padding rows dominate the logits
    calls = []
    generator.generate = counting(generator, calls)
    t = trainer(tmp_path, student=student, teacher=teacher, lmbda=0.0 if seq_kd else 1.0, seq_kd=seq_kd, max_steps=2,
                generation_config={"max_new_tokens": 5, "do_sample": True})
    assert t.rollout.generation_config.suppress_tokens == list(range(48, 96 if seq_kd else 64))
    t.train()
    generated = torch.cat([out[:, prompt.shape[1]:] for prompt, _, out in calls])
    assert len(calls) == 2 and generated.max() < 48 and generated.numel() > 0
    assert all(math.isfinite(log["loss"]) for log in t.state.log_history if "loss" in log)


def test_t5_trains_end_to_end_with_mixed_windows(tmp_path):
    t = trainer(tmp_path, student=make_t5(seed=1), teacher=make_t5(layers=3, seed=2), lmbda=0.5, max_steps=4)
    t.train()
    assert t.rollout.windows["student"] + t.rollout.windows["dataset"] == 4
    assert all(math.isfinite(log["loss"]) for log in t.state.log_history if "loss" in log)


# ------------------------------------------------------------------------------ two gloo processes
DRIVER = r'''
import json, os, pathlib, sys
sys.path.insert(0, os.environ["KD_TESTS"])
import torch
from datasets import Dataset
import test_generation as tg

rank, out = int(os.environ.get("RANK", "0")), os.environ["KD_OUT"]
student, calls = tg.make_llama(seed=1), []
student.generate = tg.fake_generate(student, calls=calls)
args = tg.config(pathlib.Path(out) / f"run{rank}", lmbda=1.0, max_steps=2, optim="sgd", learning_rate=0.5,
                 lr_scheduler_type="constant", per_device_train_batch_size=int(os.environ["KD_BATCH"]))
t = tg.DistillationTrainer(model=student, teacher_model=tg.make_llama(layers=3, seed=2), args=args,
                           train_dataset=Dataset.from_list(tg.ROWS * 2), processing_class=tg.gen_tokenizer())
t.train()
prompts = [ids[m.bool()].tolist() for ids_, mask in calls for ids, m in zip(ids_, mask)]
torch.save({n: p.detach() for n, p in student.named_parameters()}, os.path.join(out, f"{os.environ['KD_TAG']}{rank}.pt"))
with open(os.path.join(out, f"{os.environ['KD_TAG']}{rank}.json"), "w") as f:
    json.dump({"calls": len(calls), "prompts": prompts, "world": t.args.world_size}, f)
'''


@pytest.mark.slow
def test_two_gloo_processes_each_generate_for_their_prompts_and_train_as_one(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "KD_OUT": str(tmp_path),
           "KD_TESTS": str(Path(__file__).resolve().parent), "PYTHONPATH": str(root)}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(root / "recipes/accelerate/multi_cpu.yml"), str(tmp_path / "driver.py")]
    two = subprocess.run(launch, env={**env, "KD_BATCH": "2", "KD_TAG": "two"}, capture_output=True, text=True,
                         timeout=240)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(tmp_path / "driver.py")], env={**env, "KD_BATCH": "4", "KD_TAG": "one"},
                         capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"two{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((tmp_path / "one0.json").read_text())
    assert [r["world"] for r in ranks] == [2, 2] and [r["calls"] for r in ranks] == [2, 2]  # each rank generates
    assert sorted(ranks[0]["prompts"] + ranks[1]["prompts"]) == sorted(single["prompts"])  # for its own prompts
    assert ranks[0]["prompts"] != ranks[1]["prompts"]
    trained = [torch.load(tmp_path / f"{tag}.pt") for tag in ("two0", "two1", "one0")]
    for name in trained[2]:  # both ranks hold the student of one process with the doubled batch
        torch.testing.assert_close(trained[0][name], trained[2][name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(trained[1][name], trained[0][name])


def test_gradient_checkpointing_students_generate_with_the_cache_in_eval_mode_and_keep_checkpointing(tmp_path):
    student, seen = make_llama(seed=1), []
    fake = fake_generate(student)

    def generate(**kw):
        seen.append((student.training, kw["generation_config"].use_cache, student.is_gradient_checkpointing))
        return fake(**kw)

    student.generate = generate
    t = trainer(tmp_path, student=student, lmbda=1.0, max_steps=1, gradient_checkpointing=True)
    t.train()
    assert seen == [(False, True, True)]
    assert student.is_gradient_checkpointing and student.training  # restored after generating


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_generation_evaluation_of_identical_models(tmp_path, arch):
    teacher, tok = (make_t5(seed=4), gen_tokenizer()) if arch == "t5" else (make_bart(seed=4), bart_tokenizer())
    received = []
    t = DistillationTrainer(model=copy.deepcopy(teacher), teacher_model=teacher, processing_class=tok,
                            args=config(tmp_path, eval_generation=True, per_device_eval_batch_size=4),
                            train_dataset=Dataset.from_list(ROWS), eval_dataset=Dataset.from_list(ROWS),
                            compute_metrics=lambda texts: received.append(texts) or {})
    metrics = t.evaluate_generation()
    assert metrics["eval_gen_reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["eval_gen_teacher_agreement"] == 1.0 and metrics["eval_gen_teacher_nll"] > 0
    texts, = received
    assert texts.references[1] == "quite dull really" and texts.prompts[1] == "a story"  # special tokens dropped


def test_generation_is_refused_on_backends_that_shard_the_models(tmp_path):
    from types import SimpleNamespace

    from hf_kd.distill.rollout import backend_problems

    fsdp = SimpleNamespace(shards_models=True, name="FSDP")
    assert backend_problems(fsdp, config(tmp_path, lmbda=0.5)) and backend_problems(fsdp, config(tmp_path, seq_kd=True))
    assert not backend_problems(fsdp, config(tmp_path)) and not backend_problems(SimpleNamespace(shards_models=False,
                                                                                               name="DDP"),
                                                                              config(tmp_path, lmbda=1.0))


def test_across_tokenizers_the_teacher_scores_its_own_tokens_of_the_generated_text(tmp_path):
    """A teacher with its own (smaller) vocabulary reads the generated text re-tokenized (teacher_tokenizer), so
    on-policy distillation is not refused for its size (seq_kd across tokenizers: test_distill_cross_generation)."""
    from xtok_tokenizers import byte_bpe, wordpiece

    bpe, wp = byte_bpe(), wordpiece()
    assert len(wp) < len(bpe)
    student, teacher, seen = make_llama(vocab=len(bpe), seed=1), make_llama(vocab=len(wp), seed=2), []
    reply = bpe(" very good", add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]

    def generate(input_ids, attention_mask, generation_config):
        return torch.cat([input_ids, torch.tensor([reply] * len(input_ids))], 1)

    student.generate = generate
    teacher.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"]), with_kwargs=True)
    def build(**kw):
        return DistillationTrainer(model=student, teacher_model=teacher, processing_class=bpe, teacher_tokenizer=wp,
                                   train_dataset=Dataset.from_list(ROWS),
                                   args=config(tmp_path, teacher_tokenizer="wp", logit_chunk_size=-1, max_steps=1,
                                               **kw))
    build(lmbda=1.0).train()
    (ids,), rows = seen, [r["prompt"] + " very good" for r in ROWS[:2]]
    assert ids.max() < len(wp) and wp.decode(ids[0], skip_special_tokens=True) == rows[0]
