"""``model_init`` and `Trainer.hyperparameter_search` for the distillation trainer: a fresh student per trial.

With ``model_init`` the start-up checks run on a first student, which Trainer's own first `call_model_init` then
receives (one build, not two); each later call makes a student prepared as ``model`` would be. After Trainer sets
a trial's settings on ``args``, the loss plan is built again for the new student and those settings (the trainer
then builds fresh projections, the record and the objective). The default search space is the distillation
settings' (`hf_kd.search.distillation_hp_space`), not Trainer's learning rate and epochs.
"""

from __future__ import annotations

from transformers.trainer_utils import number_of_arguments

from ..config import DistillationConfig
from ..errors import InputError
from ..search import distillation_hp_space
from ..tasks import unwrap
from .checks import prepare_student
from .plan import LossPlan, build_plan


class Students:
    """The students of ``model_init``: the one the start-up checks ran on (`first`, once), then fresh ones."""

    def __init__(self, model_init):
        self.model_init = model_init
        self.first = None
        if model_init is not None:  # Trainer calls model_init with the trial, or with nothing
            self.first = model_init() if number_of_arguments(model_init) == 0 else model_init(None)

    def next(self, make, trial, args: DistillationConfig, task: str):
        """The first student (prepared by the trainer) once, then `make(trial)`'s (Trainer's `call_model_init`),
        prepared as ``model`` would be."""
        first, self.first = self.first, None
        return first if first is not None else prepare_student(make(trial), args, task)


def trial_plan(student, teacher, args: DistillationConfig, task: str) -> LossPlan:
    """The loss plan of a trial's student under the trial's settings; a teacher cache holds one plan's outputs."""
    if teacher is None:
        raise InputError("model_init / hyperparameter_search needs a live teacher (the loss plan is rebuilt for "
                         "each student); a teacher_cache holds one plan's outputs. Pass teacher_model.")
    return build_plan(student, unwrap(teacher), args, task)


def search_space(hp_space, args: DistillationConfig):
    """The caller's space, else the distillation settings in use (temperature, alpha, the weights of the terms)."""
    return hp_space or distillation_hp_space(args)
