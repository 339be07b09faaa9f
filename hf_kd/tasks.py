"""Which task a model solves, and the Auto class that loads a teacher for it."""

from __future__ import annotations

import torch
import transformers
from transformers.models.auto import modeling_auto

# Checked in this order: a class name found in several mappings takes the first task listed.
TASKS = {
    "sequence_classification": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification"),
    "token_classification": ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification"),
    "question_answering": ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "AutoModelForQuestionAnswering"),
    "seq2seq_lm": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    "causal_lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    "masked_lm": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
}

# Tasks whose logits have one row per token, masked by labels != -100.
TOKEN_TASKS = ("token_classification", "masked_lm", "causal_lm", "seq2seq_lm")
# Keys of a batch that are targets, not model inputs.
TARGET_KEYS = ("labels", "start_positions", "end_positions")


def model_inputs(batch: dict) -> dict:
    """The entries of a batch that a model's forward takes: everything but the targets."""
    return {k: v for k, v in batch.items() if k not in TARGET_KEYS}


def shift_predictions(x):
    """Causal LM: the positions that predict a next token, ``x[:, :-1]`` (logits or hidden states, (B, T-1, ...))."""
    return x[:, :-1]


def shift_targets(x):
    """Causal LM: the token each kept position predicts, ``x[:, 1:]`` (labels or masks, (B, T-1))."""
    return x[:, 1:]


def unwrap(model):
    """The transformers model inside a PEFT wrapper, or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def detect_task(model) -> str:
    """The task of a transformers model, from its class (e.g. BertForSequenceClassification)."""
    name = type(unwrap(model)).__name__
    for task, (mapping, _) in TASKS.items():
        if name in getattr(modeling_auto, mapping).values():
            return task
    raise ValueError(
        f"hf_kd cannot tell which task {name} solves. Use a model with a task head: "
        + ", ".join(auto for _, auto in TASKS.values())
        + " (a base model such as BertModel has no logits to distil)."
    )


def auto_class(task: str):
    return getattr(transformers, TASKS[task][1])


def tasks_of_class(name: str) -> list[str]:
    """Every task whose Auto class maps to the model class `name` (e.g. "BertForTokenClassification")."""
    return [task for task, (mapping, _) in TASKS.items() if name in getattr(modeling_auto, mapping).values()]


def logit_row_mask(task: str, batch: dict):
    """Valid rows of the logits that the logit losses compare, for one batch; None = one row per example
    (sequence classification, QA). Token tasks: labels != -100; without labels, every non-padding position
    (masked LM on unlabelled text) or every decoder position given (seq2seq). Causal LM is shifted by one (the
    logits at position i predict token i + 1, as in Transformers' own causal-LM loss)."""
    if task not in TOKEN_TASKS:
        return None
    labels = batch.get("labels")
    if task == "causal_lm":
        if labels is not None:
            return shift_targets(labels) != -100  # (B, T-1)
        return shift_targets(token_mask(batch))
    if labels is not None:
        return labels != -100  # (B, T)
    if task == "seq2seq_lm":  # no labels: the decoder positions given
        dmask = batch.get("decoder_attention_mask")
        if dmask is not None:
            return dmask.bool()
        ids = batch.get("decoder_input_ids")
        if ids is None:
            raise ValueError(
                "a seq2seq batch needs labels (or decoder_input_ids): the decoder has nothing to read. "
                "Tokenize the targets with tokenizer(text_target=...) or use DataCollatorForSeq2Seq."
            )
        return torch.ones_like(ids, dtype=torch.bool)  # (B, T_decoder)
    return token_mask(batch)


def token_mask(batch: dict):
    """The real (non-padding) input tokens of a batch: its attention mask, or every token."""
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()
