"""PEFT adapters: a student trained through LoRA (or another PEFT method), a teacher given as base + adapter.

- `peft_config_dict` turns ``DistillationConfig.peft_config`` (a dict, a JSON string or a `peft.PeftConfig`)
  into one JSON-ready dict, so the setting is stored, logged and recorded in provenance as plain data;
  `build_peft_config` makes the `peft.PeftConfig` from it (``peft_type`` defaults to LORA, ``task_type`` to
  the student's task, so that peft also trains the task head, e.g. a classifier, as a module to save).
- `wrap_student`: the student wrapped by `peft.get_peft_model` when ``peft_config`` is set.
- `load_adapter_teacher`: a folder holding ``adapter_config.json`` loads as its base model plus the adapter,
  merged into the base weights (the teacher is frozen, so merging changes nothing but speed).
- `merged_copy`: the final save of ``merge_adapter_on_save=True``: a copy of the student with the adapter
  merged, a plain Transformers model; the student being trained keeps its adapter.

peft is a dependency of hf_kd; transformers' trainer utilities import it already, so importing it here at the top
adds no time to `import hf_kd`.
"""

from __future__ import annotations

import copy
import enum
import json
import os
from typing import Any

import peft
from peft import PeftConfig, PeftModel, get_peft_model

ADAPTER_CONFIG_NAME = "adapter_config.json"

# peft's TaskType for each task of `hf_kd.tasks` (masked LM has none: the adapter then wraps the model as is).
PEFT_TASK_TYPES = {
    "sequence_classification": "SEQ_CLS",
    "token_classification": "TOKEN_CLS",
    "question_answering": "QUESTION_ANS",
    "causal_lm": "CAUSAL_LM",
    "seq2seq_lm": "SEQ_2_SEQ_LM",
}


def is_peft_model(model) -> bool:
    return isinstance(model, PeftModel)


def _plain(value: Any) -> Any:
    """JSON-ready: enums by value, sets as sorted lists, containers recursively."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def peft_config_dict(value) -> dict:
    """``peft_config`` as a JSON-ready dict; ValueError naming the problem when it is not a PEFT configuration."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"peft_config={value!r} is not JSON; give a dict such as "
                '{"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}.'
            ) from err
    if hasattr(value, "to_dict") and not isinstance(value, dict):  # a peft.PeftConfig
        value = value.to_dict()
    if not isinstance(value, dict):
        raise ValueError(f"peft_config must be a dict or a peft.PeftConfig (e.g. peft.LoraConfig), not {type(value).__name__}.")
    plain = _plain(value)
    build_peft_config(plain)  # raises ValueError on unknown fields or values
    return plain


def build_peft_config(config: dict, task: str | None = None):
    """The `peft.PeftConfig` of ``config`` (``peft_type`` LORA unless given; ``task_type`` the task's unless given)."""
    config = dict(config)
    config.setdefault("peft_type", "LORA")
    if config.get("task_type") is None and task in PEFT_TASK_TYPES:
        config["task_type"] = PEFT_TASK_TYPES[task]
    peft_type = str(config["peft_type"]).upper()
    if peft_type not in peft.PeftType.__members__:
        raise ValueError(
            f"peft_config has peft_type={config['peft_type']!r}; use one of {', '.join(peft.PeftType.__members__)}."
        )
    config["peft_type"] = peft_type
    try:
        return peft.get_peft_config(config)
    except (TypeError, ValueError) as err:  # unknown keys, bad values
        raise ValueError(f"peft_config is not a valid {peft_type} configuration: {err}") from err


def wrap_student(model, peft_config: dict | None, task: str):
    """The student as trained: wrapped with ``peft_config`` when set, else unchanged.

    A `peft.PeftModel` is used as given (its adapters train as configured); giving ``peft_config`` as well
    is refused by the trainer, since it is unclear which adapter is meant.
    """
    if peft_config is None:
        return model
    return get_peft_model(model, build_peft_config(peft_config, task))


def is_adapter_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG_NAME))


def load_adapter_teacher(folder: str, task: str, auto_cls):
    """Base model (``base_model_name_or_path`` of the adapter's config) + the adapter of ``folder``, merged.

    Returns ``(model, problem)``: ``problem`` is a message (the caller raises it) when the base cannot be
    loaded or has no trained weights for the task head and the adapter does not provide them.
    """
    config = PeftConfig.from_pretrained(folder)
    base_name = config.base_model_name_or_path
    if not base_name:
        return None, (
            f"the adapter in {folder!r} names no base model (base_model_name_or_path is empty in "
            f"{ADAPTER_CONFIG_NAME}); load the base yourself and pass peft.PeftModel.from_pretrained(base, folder) "
            "as teacher_model."
        )
    try:
        base, info = auto_cls.from_pretrained(base_name, output_loading_info=True)
    except (OSError, json.JSONDecodeError) as err:
        return None, f"the base model {base_name!r} of the adapter in {folder!r} could not be loaded: {err}"
    saved = set(config.modules_to_save or [])
    missing = [k for k in info.get("missing_keys", []) if not saved & set(k.split("."))]
    if missing:
        return None, (
            f"the base model {base_name!r} of the adapter in {folder!r} has no trained weights for {len(missing)} "
            f"parameters of {auto_cls.__name__} (e.g. {sorted(missing)[:3]}) and the adapter does not save them "
            "(modules_to_save): the teacher's head would be random. Give an adapter trained for the task."
        )
    model = PeftModel.from_pretrained(base, folder)
    return model.merge_and_unload(), None


def merged_copy(model):
    """A plain Transformers copy of a PEFT student with its adapter merged; ``model`` itself is unchanged."""
    return copy.deepcopy(model).merge_and_unload()
