"""Generation-based evaluation (``eval_generation=True``): the student completes the evaluation prompts.

On each evaluation batch of prompts, the student and the teacher generate greedily (``generation_config``'s
max_new_tokens, no sampling, so that the metrics are reproducible), and the teacher scores the student's
completions. The teacher's greedy completions are made at the first evaluation and reused by the later ones
(`TeacherCompletions`): the teacher does not change. Logged with the evaluation prefix (``eval_gen_*``), over
every process:

- ``gen_teacher_nll``: the teacher's negative log-likelihood per token of the student's completions (EOS included):
  how likely the teacher finds what the student writes (lower is better);
- ``gen_reverse_kl``: KL(student || teacher) over the full vocabulary at each completion position, per token: the
  per-token estimate of the sequence-level reverse KL that on-policy distillation minimises;
- ``gen_teacher_agreement``: per prompt, the share of positions where the student's greedy completion has the
  teacher's greedy token (over the longer of the two), averaged over prompts;
- ``gen_length``: completion tokens per prompt (EOS included); ``gen_eos_rate``: the share of completions that end
  with EOS within max_new_tokens; ``gen_distinct_2``: distinct token bigrams / bigrams, over all completions.

Then ``compute_metrics``, when the trainer has one, receives a `GeneratedTexts` (decoded student completions, the
dataset's completions as references, the prompts) and returns more metrics, e.g. ROUGE through `evaluate`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object

from ..prompts import first_eos_mask
from .rollout import Rollout, generation_mode
from .targets import logit_targets, split_inputs

NAMES = ("gen_teacher_nll", "gen_reverse_kl", "gen_teacher_agreement", "gen_length", "gen_eos_rate", "gen_distinct_2")


@dataclass
class GeneratedTexts:
    """What ``compute_metrics`` receives with ``eval_generation=True``."""

    predictions: list[str]  # the student's greedy completions, decoded without special tokens
    references: list[str] | None  # the dataset's completions (None for prompt-only data)
    prompts: list[str]


def kept(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m].tolist() for row, m in zip(ids, mask.bool())]


def agreement(a: list[int], b: list[int]) -> float:
    """The share of positions where two completions have the same token, over the longer one."""
    return sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1)


def distinct_2(completions: list[list[int]]) -> float:
    bigrams = [tuple(c[i: i + 2]) for c in completions for i in range(len(c) - 1)]
    return len(set(bigrams)) / max(len(bigrams), 1)


@torch.no_grad()
def score(task: str, student, teacher, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(teacher NLL sum, reverse-KL sum, tokens) of the labelled positions of an LM batch."""
    inputs = split_inputs(task, batch, student)
    targets = logit_targets(task, batch, student(**inputs), teacher(**inputs))
    mask = targets.mask  # (B, T')
    log_ps = torch.log_softmax(targets.student[0][mask].float(), -1)  # (N, V): labelled positions only
    log_pt = torch.log_softmax(targets.teacher[0][mask].float(), -1)
    labels = targets.labels[0][mask]  # (N,)
    nll = -log_pt.gather(-1, labels[:, None]).sum()
    reverse_kl = (log_ps.exp() * (log_ps - log_pt)).sum()
    return nll, reverse_kl, mask.sum()


class TeacherCompletions:
    """The teacher's greedy completions of each batch of prompts, made once and reused: the teacher is never trained
    and greedy decoding draws nothing, so every evaluation after the first would make the same ones again with the
    largest model's `generate`. Keyed by the batch's prompt ids and mask and the greedy settings; a different
    teacher object starts afresh."""

    def __init__(self):
        self._teacher = None
        self._made: dict[tuple, torch.Tensor] = {}

    def __call__(self, rollout: Rollout, teacher, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if teacher is not self._teacher:
            self._teacher, self._made = teacher, {}
        key = (rollout.greedy_config.to_json_string(), tuple(ids.shape), ids.cpu().numpy().tobytes(),
               mask.cpu().numpy().tobytes())
        if key not in self._made:
            self._made[key] = rollout.generate(teacher, ids, mask, greedy=True)
        return self._made[key]


def evaluate_generation(rollout: Rollout, task: str, student, teacher, batches, tokenizer, reduce=None,
                        gather=None, teacher_completions: TeacherCompletions | None = None,
                        ) -> tuple[dict[str, float], GeneratedTexts | None]:
    """The metrics of the module over `batches` of collated prompts (on the models' device), and the texts.

    `reduce` (accelerate's, "sum") and `gather` (accelerate.utils.gather_object) combine the processes' results;
    `teacher_completions` keeps the teacher's greedy completions from one call to the next (`TeacherCompletions`)."""
    teacher_completions = teacher_completions if teacher_completions is not None else TeacherCompletions()
    sums = torch.zeros(6, dtype=torch.float64)  # nll, rkl, tokens, agreement, rows, eos
    completions, prompt_rows, references = [], [], []
    for batch in batches:
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        s_ids = rollout.generate(student, ids, mask, greedy=True)
        t_ids = teacher_completions(rollout, teacher, ids, mask)
        s_mask, t_mask = first_eos_mask(s_ids, rollout.eos_ids), first_eos_mask(t_ids, rollout.eos_ids)
        with generation_mode(student):
            nll, rkl, tokens = score(task, student, teacher, rollout.lm_batch(ids, mask, s_ids, s_mask))
        s_kept, t_kept = kept(s_ids, s_mask), kept(t_ids, t_mask)
        ends = [bool(c) and c[-1] in rollout.eos_ids for c in s_kept]
        sums += torch.tensor([nll.item(), rkl.item(), tokens.item(), sum(map(agreement, s_kept, t_kept)),
                              len(s_kept), sum(ends)], dtype=torch.float64)
        completions += s_kept
        prompt_rows += kept(ids, mask)
        if "completion_input_ids" in batch:
            c = batch["completion_input_ids"]
            references += kept(c, first_eos_mask(c, rollout.eos_ids, batch["completion_attention_mask"]))
    if reduce is not None:
        sums = reduce(sums.to(next(student.parameters()).device), "sum").cpu()
        completions, prompt_rows, references = gather(completions), gather(prompt_rows), gather(references)
    nll, rkl, tokens, agree, rows, eos = sums.tolist()
    metrics = {
        "gen_teacher_nll": nll / max(tokens, 1), "gen_reverse_kl": rkl / max(tokens, 1),
        "gen_teacher_agreement": agree / max(rows, 1), "gen_length": sum(map(len, completions)) / max(rows, 1),
        "gen_eos_rate": eos / max(rows, 1), "gen_distinct_2": distinct_2(completions),
    }
    texts = None
    if tokenizer is not None:
        decode = lambda rows_: tokenizer.batch_decode(rows_, skip_special_tokens=True)  # noqa: E731
        texts = GeneratedTexts(decode(completions), decode(references) if len(references) == len(completions) else None,
                               decode(prompt_rows))
    return metrics, texts



def prefixed_metrics(rollout: Rollout, task: str, student, teacher, batches, processing_class, accelerator,
                     compute_metrics, prefix: str, teacher_completions: TeacherCompletions | None = None,
                     ) -> dict[str, float]:
    """The trainer's ``evaluate_generation``: the metrics over every process (`accelerator` when there are several,
    else None), then ``compute_metrics``'s on the texts, each key under the evaluation `prefix` (``eval_gen_*``)."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    several = accelerator is not None
    metrics, texts = evaluate_generation(rollout, task, student, teacher, batches, tokenizer,
                                         accelerator.reduce if several else None, gather_object if several else None,
                                         teacher_completions)
    if compute_metrics is not None and texts is not None:
        metrics.update(compute_metrics(texts))
    return {k if k.startswith(f"{prefix}_") else f"{prefix}_{k}": v for k, v in metrics.items()}


@contextlib.contextmanager
def metrics_on_texts(trainer, generation: bool):
    """With generation (``eval_generation``), the trainer's ``compute_metrics`` is kept from its evaluation loop's
    logits: it receives the generated texts instead (`prefixed_metrics`)."""
    compute_metrics = trainer.compute_metrics
    trainer.compute_metrics = None if generation else compute_metrics
    try:
        yield
    finally:
        trainer.compute_metrics = compute_metrics
