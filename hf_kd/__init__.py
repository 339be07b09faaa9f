"""hf_kd: knowledge distillation for Hugging Face Transformers."""

from .config import DistillationConfig
from .trainer import DistillationTrainer

__version__ = "0.1.0"

__all__ = ["DistillationConfig", "DistillationTrainer", "__version__"]
