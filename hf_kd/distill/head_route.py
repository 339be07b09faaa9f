"""The chunked route of the logit losses through the output layers: the full logits are never made.

For the LM tasks, with a chunk size, the KD and CE losses can start from what enters the student's and the
teacher's output layers (`hf_kd.chunked.HeadTap`, `linear_head_loss`). The route is checked once, on the first
batch, against the real logits; it is off (the full logits, chunked) when the run is distributed, when a head
is not a plain `nn.Linear`, when a model changes its logits after the head, or when the check fails.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .. import distributed
from ..chunked import HeadTap, auto_chunk_size, linear_head_loss
from ..config import DistillationConfig
from ..tasks import TOKEN_TASKS, shift_predictions
from ..teacher_cache import cached_topk
from .targets import Targets
from .tied_embedding import sparse_embedding_grad, tied_embedding

logger = logging.getLogger(__name__)

#: logit_chunk_size=0 (auto) chunks the logit losses of token-level tasks from this many classes on.
AUTO_CHUNK_MIN_VOCAB = 8192
# Tasks whose logits come from a linear head over the vocabulary: the chunked losses can start from its input.
HEAD_TASKS = ("causal_lm", "masked_lm", "seq2seq_lm")
# Config fields of models that change the logits after the head (soft-capping, scales): no head route.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def logit_chunk_size(args: DistillationConfig, task: str, student_config, device) -> int:
    """Positions per chunk of the logit losses (`logit_chunk_size`); 0 = unchunked."""
    size = args.logit_chunk_size
    if size == -1 or task not in TOKEN_TASKS or args.teacher_tokenizer is not None:  # aligned terms: unchunked
        return 0
    if size > 0:
        return size
    config = student_config
    classes = config.num_labels if task == "token_classification" else config.get_text_config().vocab_size
    return auto_chunk_size(classes, device) if classes >= AUTO_CHUNK_MIN_VOCAB else 0


def route_problem(student, teacher, uses_teacher_logits: bool, backend) -> str | None:
    """Why the logit losses cannot start from the heads' inputs, or None."""
    if backend.kind != distributed.SINGLE:
        # Under DDP, FSDP and DeepSpeed the heads' weights are read outside the wrapped forward pass, which
        # is untested (FSDP and ZeRO-3 even hold them in shards): the full logits are chunked instead.
        return f"the run is distributed ({backend.name})"
    models = [("student", student), ("teacher", teacher)][: 2 if uses_teacher_logits else 1]
    for name, m in [(name, m) for name, m in models if m is not None]:  # teacher_cache: no teacher
        head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
        if type(head) is not nn.Linear:  # an adapter (LoRA) or any other module is not a plain x @ W.T + b
            return f"the {name}'s output layer is {type(head).__name__}, not a plain torch.nn.Linear"
        text = m.config.get_text_config()
        for field in LOGIT_POSTPROCESSING:
            value = getattr(text, field, None)
            if value not in (None, 1, 1.0):
                return f"the {name} changes its logits after the head ({field}={value})"
    return None


def kept_rows(x: torch.Tensor, classes: int | None) -> torch.Tensor:
    """The first `classes` rows of a head's weight or bias, or the tensor itself when it has no more (None: all).

    A slice, even of every row, puts a SliceBackward node before the weight: its backward fills a (V, D) buffer
    with zeros and copies the gradient into it, each step."""
    return x if classes is None or classes >= x.shape[0] else x[:classes]


class HeadRoute:
    """Whether the logit losses go through the heads (`active`: None until checked on the first batch)."""

    def __init__(self, args: DistillationConfig, task: str, teacher, teacher_runner, n_teachers: int, chunk: int):
        self.args, self.task, self.teacher, self.chunk = args, task, teacher, chunk
        self.teacher_runner, self.n_teachers = teacher_runner, n_teachers
        self.active: bool | None = None
        self.into_grad = False  # this batch's tied head weight takes its gradient in .grad (`student_forward`)

    def taps(self, student, backend) -> tuple[HeadTap | None, HeadTap | None]:
        """Hooks on the student's and the teacher's output layers when the logit losses go through them.

        The first batch runs the full heads, to check that ``head(hidden)`` is the model's logits; later
        batches let each head compute one position only. A teacher whose logits no loss reads (alpha=0) computes
        one position from the first batch on, whatever the chunking.
        """
        cached = self.teacher is None  # teacher_cache: top-k targets read from disk, through the student's head
        if not cached and self.n_teachers != 1:  # several teachers (a mixture target): the full logits, chunked
            return None, None
        trim = None if cached or self.args.uses_teacher_logits else self._unused_teacher_head()
        if self.active is False or self.task not in HEAD_TASKS or not self.chunk:
            return None, trim
        if self.active is None:
            problem = route_problem(student, self.teacher, self.args.uses_teacher_logits, backend)
            if problem:
                logger.info("Chunked logit losses start from the full logits: %s.", problem)
                self.active = False
                return None, trim
        keep = None if self.active is None else 1
        s_tap = HeadTap(student.get_output_embeddings(), keep)
        if cached:
            return s_tap, None
        t_tap = HeadTap(self.teacher.get_output_embeddings(), keep) if self.args.uses_teacher_logits else trim
        return s_tap, t_tap

    def student_forward(self, s_tap, student, classes: int | None):
        """The context of the student's forward pass: its head tap and, once the route is on, a tied embedding's
        sparse gradient (`hf_kd.distill.tied_embedding`: one (V, D) gradient in the step, not two)."""
        stack = contextlib.ExitStack()
        if s_tap is None:
            return stack
        stack.enter_context(s_tap)
        emb = tied_embedding(student) if self.active and torch.is_grad_enabled() else None
        self.into_grad = emb is not None and (classes is None or classes >= emb.weight.shape[0])
        if self.into_grad:
            stack.enter_context(sparse_embedding_grad(emb))
        return stack

    def _unused_teacher_head(self) -> HeadTap | None:
        """A tap that stops the teacher's head from making logits nobody reads (its hidden states still are)."""
        if self.task not in HEAD_TASKS or self.teacher_runner is not self.teacher:
            return None
        head = self.teacher.get_output_embeddings()
        return HeadTap(head, keep=1) if type(head) is nn.Linear else None

    def verified(self, s_tap, t_tap, s_out, t_out) -> tuple[HeadTap, HeadTap | None] | None:
        """The taps when the route is on; on the first batch, after checking that they reproduce the logits."""
        if s_tap is None:
            return None
        if not self.args.uses_teacher_logits:
            t_tap = None  # the teacher's tap only trims its unused logits (with a cache `taps` gives none)
        if self.active is None:
            self.active = s_tap.reproduces(s_out.logits) and (t_tap is None or t_tap.reproduces(t_out.logits))
            if not self.active:
                logger.info(
                    "Chunked logit losses start from the full logits: the output layer applied to its input does not "
                    "give the model's logits (something happens after the head, or it runs more than once)."
                )
                return None
        return s_tap, t_tap

    def terms(self, heads, batch, targets: Targets, counts, temperature, alpha) -> tuple:
        """(weighted KD + CE, {"kd_loss", "ce_loss"}) from the hidden states entering the heads, chunked."""
        args, components = self.args, {}
        into_grad, self.into_grad = self.into_grad, False
        s_tap, t_tap = heads
        hs, ht = s_tap.hidden, t_tap.hidden if t_tap is not None else None  # (B, T, D)
        if self.task == "causal_lm":  # position i predicts token i+1, as in `logit_targets`
            hs, ht = shift_predictions(hs), shift_predictions(ht) if ht is not None else None  # (B, T-1, D)
        labels = targets.labels[0]
        kd_weight = alpha * (1.0 if args.kd_loss == "mse" else temperature**2) if args.uses_teacher_logits else None
        ce_weight = 1 - alpha if labels is not None and alpha < 1 else None
        if kd_weight is None and ce_weight is None:
            return torch.zeros((), device=hs.device), components
        topk = None
        if kd_weight is not None and self.teacher is None:  # teacher_cache: its rows of this batch, checked
            topk = cached_topk(batch, targets.mask)
            temperature = args.temperature  # the cache's (temperature schedules are refused with a cache)
        kept = targets.classes  # the shared vocabulary of a padded pair (None: every row)
        weight = [kept_rows(tap.head.weight, kept) if tap is not None else None for tap in (s_tap, t_tap)]
        bias = [kept_rows(tap.head.bias, kept) if tap is not None and tap.head.bias is not None else None
                for tap in (s_tap, t_tap)]
        out = linear_head_loss(
            hs, weight[0], ht, weight[1], targets.mask, labels,
            teacher_topk=topk, student_bias=bias[0], teacher_bias=bias[1],
            kd_weight=kd_weight, ce_weight=ce_weight, kind=args.kd_loss, temperature=temperature,
            jsd_beta=args.jsd_beta, normalizer=counts["logit"], ce_normalizer=counts["label"], chunk_size=self.chunk,
            student_dtype=s_tap.dtype, teacher_dtype=t_tap.dtype if t_tap is not None else None,
            weight_grad_into_grad=into_grad,
        )
        if out.kd is not None:
            components["kd_loss"] = out.kd
        if out.ce is not None:
            components["ce_loss"] = out.ce
        return out.loss, components
