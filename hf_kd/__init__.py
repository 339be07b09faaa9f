"""hf_kd: knowledge distillation for Hugging Face Transformers."""

from .config import DistillationConfig
from .hub import CardInfo, PushError, push_student, read_provenance, weights_sha256
from .teacher_cache import cache_teacher_outputs, load_cached_dataset
from .student import init_student, student_from_config, student_from_teacher, uniform_layers
from .pruning import prune_folder, prune_student
from .search import distillation_hp_space
from .errors import InputError, NonFiniteLossError
from .prompts import PromptCollator
from .distill.generation_eval import GeneratedTexts
from .trainer import DistillationTrainer
from .version import __version__


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
    "cache_teacher_outputs",
    "load_cached_dataset",
    "init_student",
    "student_from_config",
    "student_from_teacher",
    "uniform_layers",
    "PromptCollator",
    "GeneratedTexts",
    "prune_student",
    "prune_folder",
    "distillation_hp_space",
    "__version__",
]
