"""Students made from teachers: keep some of the teacher's layers (DistilBERT, the TinyBERT/PKD initialisations)."""

from __future__ import annotations

import copy

from torch import nn


def _layer_list(model) -> tuple[nn.Module, str, nn.ModuleList]:
    """The (parent, attribute, ModuleList) holding the transformer blocks of `model`."""
    depth = model.config.get_text_config().num_hidden_layers
    found = []
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == depth:
                found.append((f"{parent_name}.{attr}".lstrip("."), parent, attr, child))
    if len(found) != 1:
        names = [f[0] for f in found] or ["none"]
        raise ValueError(
            f"cannot find the single list of {depth} transformer layers in {type(model).__name__} "
            f"(candidates: {', '.join(names)}); build the student from a config instead."
        )
    _, parent, attr, layers = found[0]
    return parent, attr, layers


def student_from_teacher(teacher, layers: list[int]):
    """A copy of `teacher` that keeps the given teacher layers (1-based, in order) and everything else.

    Embeddings, the pooler and the task head are copied too, so the student starts where the teacher
    is. E.g. layers [1, 3, 5] of a 6-layer teacher; DistilBERT keeps every other layer.
    """
    depth = teacher.config.get_text_config().num_hidden_layers
    if not layers or any(not (1 <= k <= depth) for k in layers) or len(set(layers)) != len(layers):
        raise ValueError(
            f"student layers {layers} must be distinct teacher layers in 1..{depth}, e.g. [1, 3, 5]."
        )
    student = copy.deepcopy(teacher)
    parent, attr, blocks = _layer_list(student)
    setattr(parent, attr, nn.ModuleList(blocks[k - 1] for k in layers))
    config = student.config.get_text_config()
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[k - 1] for k in layers]
    # Attention modules that record their own index (for KV caches) must count from 0 again.
    for i, block in enumerate(getattr(parent, attr)):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    student.requires_grad_(True)
    student.train(teacher.training)
    return student
