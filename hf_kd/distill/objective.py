"""The distillation objective: from the models' outputs to the loss terms and their weighted sum.

    loss = alpha * T^2 * KD(teacher || student) + (1 - alpha) * CE(student, labels)
         + hidden_weight * hidden + attention_weight * attention + relation_weight * relation

Each term is a pure loss of `hf_kd.losses` / `hf_kd.chunked` / `hf_kd.relations`, divided by the normalisers of
the accumulation window (`hf_kd.distill.targets.count_items`). `Objective` returns the weighted total and the
unweighted components that the trainer logs (`hf_kd.losses.COMPONENTS`). `Meter` sums the components between
two logs.
"""

from __future__ import annotations

import torch

from .. import relations
from ..chunked import chunked_cross_entropy_loss, chunked_logit_distillation_loss
from ..config import DistillationConfig
from ..losses import COMPONENTS, attention_loss, cross_entropy_loss, hidden_state_loss, logit_distillation_loss
from ..tasks import TOKEN_TASKS, token_mask
from ..teacher_cache import cached_hidden_states, cached_logit_loss
from .plan import LossPlan
from .targets import Targets, layer_stacks


class Objective:
    """The terms of `plan`, weighted as `args` says; `projections` map student to teacher widths (or are empty)."""

    def __init__(self, args: DistillationConfig, task: str, plan: LossPlan, projections, cached: bool):
        self.args, self.task, self.plan, self.projections, self.cached = args, task, plan, projections, cached

    def __call__(self, batch, targets: Targets, s_out, t_out, counts, *, temperature, alpha, chunk, head_terms=None,
                 captures=None) -> tuple[torch.Tensor, dict]:
        """(weighted total, unweighted components). `head_terms`: the logit terms already computed through the
        output layers (`hf_kd.distill.head_route`); `captures`: MiniLM's (student, teacher) q/k/v captures."""
        args, components = self.args, {}
        total = torch.zeros((), device=args.device, dtype=torch.float32)
        if head_terms is not None:
            loss, components = head_terms
            total = total + loss
        else:
            total = total + self.logit_terms(batch, targets, counts, components, temperature, alpha, chunk)
        stacks = self.stacks(batch, s_out, t_out, counts)
        if self.plan.hidden:
            components["hidden_loss"] = self.hidden_term(stacks)
            total = total + args.hidden_weight * components["hidden_loss"]
        if self.plan.attention_maps:
            components["attention_loss"] = self.attention_term(stacks)
            total = total + args.attention_weight * components["attention_loss"]
        if self.plan.minilm:
            components["attention_loss"] = self.minilm_term(batch, captures, counts)
            total = total + args.attention_weight * components["attention_loss"]
        if args.uses_relations:
            components["relation_loss"] = self.relation_term(batch, s_out, t_out) / counts["micro_batch"]
            total = total + args.relation_weight * components["relation_loss"]
        return total, components

    def logit_terms(self, batch, targets: Targets, counts, components, temperature, alpha, chunk) -> torch.Tensor:
        """The weighted KD and CE terms on the logits (chunked over positions when `chunk`)."""
        args = self.args
        total = torch.zeros((), device=args.device, dtype=torch.float32)
        n_heads = len(targets.student)
        kd_loss = chunked_logit_distillation_loss if chunk else logit_distillation_loss
        ce_loss = chunked_cross_entropy_loss if chunk else cross_entropy_loss
        chunking = {"chunk_size": chunk} if chunk else {"class_mask": targets.class_mask}  # token tasks: no class mask
        if args.uses_teacher_logits and self.cached:  # at the cache's temperature (no T schedule)
            components["kd_loss"] = cached_logit_loss(batch, targets.student[0], targets.mask, args, counts["logit"])
            total = total + alpha * temperature**2 * components["kd_loss"]
        elif args.uses_teacher_logits:
            components["kd_loss"] = sum(
                kd_loss(s, t, targets.mask, kind=args.kd_loss, temperature=temperature, jsd_beta=args.jsd_beta,
                        normalizer=counts["logit"], **chunking)
                for s, t in zip(targets.student, targets.teacher)
            ) / n_heads
            total = total + alpha * (1.0 if args.kd_loss == "mse" else temperature**2) * components["kd_loss"]
        if all(label is not None for label in targets.labels) and alpha < 1:
            components["ce_loss"] = sum(
                ce_loss(s, label, normalizer=counts["label"], **chunking)
                for s, label in zip(targets.student, targets.labels)
            ) / n_heads
            total = total + (1 - alpha) * components["ce_loss"]
        return total

    def stacks(self, batch, s_out, t_out, counts) -> list:
        if not (self.plan.hidden or self.plan.attention_maps):
            return []
        stacks = layer_stacks(self.plan, self.task, batch, s_out, t_out, counts)
        if self.plan.hidden and t_out is None:  # teacher_cache: the teacher's hidden states saved beside its logits
            layers = sorted({kt for _, kt in self.plan.hidden_pairs})
            stacks[0].t_hidden = cached_hidden_states(batch, layers, stacks[0].mask)
        return stacks

    def hidden_term(self, stacks) -> torch.Tensor:
        """The mean over every mapped pair (encoder-decoder: the encoder's and the decoder's)."""
        losses = []
        for stack in stacks:
            for ks, kt in stack.hidden_pairs:
                hs = stack.s_hidden[ks]
                if len(self.projections):
                    hs = self.projections[len(losses)](hs)  # (B, T, D_teacher)
                losses.append(hidden_state_loss(hs, stack.t_hidden[kt], stack.mask, kind=self.args.hidden_loss,
                                                normalizer=stack.token))
        return torch.stack(losses).mean()

    def attention_term(self, stacks) -> torch.Tensor:
        kind, losses = self.args.attention_loss, []
        for stack in stacks:
            s_attn, t_attn = stack.s_attn, stack.t_attn
            if stack.attention_pairs and (not s_attn or not t_attn or any(a is None for a in (*s_attn, *t_attn))):
                raise RuntimeError(
                    f"the models returned no {stack.name}attention maps although attention_weight > 0. Load "
                    "both with attn_implementation='eager' (sdpa and flash attention do not return them)."
                )
            norm = stack.pair if kind == "mse" else stack.token
            losses += [attention_loss(s_attn[ks - 1], t_attn[kt - 1], stack.mask, kind=kind, normalizer=norm)
                       for ks, kt in stack.attention_pairs]
        return torch.stack(losses).mean()

    def minilm_term(self, batch, captures, counts) -> torch.Tensor:
        s_cap, t_cap = captures
        mask = token_mask(batch)  # (B, T)
        return torch.stack([
            relations.minilm_relation_loss(s_cap.get(ks), t_cap.get(kt), mask, self.plan.minilm_relation_heads,
                                           normalizer=counts["token"])
            for ks, kt in self.plan.attention_pairs
        ]).mean()

    def relation_term(self, batch, s_out, t_out) -> torch.Tensor:
        """`relation_loss` between the examples of this micro-batch, on one embedding per example.

        The embedding is the last hidden state at the first valid token or averaged over valid tokens
        (`relation_pooling`; token-level tasks always average). Relations are batch-level: with gradient
        accumulation (and several processes) each micro-batch gives its own relation loss and the trainer
        averages them, which cannot equal the relation loss of the larger batch (other pairs, another mean
        distance); accumulation stays exact for every other loss.
        """
        mask = token_mask(batch)  # (B, T)
        pooling = "mean" if self.task in TOKEN_TASKS else self.args.relation_pooling
        s_emb = relations.pool_examples(s_out.hidden_states[-1], mask, pooling)  # (B, Ds)
        t_emb = relations.pool_examples(t_out.hidden_states[-1], mask, pooling)  # (B, Dt)
        return relations.sample_relation_loss(s_emb, t_emb, mask.any(-1), kind=self.args.relation_loss)


class Meter:
    """The loss components summed over the micro-batches since the last log, and their per-step means."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0  # optimizer steps whose components are in `sums` (also after a resume)

    def add(self, components: dict) -> None:
        for name, value in components.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()

    def vector(self, device) -> torch.Tensor:
        """Sums then presence flags of every component, in `COMPONENTS` order: one fixed-size vector, so that
        every process takes part in its all-reduce even where a component is absent."""
        sums = [torch.as_tensor(self.sums.get(n, 0.0), dtype=torch.float32, device=device) for n in COMPONENTS]
        seen = [float(n in self.sums) for n in COMPONENTS]
        return torch.cat([torch.stack(sums), torch.tensor(seen, device=device)])

    def means(self, totals: list[float]) -> dict[str, float]:
        """The per-step mean of each component present, from the (all-reduced) `vector`; resets the meter."""
        steps, n = max(self.steps, 1), len(COMPONENTS)
        out = {name: totals[i] / steps for i, name in enumerate(COMPONENTS) if totals[n + i] > 0}
        self.sums, self.steps = {}, 0
        return out
