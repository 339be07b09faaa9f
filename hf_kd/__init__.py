"""hf_kd: knowledge distillation for Hugging Face Transformers."""

from .config import DistillationConfig
from .hub import CardInfo, PushError, push_student, read_provenance, weights_sha256
from .trainer import DistillationTrainer, InputError, NonFiniteLossError

__version__ = "0.1.0"

__all__ = [
    "DistillationConfig",
    "DistillationTrainer",
    "InputError",
    "NonFiniteLossError",
    "CardInfo",
    "PushError",
    "push_student",
    "read_provenance",
    "weights_sha256",
    "__version__",
]
