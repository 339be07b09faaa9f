"""Learned student -> teacher width projections for the hidden-state loss: built, saved, loaded.

One `nn.Linear(student width, teacher width)` per hidden pair (the encoder's pairs first, then the decoder's)
when the widths differ; none otherwise. They train with the student (the trainer adds them to the optimizer)
but are not part of it: they are saved beside each checkpoint and never with the final student.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PROJECTIONS_NAME = "kd_projections.safetensors"


def build_projections(student, teacher_width: int, n_pairs: int, seed: int) -> nn.ModuleList:
    """The projections of `n_pairs` hidden pairs from `student`'s width to `teacher_width`, in the student's dtype,
    seeded with `seed` (two runs with one seed start alike); the global random state is left as it was."""
    student_width = student.config.get_text_config().hidden_size
    if not n_pairs or student_width == teacher_width:
        return nn.ModuleList()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    projections = nn.ModuleList(nn.Linear(student_width, teacher_width) for _ in range(n_pairs))
    torch.random.set_rng_state(state)
    return projections.to(next(student.parameters()).dtype)


def save_projections(projections: nn.ModuleList, folder: str) -> None:
    if len(projections):
        state = {k: v.detach().cpu().contiguous() for k, v in projections.state_dict().items()}
        save_file(state, os.path.join(folder, PROJECTIONS_NAME))


def load_projections(projections: nn.ModuleList, folder: str, device) -> None:
    """Load the projections saved in checkpoint `folder` (ValueError when they should be there and are not)."""
    if not len(projections):
        return
    path = os.path.join(folder, PROJECTIONS_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"{folder} has no {PROJECTIONS_NAME}, which this run's hidden-state loss needs (the widths differ): its "
            "save was interrupted, or it was made without projections. Resume from a complete checkpoint of this set-up."
        )
    projections.load_state_dict(load_file(path, device=str(device)))
