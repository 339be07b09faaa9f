"""Prompt-completion data: the formats TRL users have, tokenized and padded into prompt and completion tensors.

A row is one of

- ``{"prompt": str, "completion": str}`` (a prompt-only row, ``{"prompt": str}``, serves when completions are
  always generated: ``lmbda=1`` or ``seq_kd``);
- ``{"prompt": [messages], "completion": [messages]}`` or ``{"messages": [messages]}`` (chat: the last message
  is the completion), rendered through the tokenizer's chat template;
- ``{"prompt_input_ids": [ids], "completion_input_ids": [ids]}``, already tokenized.

`PromptCollator` turns rows into ``prompt_input_ids``/``prompt_attention_mask`` (left-padded for decoder-only
models, as `generate` wants them) and ``completion_input_ids``/``completion_attention_mask`` (right-padded, the
end-of-sequence token appended unless the completion ends with it; seq2seq text completions tokenized as labels).
Which completions a batch trains on is decided per accumulation window by
`hf_kd.distill.rollout`; `causal_batch` / `seq2seq_batch` then make the LM batch the losses read, with labels on
the completion tokens up to and including the first EOS (`first_eos_mask`), -100 on the prompt and after it.
"""

from __future__ import annotations

import torch

from .errors import InputError

__all__ = ["PromptCollator", "PROMPT_KEYS", "is_prompt_data"]

#: The tensors of a collated prompt-completion batch.
PROMPT_KEYS = ("prompt_input_ids", "prompt_attention_mask", "completion_input_ids", "completion_attention_mask")
#: Dataset columns that make a prompt-completion dataset (kept by the trainer although no model takes them).
COLUMNS = ("prompt", "completion", "messages", "prompt_input_ids", "completion_input_ids")


def first_row(dataset) -> dict | None:
    """The first row of a map-style dataset of dict rows, or None."""
    try:
        row = dataset[0] if dataset is not None and len(dataset) else None
    except (TypeError, KeyError, IndexError):
        return None
    return row if isinstance(row, dict) else None


def is_prompt_data(dataset) -> bool:
    """Whether `dataset`'s rows are prompt-completion (or chat) rows rather than model inputs."""
    row = first_row(dataset)
    return row is not None and "input_ids" not in row and any(k in row for k in ("prompt", "messages", "prompt_input_ids"))


def is_chat(row: dict) -> bool:
    return "messages" in row or isinstance(row.get("prompt"), list) and bool(row["prompt"]) \
        and isinstance(row["prompt"][0], dict)


def chat_texts(row: dict, tokenizer) -> tuple[str, str | None]:
    """(prompt text, completion text) of a chat row, rendered by the tokenizer's chat template."""
    if "messages" in row:
        messages = list(row["messages"])
        if not messages:
            raise InputError("a chat row has an empty `messages` list; each row needs at least one message.")
        prompt, completion = (messages[:-1], messages[-1:]) if messages[-1].get("role") == "assistant" else (messages, [])
    else:
        prompt, completion = list(row["prompt"]), list(row.get("completion") or [])
    template = getattr(tokenizer, "apply_chat_template")
    prompt_text = template(prompt, tokenize=False, add_generation_prompt=True)
    if not completion:
        return prompt_text, None
    full = template(prompt + completion, tokenize=False)
    if not full.startswith(prompt_text):
        raise InputError(
            "the chat template renders the prompt differently when the completion follows it, so the completion "
            "cannot be cut from the conversation. Give prompt/completion text columns instead of `messages`."
        )
    return prompt_text, full[len(prompt_text):]


class PromptCollator:
    """Collate prompt-completion rows (see the module) for `DistillationTrainer`.

    Args:
        tokenizer: the student's tokenizer (with a pad token; `DistillationTrainer` sets pad = EOS when it has none).
        encoder_decoder: a seq2seq student (the prompt is the encoder's input, padded on the right).
        max_prompt_length: keep the last this many prompt tokens (None = all).
        max_completion_length: keep the first this many dataset completion tokens, EOS included (None = all).
        lm: return the LM batch of the dataset's completions instead (``input_ids``, ``attention_mask``, ``labels``
            masked on the prompt and after the first EOS), e.g. to train on them with a plain `transformers.Trainer`.
    """

    def __init__(self, tokenizer, encoder_decoder: bool = False, max_prompt_length: int | None = None,
                 max_completion_length: int | None = None, lm: bool = False):
        self.tokenizer, self.encoder_decoder, self.lm = tokenizer, encoder_decoder, lm
        self.max_prompt_length, self.max_completion_length = max_prompt_length, max_completion_length
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        if self.pad is None:
            raise InputError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token.")

    def encode(self, row: dict) -> tuple[list[int], list[int] | None]:
        """(prompt ids, completion ids with EOS appended, or None for a prompt-only row)."""
        if "prompt_input_ids" in row:
            prompt, completion = list(row["prompt_input_ids"]), row.get("completion_input_ids")
            completion = None if completion is None else list(completion)
        else:
            if is_chat(row):
                prompt_text, completion_text = chat_texts(row, self.tokenizer)
                special = False  # the template writes its own special tokens
            else:
                prompt_text, completion_text, special = row["prompt"], row.get("completion"), True
            prompt = self.tokenizer(prompt_text, add_special_tokens=special)["input_ids"]
            completion = None if completion_text is None else self.completion_ids(completion_text, special)
        if self.max_prompt_length is not None:
            prompt = prompt[-self.max_prompt_length:]
        if completion is not None:
            if self.eos is not None and completion[-1:] != [self.eos]:
                completion = completion + [self.eos]
            if self.max_completion_length is not None:
                completion = completion[: self.max_completion_length]
        return prompt, completion

    def completion_ids(self, text: str, special: bool) -> list[int]:
        """A completion's ids. Seq2seq: as the tokenizer makes labels (``text_target``), since that is what the
        decoder was trained to generate: BART's ``<s> text </s>`` (its generate forces the ``<s>``), T5's
        ``text </s>``. Decoder-only (or a chat template): the bare text, which follows the prompt."""
        if self.encoder_decoder and special:
            return self.tokenizer(text_target=text)["input_ids"]
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(r) for r in rows]
        prompts = [p for p, _ in encoded]
        out = dict(zip(PROMPT_KEYS[:2], pad(prompts, self.pad, left=not self.encoder_decoder)))
        completions = [c for _, c in encoded]
        if all(c is not None for c in completions):
            out.update(zip(PROMPT_KEYS[2:], pad(completions, self.pad, left=False)))
        if not self.lm:
            return out
        keep = first_eos_mask(out["completion_input_ids"], [self.eos], out["completion_attention_mask"])
        if self.encoder_decoder:
            return seq2seq_batch(out["prompt_input_ids"], out["prompt_attention_mask"], out["completion_input_ids"], keep)
        return causal_batch(out["prompt_input_ids"], out["prompt_attention_mask"], out["completion_input_ids"], keep,
                            self.pad)


def first_eos_mask(ids: torch.Tensor, eos_ids, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) bool: the valid completion tokens up to and including the first EOS of each row (all valid ones when
    a row has none). Tokens after the first EOS never count, whatever they are (pad, or EOS again when pad == EOS)."""
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid.bool()
    is_eos = torch.isin(ids, torch.as_tensor(list(eos_ids), device=ids.device)) & valid  # (B, L)
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()  # EOS strictly before each position
    return valid & (eos_before == 0)


def causal_batch(prompt_ids, prompt_mask, completion_ids, completion_mask, pad_id: int) -> dict[str, torch.Tensor]:
    """Decoder-only: each row's prompt tokens then its kept completion tokens, right-padded; labels on the
    completion alone."""
    rows = []
    for p, pm, c, cm in zip(prompt_ids, prompt_mask.bool(), completion_ids, completion_mask.bool()):
        p, c = p[pm], c[cm]
        rows.append((torch.cat([p, c]), torch.cat([torch.full_like(p, -100), c])))
    width = max(len(ids) for ids, _ in rows)
    out = {
        "input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
        "labels": torch.full((len(rows), width), -100, dtype=torch.long),
    }
    for i, (ids, labels) in enumerate(rows):
        out["input_ids"][i, : len(ids)], out["labels"][i, : len(ids)] = ids, labels
        out["attention_mask"][i, : len(ids)] = 1
    return {k: v.to(prompt_ids.device) for k, v in out.items()}


def seq2seq_batch(prompt_ids, prompt_mask, completion_ids, completion_mask) -> dict[str, torch.Tensor]:
    """Encoder-decoder: the prompt is the encoder's input, the kept completion tokens the labels."""
    width = max(1, int(completion_mask.sum(-1).max()))
    labels = torch.where(completion_mask.bool(), completion_ids, torch.full_like(completion_ids, -100))[:, :width]
    return {"input_ids": prompt_ids, "attention_mask": prompt_mask, "labels": labels}


def pad(seqs: list[list[int]], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each (B, longest), padded with `value` on the left or the right."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        where = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, where] = torch.tensor(s, dtype=torch.long)
        mask[i, where] = 1
    return ids, mask
