"""Sequence-level KD across tokenizers: the teacher's completions of the student's prompts, in the student's tokens.

With ``seq_kd`` and ``teacher_tokenizer`` the teacher writes the completions in its own tokenizer (`TeacherWriter`):

1. the student's prompt ids are decoded to text (special tokens left out) and tokenized for the teacher, padded on
   the left as `generate` wants of a decoder-only model (an encoder-decoder's on the right);
2. the teacher generates with the run's ``generation_config`` (sampling, max_new_tokens), stopping at its own EOS;
3. the completion's text is what the teacher's decoding of prompt + completion holds after its decoding of the
   prompt (a decoder that joins words with spaces, WordPiece's, keeps the space between prompt and completion); an
   encoder-decoder's completion is decoded alone;
4. that text is tokenized with the student's tokenizer, followed by the student's EOS where the teacher ended with
   its own.

The LM batch is then built from the student's tokens like any other; at the loss step the teacher reads its own
tokenization of prompt + completion again (`hf_kd.distill.cross_tokenizer`). ``max_new_tokens`` counts the teacher's
tokens: the student's tokenization of the same text may be longer or shorter.
"""

from __future__ import annotations

import copy

import torch

from ..prompts import pad


def _ids(value) -> list[int]:
    return [value] if isinstance(value, int) else list(value or [])


class TeacherWriter:
    """The teacher's completions (`completions`) of a window's prompts, as student token ids."""

    def __init__(self, student_tokenizer, teacher_tokenizer, teacher, generation_config, student_eos: int, pad_id: int,
                 encoder_decoder: bool = False):
        self.s_tok, self.s_eos, self.pad_id, self.encoder_decoder = student_tokenizer, student_eos, pad_id, encoder_decoder
        self.t_tok = copy.deepcopy(teacher_tokenizer)  # the user's tokenizer is left as it is
        self.t_tok.padding_side = "right" if encoder_decoder else "left"
        defaults = getattr(teacher, "generation_config", None)
        eos = _ids(teacher_tokenizer.eos_token_id) + _ids(getattr(defaults, "eos_token_id", None))
        eos += _ids(teacher.config.get_text_config().eos_token_id) if not eos else []
        self.t_eos = sorted(set(eos))
        if self.t_tok.pad_token is None:
            self.t_tok.pad_token = self.t_tok.eos_token or self.t_tok.unk_token
        config = copy.deepcopy(generation_config)
        config.eos_token_id = self.t_eos or None  # none known: the teacher writes max_new_tokens tokens
        config.pad_token_id = self.t_tok.pad_token_id
        if encoder_decoder:  # the teacher's decoder starts from its own start token
            starts = (getattr(defaults, "decoder_start_token_id", None), teacher.config.decoder_start_token_id)
            config.decoder_start_token_id = next((t for t in starts if t is not None), None)
        self.config = config

    def completions(self, generate, teacher, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(completion ids (N, L) in the student's tokens, right-padded with the pad id; their mask (N, L)).

        `generate(model, ids, mask, config)`: the rollout's generation, returning the ids after the prompt."""
        texts = self.s_tok.batch_decode([row[m.bool()].tolist() for row, m in zip(ids, mask)], skip_special_tokens=True)
        enc = self.t_tok(texts, padding=True, return_tensors="pt")
        t_ids, t_mask = enc["input_ids"].to(ids.device), enc["attention_mask"].to(ids.device)
        written = generate(teacher, t_ids, t_mask, self.config).tolist()  # (N, L) the teacher's ids after the prompt
        rows = []
        for prompt, keep, completion in zip(t_ids.tolist(), t_mask.tolist(), written):
            prompt = [i for i, k in zip(prompt, keep) if k]
            end = next((k for k, i in enumerate(completion) if i in self.t_eos), None)
            completion = completion[:end] if end is not None else completion
            rows.append(self.s_tok(self.completion_text(prompt, completion), add_special_tokens=False)["input_ids"]
                        + ([self.s_eos] if end is not None else []))
        c_ids, c_mask = pad(rows, self.pad_id, left=False)
        return c_ids.to(ids.device), c_mask.to(ids.device)

    def completion_text(self, prompt: list[int], completion: list[int]) -> str:
        """The text the teacher's `completion` adds to its `prompt` (both teacher ids); an encoder-decoder's completion
        is a text of its own."""
        decode = lambda x: self.t_tok.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # noqa: E731
        if self.encoder_decoder:
            return decode(completion)
        head, full = decode(prompt), decode(prompt + completion)
        return full[len(head):] if full.startswith(head) else decode(completion)
