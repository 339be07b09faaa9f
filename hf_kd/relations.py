"""Relation distillation: MiniLM self-attention relations and relations between the examples of a batch.

Pure functions of tensors and masks, fp32 inside, a 0-dim fp32 tensor out, with the reduction convention of
`hf_kd.losses` (sum over valid positions / ``normalizer`` or their count, clamped to >= 1; masked inputs are
replaced by safe values before any arithmetic, so padding changes nothing and an all-masked input gives 0).
A relation compares each model with itself first, so teacher and student widths may differ: no projection.

* `minilm_relation_loss`: MiniLM / MiniLMv2 (Wang et al. 2020, 2021) query-query, key-key and value-value
  relations between the tokens of a sequence: token-level, so exact under gradient accumulation.
* `rkd_distance_loss`, `rkd_angle_loss` (Park et al. 2019) and `batch_similarity_loss` (Tung & Mori 2019):
  relations between the examples of a batch, on one embedding per example (B, D). They are batch-level: the
  mean distance, the angles and the similarity matrix depend on which examples share the batch, so under
  gradient accumulation they are computed per micro-batch and the trainer averages them over the
  micro-batches; that cannot equal the value on the larger batch.

`QKVCapture` holds the forward hooks that read a model's query/key/value projections for the MiniLM loss.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .losses import F32_TINY, Normalizer, _divergence_terms, _reduce, _safe_log_softmax, _valid_mask

__all__ = [
    "RELATION_LOSSES",
    "RELATION_POOLINGS",
    "minilm_relation_loss",
    "rkd_distance_loss",
    "rkd_angle_loss",
    "batch_similarity_loss",
    "sample_relation_loss",
    "QKVCapture",
    "find_qkv_modules",
]

RELATION_LOSSES = ("rkd_distance", "rkd_angle", "rkd", "similarity")
RELATION_POOLINGS = ("first", "mean")
#: Weight of the angle term in ``relation_loss="rkd"``: Park et al. use distance weight 1 and angle weight 2.
RKD_ANGLE_WEIGHT = 2.0
#: Module-name endings of the query, key and value projections (BERT/RoBERTa, Llama/Mistral/Qwen, DistilBERT).
QKV_SUFFIXES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"))

_F32 = torch.float32


# --------------------------------------------------------------------------- #
# MiniLM self-attention relations
# --------------------------------------------------------------------------- #
def _relation_log_probs(x: Tensor, key_valid: Tensor, heads: int) -> Tensor:
    """log softmax(X_r X_r^T / sqrt(d_r)) over valid keys, per relation head r: (B, T, D) -> (B, R, T, T)."""
    B, T, D = x.shape
    d_r = D // heads
    xr = x.reshape(B, T, heads, d_r).transpose(1, 2)  # (B, R, T, d_r)
    scores = xr @ xr.transpose(-1, -2) / math.sqrt(d_r)  # (B, R, T, T)
    return _safe_log_softmax(scores, key_valid[:, None, None, :])  # (B, R, T, T); masked keys get probability 0


def minilm_relation_loss(
    student_qkv: Sequence[Tensor],
    teacher_qkv: Sequence[Tensor],
    mask: Optional[Tensor] = None,
    num_relation_heads: int = 1,
    *,
    normalizer: Normalizer = None,
) -> Tensor:
    """Self-attention relation distillation (MiniLM, Wang et al. 2020; MiniLMv2, Wang et al. 2021).

    Shapes: ``student_qkv`` a sequence of (B, T, Ds) tensors (MiniLMv2: the query, key and value vectors of
    one student layer, all heads concatenated), ``teacher_qkv`` the same number of (B, T, Dt) tensors;
    ``mask`` (B, T) of valid tokens (None = all valid). Ds and Dt may differ (also between q, k and v, as with
    grouped-query attention): ``num_relation_heads`` R must divide every width.

    For each relation type (q-q, k-k, v-v) each vector is split into R relation heads of width d_r = D / R
    and ``relation = softmax(X_r X_r^T / sqrt(d_r))`` over the valid keys, d_r each model's own. Per valid
    query row: KL(teacher relation || student relation) summed over valid keys, averaged over relation
    heads and relation types. Returns the sum over valid query rows / (normalizer or their number),
    clamped to >= 1: the convention of ``attention_loss(kind="kl")``.
    """
    if len(student_qkv) != len(teacher_qkv) or not len(student_qkv):
        raise ValueError(
            f"give the same non-zero number of relation inputs for student ({len(student_qkv)}) and teacher "
            f"({len(teacher_qkv)}), e.g. (query, key, value) of one layer each"
        )
    if not (isinstance(num_relation_heads, int) and num_relation_heads > 0):
        raise ValueError(f"num_relation_heads must be a positive integer, got {num_relation_heads!r}")
    for xs, xt in zip(student_qkv, teacher_qkv):
        if xs.dim() != 3 or xt.dim() != 3 or xs.shape[:2] != xt.shape[:2]:
            raise ValueError(
                f"relation inputs must be (B, T, D) with the same B and T, got student {tuple(xs.shape)} and "
                f"teacher {tuple(xt.shape)}"
            )
        for who, x in (("student", xs), ("teacher", xt)):
            if x.shape[-1] % num_relation_heads:
                raise ValueError(
                    f"num_relation_heads={num_relation_heads} does not divide the {who}'s width {x.shape[-1]}; "
                    "pick a common divisor of the teacher's and the student's widths"
                )
    B, T = student_qkv[0].shape[:2]
    device = student_qkv[0].device
    valid = _valid_mask(mask, torch.Size((B, T)), device)  # (B, T)
    pair = valid[:, None, :, None] & valid[:, None, None, :]  # (B, 1, T, T)

    per_row = torch.zeros((B, T), dtype=_F32, device=device)
    for xs, xt in zip(student_qkv, teacher_qkv):
        xs = torch.where(valid[..., None], xs.to(device).float(), 0.0)  # (B, T, Ds)
        xt = torch.where(valid[..., None], xt.to(device).float(), 0.0)  # (B, T, Dt)
        log_ps = _relation_log_probs(xs, valid, num_relation_heads)  # (B, R, T, T)
        log_pt = _relation_log_probs(xt, valid, num_relation_heads)  # (B, R, T, T)
        terms = torch.where(pair, _divergence_terms(log_pt, log_ps, "forward_kl", 0.5), 0.0)  # (B, R, T, T)
        per_row = per_row + terms.sum(-1).mean(1)  # (B, T)
    per_row = per_row / len(student_qkv)  # (B, T)
    return _reduce(per_row, valid, normalizer)


# --------------------------------------------------------------------------- #
# relations between the examples of a batch
# --------------------------------------------------------------------------- #
def _check_embeddings(student: Tensor, teacher: Tensor, mask: Optional[Tensor]) -> Tensor:
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"sample relations need one embedding per example, (B, D) with the same B, got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    return _valid_mask(mask, student.shape[:1], student.device)  # (B,)


def _safe_norm(x: Tensor) -> Tensor:
    """Euclidean norm over the last dim with a finite gradient (0) where the vector is 0."""
    sq = x.pow(2).sum(-1)
    nonzero = sq > 0
    return torch.where(nonzero, torch.where(nonzero, sq, 1.0).sqrt(), 0.0)


def _smooth_l1(x: Tensor) -> Tensor:
    """Huber loss with threshold 1 (smooth L1): x^2 / 2 for |x| < 1, |x| - 1/2 beyond."""
    a = x.abs()
    return torch.where(a < 1.0, 0.5 * x * x, a - 0.5)


def _differences(e: Tensor, valid: Tensor) -> Tensor:
    """e_i - e_j for every ordered pair, fp32, invalid rows set to 0 first: (B, D) -> (B, B, D)."""
    e = torch.where(valid[:, None], e.float(), 0.0)  # (B, D)
    return e[:, None, :] - e[None, :, :]  # (B, B, D)


def _normalised_distances(e: Tensor, valid: Tensor, pairs: Tensor) -> Tensor:
    """||e_i - e_j|| / mean over valid pairs i != j of the same (0 when every distance is 0)."""
    dist = _safe_norm(_differences(e, valid))  # (B, B)
    n_pairs = pairs.sum().clamp_min(1)
    mean = torch.where(pairs, dist, 0.0).sum() / n_pairs  # ()
    return dist / mean.clamp_min(F32_TINY)  # (B, B)


def rkd_distance_loss(
    student: Tensor, teacher: Tensor, mask: Optional[Tensor] = None, *, normalizer: Normalizer = None
) -> Tensor:
    """Distance-wise relational KD (Park et al. 2019, "Relational Knowledge Distillation", RKD-D).

    Shapes: ``student`` (B, Ds), ``teacher`` (B, Dt), ``mask`` (B,) of valid examples (None = all).
    psi_D(i, j) = ||e_i - e_j|| / mu, mu = mean of ||e_i - e_j|| over valid pairs i != j (each model its own mu,
    so the loss is invariant to scaling either embedding). Per ordered valid pair i != j:
    smooth_l1(psi_D^student - psi_D^teacher) (Huber, threshold 1). Returns the sum / (normalizer or the number
    of ordered pairs n(n - 1)), clamped to >= 1. The authors' code averages over all B^2 entries, the zero
    diagonal included, and takes mu over the non-zero distances; here a duplicate pair (distance 0) counts
    in mu, with a finite gradient.
    """
    valid = _check_embeddings(student, teacher, mask)  # (B,)
    B = valid.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=valid.device)
    pairs = valid[:, None] & valid[None, :] & ~eye  # (B, B)
    d_s = _normalised_distances(student, valid, pairs)  # (B, B)
    d_t = _normalised_distances(teacher.to(student.device), valid, pairs)  # (B, B)
    return _reduce(_smooth_l1(d_s - d_t), pairs, normalizer)


def _cosines(e: Tensor, valid: Tensor) -> Tensor:
    """cos of the angle at vertex j of (e_i, e_j, e_k): <u_ij, u_kj>, u_ij = (e_i - e_j) / ||e_i - e_j||.

    Indexed [j, i, k]: (B, D) -> (B, B, B); a zero difference (duplicates) gives a zero vector, so cosine 0.
    """
    diff = -_differences(e, valid)  # [j, i] = e_i - e_j: (B, B, D)
    norm = _safe_norm(diff)  # (B, B)
    unit = diff / torch.where(norm > 0, norm, 1.0)[..., None]  # (B, B, D)
    return unit @ unit.transpose(-1, -2)  # (B, B, B)


def rkd_angle_loss(
    student: Tensor, teacher: Tensor, mask: Optional[Tensor] = None, *, normalizer: Normalizer = None
) -> Tensor:
    """Angle-wise relational KD (Park et al. 2019, RKD-A).

    Shapes as `rkd_distance_loss`. psi_A(i, j, k) = cos of the angle at e_j in the triangle (e_i, e_j, e_k)
    = <(e_i - e_j)/||e_i - e_j||, (e_k - e_j)/||e_k - e_j||>. Per ordered triple of distinct valid examples:
    smooth_l1(psi_A^student - psi_A^teacher). Returns the sum / (normalizer or the number of triples
    n(n - 1)(n - 2)), clamped to >= 1. The authors' code averages over all B^3 entries, degenerate triples
    included. Invariant to scaling and translating either embedding.
    """
    valid = _check_embeddings(student, teacher, mask)  # (B,)
    B = valid.shape[0]
    idx = torch.arange(B, device=valid.device)
    distinct = (idx[:, None, None] != idx[None, :, None]) & (idx[:, None, None] != idx[None, None, :])
    distinct = distinct & (idx[None, :, None] != idx[None, None, :])  # (B, B, B)
    triples = distinct & valid[:, None, None] & valid[None, :, None] & valid[None, None, :]  # (B, B, B)
    a_s = _cosines(student, valid)  # (B, B, B)
    a_t = _cosines(teacher.to(student.device), valid)  # (B, B, B)
    return _reduce(_smooth_l1(a_s - a_t), triples, normalizer)


def _similarity(e: Tensor, valid: Tensor) -> Tensor:
    """G = F F^T with each row L2-normalised over the valid columns: (B, D) -> (B, B)."""
    e = torch.where(valid[:, None], e.float(), 0.0)  # (B, D)
    g = e @ e.T  # (B, B); invalid rows and columns are 0
    return g / _safe_norm(g).clamp_min(F32_TINY)[:, None]  # (B, B)


def batch_similarity_loss(
    student: Tensor, teacher: Tensor, mask: Optional[Tensor] = None, *, normalizer: Normalizer = None
) -> Tensor:
    """Similarity-preserving KD (Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation").

    Shapes as `rkd_distance_loss`. G = row-normalise(F F^T) for each model on its (B, D) embeddings; per
    valid pair (i, j), the diagonal included: (G_s - G_t)^2. Returns the sum / (normalizer or n^2), clamped to
    >= 1: the paper's ||G_t - G_s||_F^2 / b^2 with b = n valid examples. The paper uses one flattened
    activation map per example; here one embedding per example.
    """
    valid = _check_embeddings(student, teacher, mask)  # (B,)
    pairs = valid[:, None] & valid[None, :]  # (B, B)
    g_s = _similarity(student, valid)  # (B, B)
    g_t = _similarity(teacher.to(student.device), valid)  # (B, B)
    return _reduce((g_s - g_t).pow(2), pairs, normalizer)


def sample_relation_loss(student: Tensor, teacher: Tensor, mask: Optional[Tensor] = None, *, kind: str) -> Tensor:
    """The trainer's ``relation_loss``: one of `RELATION_LOSSES` ("rkd" = distance + 2 * angle, as in Park et al.)."""
    if kind == "rkd_distance":
        return rkd_distance_loss(student, teacher, mask)
    if kind == "rkd_angle":
        return rkd_angle_loss(student, teacher, mask)
    if kind == "rkd":
        return rkd_distance_loss(student, teacher, mask) + RKD_ANGLE_WEIGHT * rkd_angle_loss(student, teacher, mask)
    if kind == "similarity":
        return batch_similarity_loss(student, teacher, mask)
    raise ValueError(f"unknown relation loss {kind!r}; valid kinds are {RELATION_LOSSES}")


def pool_examples(hidden: Tensor, token_mask: Tensor, pooling: str) -> Tensor:
    """One embedding per example from (B, T, D): the first valid token, or the mean over valid tokens. (B, D)."""
    valid = token_mask.to(device=hidden.device, dtype=torch.bool)  # (B, T)
    if pooling == "first":
        first = valid.int().argmax(-1)  # (B,) the first valid position (left or right padding)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]  # (B, D)
    if pooling == "mean":
        h = torch.where(valid[..., None], hidden.float(), 0.0)  # (B, T, D)
        return h.sum(1) / valid.sum(-1, keepdim=True).clamp_min(1).to(_F32)  # (B, D)
    raise ValueError(f"unknown relation pooling {pooling!r}; valid poolings are {RELATION_POOLINGS}")


# --------------------------------------------------------------------------- #
# reading query / key / value vectors with forward hooks
# --------------------------------------------------------------------------- #
def _blocks(model: nn.Module, num_layers: int) -> list[nn.Module]:
    """The transformer blocks: the ModuleList of ``num_layers`` modules that hold the q/k/v projections."""
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            names = {n.rsplit(".", 1)[-1] for n, _ in module[0].named_modules()}
            if any(set(s) <= names for s in QKV_SUFFIXES):
                return list(module)
    return []


def find_qkv_modules(model: nn.Module, num_layers: int, layers: Sequence[int], who: str = "model") -> dict:
    """{layer: (query, key, value) modules} for the given layers (counting from 1), found by name suffix.

    Raises ValueError naming the model and the suffixes looked for when a block or a projection is missing
    (e.g. a fused qkv projection such as GPT-2's c_attn).
    """
    blocks = _blocks(model, num_layers)
    if not blocks:
        raise ValueError(
            f"the {who} ({type(model).__name__}) has no list of {num_layers} transformer blocks with separate "
            f"query/key/value projections named {' / '.join('|'.join(s) for s in QKV_SUFFIXES)}; "
            "attention_loss='minilm' cannot read its relations (fused projections are not supported). "
            "Use attention_loss='mse' or 'kl'."
        )
    found = {}
    for layer in layers:
        named = list(blocks[layer - 1].named_modules())
        for suffixes in QKV_SUFFIXES:
            hits = [[m for n, m in named if n.rsplit(".", 1)[-1] == s] for s in suffixes]
            if all(hits):
                if any(len(h) > 1 for h in hits):
                    raise ValueError(
                        f"layer {layer} of the {who} has several modules named {'/'.join(suffixes)} (e.g. "
                        "self- and cross-attention); attention_loss='minilm' needs exactly one of each."
                    )
                found[layer] = tuple(h[0] for h in hits)
                break
    return found


def projection_width(module: nn.Module) -> Optional[int]:
    """The output width of a projection module (nn.Linear or a wrapper around one), or None when unknown."""
    width = getattr(module, "out_features", None)
    if width is None:
        width = getattr(getattr(module, "base_layer", None), "out_features", None)  # a PEFT LoRA wrapper
    return width


class QKVCapture:
    """Forward hooks that keep the query, key and value projection outputs of some layers, while entered.

    ``with QKVCapture(modules) as cap: model(...)`` then ``cap.outputs[layer]`` is the (q, k, v) tuple of
    that forward pass. The hooks are removed on exit, also after an error: none outlives one loss
    computation, so evaluation, saving and a recomputing backward pass (gradient checkpointing) never see
    them. The outputs keep their autograd graph; the caller decides about no_grad.
    """

    def __init__(self, modules: dict):
        self.modules = modules
        self.outputs: dict[int, list] = {}
        self._handles: list = []

    def __enter__(self) -> "QKVCapture":
        self.outputs = {layer: [None, None, None] for layer in self.modules}
        for layer, trio in self.modules.items():
            for i, module in enumerate(trio):
                self._handles.append(module.register_forward_hook(self._keep(layer, i)))
        return self

    def _keep(self, layer: int, i: int):
        def hook(module, args, output):
            self.outputs[layer][i] = output

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def get(self, layer: int) -> tuple:
        trio = self.outputs.get(layer)
        if trio is None or any(x is None for x in trio):
            raise RuntimeError(
                f"the query/key/value projections of layer {layer} did not run in the forward pass; "
                "attention_loss='minilm' cannot read them"
            )
        return tuple(trio)
