"""The errors hf_kd raises for a user's mistake or a run that went wrong: messages name the problem and the fix."""

from __future__ import annotations


class InputError(ValueError):
    """Input refused before training (models, tokenizers, data); the message names the problem and the fix."""


class NonFiniteLossError(FloatingPointError):
    """A loss component was NaN or inf (``nonfinite_loss="stop"``); raised before its backward pass."""
