"""The search space of the distillation settings, for `Trainer.hyperparameter_search` (optuna).

`DistillationTrainer.hyperparameter_search` searches it by default: the temperature (log-uniform), alpha and the
weight of each feature term the config uses (hidden states, attention, relations); a term the config leaves at 0
stays off. The trial's values are set on ``args`` by Trainer, and the trainer builds its loss plan again for them.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["WEIGHTS", "distillation_hp_space"]

#: The weights of the feature terms that a search may tune (each only when the config has it above 0).
WEIGHTS = ("hidden_weight", "attention_weight", "relation_weight")


def distillation_hp_space(args, temperature: tuple[float, float] = (1.0, 8.0), alpha: tuple[float, float] = (0.0, 1.0),
                          weight: tuple[float, float] = (0.0, 4.0)) -> Callable:
    """A function optuna trial -> settings: temperature in `temperature` (log scale), alpha in `alpha`, and each
    term weight that `args` (a DistillationConfig) uses in `weight`. Which terms are searched is read now, so a
    trial that sets a weight to 0 does not take that term out of the next trials' space."""
    terms = [name for name in WEIGHTS if getattr(args, name, 0) > 0]

    def space(trial) -> dict:
        settings = {"temperature": trial.suggest_float("temperature", *temperature, log=True),
                    "alpha": trial.suggest_float("alpha", *alpha)}
        for name in terms:
            settings[name] = trial.suggest_float(name, *weight)
        return settings

    space.terms = terms
    return space
