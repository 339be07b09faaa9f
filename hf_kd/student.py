"""Students made from teachers.

- `student_from_teacher`: keep some of the teacher's layers, with their weights (DistilBERT, the PKD
  initialisations). `uniform_layers(L, n)` picks n of L layers spread evenly, the last included.
- `student_from_config`: the teacher's architecture with some config fields changed (narrower, fewer
  layers...), freshly initialised; it reads the teacher's tokenizer.
- `init_student`: either of them written to a folder (`hf-kd init-student`).
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path

import transformers
import yaml
from torch import nn

from .layer_map import resolve_layer_map

#: Config fields of `student_config` that must be positive integers.
SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
               "head_dim")


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


def uniform_layers(teacher_depth: int, n: int) -> list[int]:
    """`n` of the teacher's `teacher_depth` layers (1-based), spread evenly and ending with the last.

    Student layer k copies teacher layer round(k * L / n), halves rounding up: the rule of
    ``layer_map: uniform``, so that each student layer is compared with the layer it was copied from.
    n = L / 2 keeps every other layer (2, 4, ..., L, as DistilBERT); n = L keeps them all.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= teacher_depth:
        raise ValueError(
            f"student_layers={n!r}: a number of layers must be an integer in 1..{teacher_depth} (the teacher has "
            f"{teacher_depth} layers), or give the layers themselves as a list, e.g. [1, 3, 5]."
        )
    return [t for _, t in resolve_layer_map("uniform", n, teacher_depth)]


def parse_student_layers(value) -> int | list[int]:
    """`student_layers` as given (an int, a list, or their JSON/YAML text): a number of layers or 1-based layers."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value if "," not in value or "[" in value else f"[{value}]")  # 2,5 = [2, 5]
        except yaml.YAMLError:
            value = None
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if is_int(value) or (isinstance(value, (list, tuple)) and value and all(is_int(v) for v in value)):
        return value if is_int(value) else list(value)
    raise ValueError(
        f"student_layers={value!r} is neither a number of layers (e.g. 3: spread evenly, the last included) nor "
        "a list of 1-based teacher layers (e.g. [1, 3, 5])."
    )


def resolve_student_layers(value, teacher_depth: int) -> list[int]:
    """The 1-based teacher layers that `student_layers` (a count or a list) keeps."""
    value = parse_student_layers(value)
    return uniform_layers(teacher_depth, value) if isinstance(value, int) else value


def parse_student_config(value) -> dict:
    """`student_config` as given (a mapping, or its JSON/YAML text): config fields to change."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"student_config is not valid JSON/YAML: {err}") from None
    if not isinstance(value, dict) or not value:
        raise ValueError(
            f"student_config={value!r} must be a non-empty mapping of config fields, e.g. "
            "{hidden_size: 192, intermediate_size: 768, num_attention_heads: 6, num_hidden_layers: 3}."
        )
    empty = [key for key, v in value.items() if v is None]
    if empty:
        raise ValueError(
            f"student_config field {empty[0]!r} has no value; write `name: value` with a space after the colon "
            "(YAML), or JSON such as '{\"hidden_size\": 192}'."
        )
    return dict(value)


def student_config_from(teacher_config, overrides: dict):
    """A copy of the teacher's config with `overrides` applied (to its text config) and checked."""
    overrides = parse_student_config(overrides)
    config = copy.deepcopy(teacher_config)
    text = config.get_text_config()
    known = set(text.to_dict()) | set(getattr(text, "attribute_map", {}))
    problems = []
    for key in overrides:
        if key not in known and not hasattr(text, key):
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append(f"{type(text).__name__} has no field {key!r}{hint}")
    for key in SIZE_FIELDS:
        value = overrides.get(key)
        if key in overrides and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(f"{key}={value!r} must be a positive integer")
    if problems:
        raise ValueError("student_config cannot be applied: " + "; ".join(problems) + ".")
    old_depth = text.num_hidden_layers
    derived_head_dim = getattr(text, "head_dim", None) == text.hidden_size // text.num_attention_heads
    for key, value in overrides.items():
        setattr(text, key, value)
    hidden, heads = text.hidden_size, text.num_attention_heads
    if "head_dim" not in overrides:
        if hidden % heads:
            problems.append(
                f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}; pick sizes with "
                f"hidden_size % num_attention_heads == 0 (e.g. num_attention_heads={_divisor_near(hidden, heads)})"
            )
        elif derived_head_dim:  # the teacher's head_dim followed from its sizes: follow the student's
            text.head_dim = hidden // heads
    kv = getattr(text, "num_key_value_heads", None)
    if isinstance(kv, int) and heads % kv:
        if "num_key_value_heads" in overrides:
            problems.append(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        else:  # the teacher's grouping does not divide the new head count: one key/value head per head
            text.num_key_value_heads = heads
    layer_types = getattr(text, "layer_types", None)
    if isinstance(layer_types, list) and text.num_hidden_layers != old_depth and "layer_types" not in overrides:
        if text.num_hidden_layers <= old_depth:
            text.layer_types = [layer_types[k - 1] for k in uniform_layers(old_depth, text.num_hidden_layers)]
        elif len(set(layer_types)) == 1:
            text.layer_types = layer_types[:1] * text.num_hidden_layers
        else:
            problems.append("a deeper student of a teacher with mixed layer_types needs layer_types in student_config")
    if problems:
        raise ValueError("student_config cannot be applied: " + "; ".join(problems) + ".")
    return config


def _divisor_near(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), d))


def student_from_config(teacher, overrides: dict):
    """A freshly initialised model of the teacher's class, with the teacher's config changed by `overrides`.

    E.g. ``{hidden_size: 192, intermediate_size: 768, num_attention_heads: 6, num_hidden_layers: 3}``
    for a narrower, shallower student. It keeps the teacher's vocabulary and labels, so it reads the
    teacher's tokenizer; seed torch first for a reproducible start. Hidden losses between different
    widths go through the trainer's learned projections.
    """
    config = student_config_from(teacher.config, overrides)
    student = type(teacher)(config)
    student.train(teacher.training)
    return student


def init_student(
    teacher: str, output_dir: str, layers=None, student_config=None, overwrite_output_dir: bool = False
) -> dict:
    """Write a student made from the teacher folder `teacher` to `output_dir`, with the teacher's tokenizer.

    Give exactly one of `layers` (a count or 1-based list, see `resolve_student_layers`) and
    `student_config` (see `student_from_config`). Everything is checked and built before anything is
    written; an `output_dir` that holds files is refused unless `overwrite_output_dir`. Returns a summary.
    """
    if (layers is None) == (student_config is None):
        raise ValueError("give either layers (a number, e.g. 3, or a list such as [1,3,5]) or student_config.")
    source, out = check_student_folders(teacher, output_dir, overwrite_output_dir)
    # Parse before loading the teacher: a malformed value fails fast.
    layers = parse_student_layers(layers) if layers is not None else None
    student_config = parse_student_config(student_config) if student_config is not None else None

    model, tokenizer = load_teacher_folder(source)
    depth = model.config.get_text_config().num_hidden_layers
    if layers is not None:
        chosen = resolve_student_layers(layers, depth)
        student = student_from_teacher(model, chosen)
        summary = {"teacher": str(teacher), "layers": chosen}
    else:
        student = student_from_config(model, student_config)
        summary = {"teacher": str(teacher), "student_config": student_config}
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    summary.update(
        output_dir=str(out), tokenizer=tokenizer is not None, teacher_layers=depth,
        parameters=sum(p.numel() for p in student.parameters()),
        teacher_parameters=sum(p.numel() for p in model.parameters()),
    )
    return summary


def check_student_folders(teacher: str, output_dir: str, overwrite_output_dir: bool = False) -> tuple[Path, Path]:
    """(teacher folder, output folder), checked before anything is loaded or written."""
    source = Path(os.path.expanduser(teacher))
    if not source.is_dir():
        raise ValueError(f"the teacher folder {teacher!r} does not exist; give a folder saved with save_pretrained.")
    if not (source / "config.json").is_file():
        raise ValueError(f"the teacher folder {teacher!r} has no config.json; give a folder saved with save_pretrained.")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file; give a folder.")
    if out.resolve() == source.resolve():
        raise ValueError(f"output_dir {out} is the teacher's folder; give another folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite_output_dir:
        raise ValueError(
            f"output_dir {out} is not empty. Pick a new folder, or pass --overwrite_output_dir to write into it."
        )
    return source, out


def load_teacher_folder(source: Path) -> tuple:
    """(model of the class its config names, its tokenizer or None) from a saved teacher folder."""
    config = transformers.AutoConfig.from_pretrained(source)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    model = (cls or transformers.AutoModel).from_pretrained(source)
    tokenizer = None
    if any((source / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    return model, tokenizer
