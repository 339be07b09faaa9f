"""Student-to-teacher layer maps as plain data.

Layers count from 1 to L. For the hidden loss, layer k is ``hidden_states[k]`` and layer 0 is the
embedding output; for the attention loss, layer k is ``attentions[k - 1]`` and layer 0 does not exist.
"""

from __future__ import annotations

import math


def resolve_layer_map(
    layer_map: str | list[list[int]],
    student_layers: int,
    teacher_layers: int,
    *,
    allow_embeddings: bool = True,
    what: str = "hidden",
) -> list[tuple[int, int]]:
    """Return explicit (student_layer, teacher_layer) pairs for models of the given depths.

    - ``uniform``: student layer k to teacher layer round(k * Lt / Ls) (halves round up), k = 1..Ls,
      as in DistilBERT/TinyBERT's "uniform" strategy.
    - ``last``: the last layer of each.
    - explicit pairs are checked against both depths.
    """
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"cannot map layers of models with {student_layers} and {teacher_layers} layers.")
    if layer_map == "uniform":
        return [(k, int(math.floor(k * teacher_layers / student_layers + 0.5))) for k in range(1, student_layers + 1)]
    if layer_map == "last":
        return [(student_layers, teacher_layers)]
    pairs = [(int(s), int(t)) for s, t in layer_map]
    lowest = 0 if allow_embeddings else 1
    for s, t in pairs:
        if not (lowest <= s <= student_layers) or not (lowest <= t <= teacher_layers):
            raise ValueError(
                f"layer_map pair [{s}, {t}] is outside the models for the {what} loss: the student has layers "
                f"{lowest}..{student_layers} and the teacher {lowest}..{teacher_layers}"
                + ("" if allow_embeddings else " (layer 0, the embeddings, has no attention map)")
                + ". Fix the pair or use layer_map: uniform."
            )
    return pairs
