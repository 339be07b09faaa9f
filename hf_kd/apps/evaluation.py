"""The held-out metric of each task, measured the same way for the teacher, the distilled student and the
baseline:

- sequence_classification: accuracy (through the `evaluate` metric, bundled offline);
- token_classification: token accuracy over the labelled tokens (a word's first sub-token);
- question_answering: exact match of the start and the end position (both right);
- causal_lm: perplexity per text, never across texts: ``exp(sum of token NLLs / number of predicted
  tokens)``, each token predicted from the text's earlier tokens; padding counts nowhere;
- masked_lm: perplexity of the masked tokens (the same masks for every model: a fixed seed);
- seq2seq_lm: perplexity of the target tokens given the source.
"""

from __future__ import annotations

import math

import torch

from ..tasks import model_inputs, shift_predictions, shift_targets
from .metrics import load_metric

METRICS = {
    "sequence_classification": "accuracy",
    "token_classification": "token_accuracy",
    "question_answering": "exact_match",
    "masked_lm": "perplexity",
    "causal_lm": "perplexity",
    "seq2seq_lm": "perplexity",
}
LOWER_IS_BETTER = ("perplexity",)
BATCH_SIZE = 64


def evaluate(task: str, model, held_out, collator, pad_id: int | None = None, batch_size: int = BATCH_SIZE) -> float:
    """The task's metric (METRICS[task]) of `model` on the tokenised held-out rows."""
    if task == "sequence_classification":
        return accuracy(model, held_out, collator, batch_size)
    if task == "causal_lm":
        return perplexity(model, held_out["input_ids"], pad_id, batch_size)["perplexity"]
    with torch.random.fork_rng(devices=[]):  # masked LM: the same masks for every model; the caller's RNG untouched
        torch.manual_seed(0)
        counts = _counts(task, model, held_out, collator, batch_size)
    if task in ("masked_lm", "seq2seq_lm"):
        if counts[1] == 0:
            raise ValueError("no labelled token in the held-out rows to measure perplexity on.")
        return math.exp(counts[0] / counts[1])
    return counts[0] / max(counts[1], 1)


@torch.no_grad()
def _counts(task, model, dataset, collator, batch_size) -> tuple[float, int]:
    """(right answers or summed NLL, rows or tokens counted) over the held-out batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    for batch in loader:
        out = model(**{k: v.to(device) for k, v in model_inputs(batch).items()})
        if task == "question_answering":
            right = (out.start_logits.argmax(-1).cpu() == batch["start_positions"]) & (
                out.end_logits.argmax(-1).cpu() == batch["end_positions"])
            total, count = total + int(right.sum()), count + len(right)
            continue
        labels = batch["labels"]  # (B, T)
        mask = labels != -100
        if task == "token_classification":
            total += int(((out.logits.argmax(-1).cpu() == labels) & mask).sum())
        else:  # masked_lm, seq2seq_lm: the logits at a position predict its label; only labelled rows are read
            rows = mask.to(out.logits.device)
            logits = out.logits[rows].float()  # (N, V), N labelled positions
            total += float(torch.nn.functional.cross_entropy(logits, labels.to(rows.device)[rows], reduction="sum"))
        count += int(mask.sum())
    model.train(was_training)
    return total, count


@torch.no_grad()
def accuracy(model, dataset, collator, batch_size=BATCH_SIZE) -> float:
    """Accuracy of `model` on `dataset`, through the `evaluate` metric interface."""
    metric = load_metric("accuracy")
    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    for batch in loader:
        labels = batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        metric.add_batch(predictions=logits.argmax(-1).cpu(), references=labels)
    return float(metric.compute()["accuracy"])


def accuracy_metrics(prediction) -> dict:
    """`compute_metrics` for Trainer.evaluate (the numbers the model card reports)."""
    return load_metric("accuracy").compute(
        predictions=prediction.predictions.argmax(-1), references=prediction.label_ids
    )


# `compute_metrics` of the trainer's own evaluation (the model card's numbers), per task
CARD_METRICS = {"sequence_classification": accuracy_metrics}


def pad_batch(token_lists: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: attention_mask 0 and labels -100 on padding, labels = input ids elsewhere."""
    width = max(len(ids) for ids in token_lists)
    input_ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)  # (B, T)
    for row, ids in enumerate(token_lists):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)  # (B, T)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def perplexity(model, token_lists: list[list[int]], pad_id: int, batch_size: int = 16) -> dict:
    """exp(mean NLL) over every predicted token of every text: token i+1 from tokens 0..i of its own text.

    Returns {"perplexity", "nll_sum", "tokens"}. The model is put in eval mode and restored after.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll_sum, tokens = 0.0, 0
    # Similar lengths together: less padding. Padding changes no number here, only the time.
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    for start in range(0, len(order), batch_size):
        batch = pad_batch([token_lists[i] for i in order[start : start + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        logits = shift_predictions(logits).float()  # (B, T-1, V): position i predicts token i+1
        targets = shift_targets(batch["labels"])  # (B, T-1)
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        nll_sum += float(nll)
        tokens += int((targets != -100).sum())
    model.train(was_training)
    if tokens == 0:
        raise ValueError("no token to predict: every held-out text has fewer than 2 tokens.")
    return {"perplexity": math.exp(nll_sum / tokens), "nll_sum": nll_sum, "tokens": tokens}
