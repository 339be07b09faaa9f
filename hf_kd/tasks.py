"""Which task a model solves, and the Auto class that loads a teacher for it."""

from __future__ import annotations

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
