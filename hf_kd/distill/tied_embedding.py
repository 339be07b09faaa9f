"""One vocabulary x width gradient in a step for a student whose input embedding is its output layer, not two.

With the chunked head route (`hf_kd.distill.head_route`) the head loss computes the tied weight's (V, D) gradient
itself. Autograd then makes a second (V, D) tensor: the embedding's dense gradient, which it adds to the first
before the sum reaches ``.grad``. For SmolLM2-135M that is 108 MiB, for a 256k-token vocabulary at width 2304 over
2 GiB, at the step's highest point. `sparse_embedding_grad` avoids it for one forward pass: the embedding makes a
sparse gradient (the rows of this batch's tokens), and the head loss puts its dense gradient straight into
``.grad`` (`hf_kd.chunked.linear_head_loss`'s ``weight_grad_into_grad``), into which autograd adds the sparse one in
place. The sum is the same gradient.

It applies only when the head loss is the weight's dense gradient in every backward pass it runs in: a single
process (the route's own condition), a plain ``nn.Embedding`` (no ``max_norm``, not sparse already) sharing its
``Parameter`` with the head, every vocabulary row kept. Should a backward pass still leave a sparse ``.grad`` (a
batch whose loss skips the head), a one-shot hook on the weight makes it dense before any optimizer sees it.
"""

from __future__ import annotations

import contextlib

from torch import nn


def tied_embedding(model) -> nn.Embedding | None:
    """The model's input embedding when it is a plain `nn.Embedding` sharing its weight with the output layer."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return None
    emb, head = get_in(), get_out()
    if not isinstance(emb, nn.Embedding) or head is None or getattr(head, "weight", None) is not emb.weight:
        return None
    if emb.sparse or emb.max_norm is not None or not emb.weight.requires_grad:
        return None
    return emb


def _dense_grad(param) -> None:
    if param.grad is not None and param.grad.is_sparse:
        param.grad = param.grad.to_dense()


@contextlib.contextmanager
def sparse_embedding_grad(emb: nn.Embedding):
    """Within: `emb` makes a sparse gradient (its ``sparse`` flag, restored on exit). A hook on its weight, removed
    after the next time a gradient is accumulated into it, makes a sparse ``.grad`` dense."""
    handle = None

    def once(param) -> None:
        _dense_grad(param)
        handle.remove()

    handle = emb.weight.register_post_accumulate_grad_hook(once)
    emb.sparse = True
    try:
        yield
    except BaseException:
        handle.remove()  # no backward pass follows
        raise
    finally:
        emb.sparse = False
