"""hf_kd: knowledge distillation for Hugging Face Transformers."""

from .config import DistillationConfig
from .hub import CardInfo, PushError, push_student, read_provenance, weights_sha256
from .student import init_student, student_from_config, student_from_teacher, uniform_layers
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
    "init_student",
    "student_from_config",
    "student_from_teacher",
    "uniform_layers",
    "__version__",
]
