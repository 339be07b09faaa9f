"""What the losses compare, for one batch: model inputs vs targets, logits and labels, masks, normalisers.

Every function takes values (the task, the batch, the models' outputs) and returns tensors or plain records;
the causal-LM shift (`hf_kd.tasks.shift_predictions` / `shift_targets`) is applied here and nowhere else in
the trainer's path.
"""

from __future__ import annotations

from dataclasses import dataclass

import inspect

import torch

from ..tasks import logit_row_mask, model_inputs, shift_predictions, shift_targets, token_mask
from .plan import LossPlan


@dataclass
class Targets:
    """What the logit losses compare, for one batch."""

    student: list[torch.Tensor]  # logits, one tensor per head (two for QA: start and end)
    teacher: list[torch.Tensor | None]
    labels: list[torch.Tensor | None]
    mask: torch.Tensor | None  # leading shape of the logits; None = every row valid
    class_mask: torch.Tensor | None  # QA: the positions that exist
    classes: int | None = None  # LM logits kept (one tokenizer padded to two sizes, `hf_kd.distill.vocab`)


def split_inputs(task: str, batch: dict, student) -> dict:
    """The model inputs of a batch: no targets, no cached teacher columns; seq2seq decoder inputs from labels."""
    inputs = {k: v for k, v in model_inputs(batch).items() if not k.startswith("kd_teacher_")}
    if task == "seq2seq_lm" and "labels" in batch and "decoder_input_ids" not in inputs:
        inputs["decoder_input_ids"] = student.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    return inputs


def logit_targets(task: str, batch: dict, s_out, t_out, classes: int | None = None) -> Targets:
    """Student and teacher logits with their labels and masks; causal LM shifted (position i predicts i + 1);
    with `classes`, the first `classes` logits of both (the shared vocabulary of a padded pair)."""
    if task == "question_answering":
        return Targets(
            student=[s_out.start_logits, s_out.end_logits],
            teacher=[getattr(t_out, "start_logits", None), getattr(t_out, "end_logits", None)],
            labels=[batch.get("start_positions"), batch.get("end_positions")],
            mask=None,
            class_mask=token_mask(batch),
        )
    s_logits, t_logits, labels = s_out.logits, getattr(t_out, "logits", None), batch.get("labels")
    if task == "causal_lm":
        s_logits = shift_predictions(s_logits)  # (B, T-1, V)
        t_logits = shift_predictions(t_logits) if t_logits is not None else None
        labels = shift_targets(labels) if labels is not None else None
    if classes is not None:
        s_logits = s_logits[..., :classes]  # (B, T, classes)
        t_logits = t_logits[..., :classes] if t_logits is not None else None
    return Targets([s_logits], [t_logits], [labels], logit_row_mask(task, batch), None, classes)


def count_items(task: str, batch: dict, device) -> dict[str, torch.Tensor]:
    """What each loss divides by, for one batch (summed over an accumulation window by the trainer)."""
    logit_mask = logit_row_mask(task, batch)
    if logit_mask is None:
        rows = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
        logit_rows = torch.tensor(rows, device=device)
    else:
        logit_rows = logit_mask.sum().to(device)
    # The hard-label CE of sequence classification averages over labelled rows: rows whose label
    # is -100 (an unlabelled transfer set) train on the teacher's targets alone.
    labels = batch.get("labels")
    if task == "sequence_classification" and labels is not None and labels.dim() == 1:
        label_rows = (labels != -100).sum().to(device)
    else:
        label_rows = logit_rows
    lengths = token_mask(batch).sum(-1)
    counts = {
        "logit": logit_rows.float(),
        "label": label_rows.float(),
        "token": lengths.sum().to(device).float(),
        "pair": (lengths.float() ** 2).sum().to(device),
        # Batch-level losses (sample relations) are averaged over the micro-batches of all processes.
        "micro_batch": torch.ones((), device=device),
    }
    if task == "seq2seq_lm":  # the decoder's hidden and attention losses average over its own positions
        decoder_lengths = logit_row_mask(task, batch).sum(-1)
        counts["decoder_token"] = decoder_lengths.sum().to(device).float()
        counts["decoder_pair"] = (decoder_lengths.float() ** 2).sum().to(device)
    return counts


def window_counts(task: str, batches: list, device, reduce=None) -> dict[str, torch.Tensor]:
    """The normalisers of an accumulation window: each count summed over its micro-batches (and, with
    `reduce`, accelerate's reduce, over every process), at least 1 so an all-masked window gives 0, not 0/0."""
    counts = [count_items(task, b, device) for b in batches]
    window = {k: torch.stack([c[k] for c in counts]).sum() for k in counts[0]}
    if reduce is not None:
        window = {k: reduce(v, "sum") for k, v in window.items()}
    return {k: v.clamp_min(1) for k, v in window.items()}


def takes_use_cache(models) -> bool:
    """Whether every model takes `use_cache` (decoders): then the forward passes get use_cache=False.

    Decoders build a KV cache unless told not to: memory no training step reads, and with a cache Transformers
    does not separate the examples of a padding-free (packed) batch."""
    return all("use_cache" in inspect.signature(m.forward).parameters and getattr(m.config, "use_cache", None) is not None
               for m in models)


@dataclass
class Stack:
    """One stack of layers whose hidden states and attention maps are distilled, with its pairs and mask."""

    name: str  # "" for a single stack, "encoder " / "decoder " for encoder-decoder models
    s_hidden: tuple | dict | None
    t_hidden: tuple | dict | None
    s_attn: tuple | None
    t_attn: tuple | None
    hidden_pairs: list
    attention_pairs: list
    mask: torch.Tensor  # (B, T) valid positions
    token: torch.Tensor  # normalisers: tokens, and token pairs (attention MSE)
    pair: torch.Tensor


def layer_stacks(plan: LossPlan, task: str, batch: dict, s_out, t_out, counts) -> list[Stack]:
    """One stack for encoder-only and decoder-only models; for encoder-decoder models the encoder (masked by
    attention_mask, pairs from layer_map) then the decoder (masked like its logits: labels != -100, else
    decoder_attention_mask; pairs from decoder_layer_map). Cross-attention maps are not distilled."""
    if not plan.encoder_decoder:
        return [Stack("", getattr(s_out, "hidden_states", None), getattr(t_out, "hidden_states", None),
                      getattr(s_out, "attentions", None), getattr(t_out, "attentions", None),
                      plan.hidden_pairs, plan.attention_pairs, token_mask(batch), counts["token"], counts["pair"])]
    sides = (("encoder", plan.hidden_pairs, plan.attention_pairs, token_mask(batch), ""),
             ("decoder", plan.decoder_hidden_pairs, plan.decoder_attention_pairs, logit_row_mask(task, batch),
              "decoder_"))
    return [
        Stack(side + " ", getattr(s_out, f"{side}_hidden_states", None), getattr(t_out, f"{side}_hidden_states", None),
              getattr(s_out, f"{side}_attentions", None), getattr(t_out, f"{side}_attentions", None),
              hidden, attention, mask, counts[key + "token"], counts[key + "pair"])
        for side, hidden, attention, mask, key in sides
    ]
