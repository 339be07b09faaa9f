"""Students pruned from their teacher by measured importance: width (attention heads, MLP neurons, hidden
channels) and depth (whole layers), the Minitron recipe (Muralidharan et al. 2024, "Compact Language Models
via Pruning and Knowledge Distillation"; Sreenivas et al. 2024, "LLM Pruning and Distillation in Practice").

One pass of the teacher over a few hundred calibration rows measures, per unit, how much it contributes:

- an attention head: the mean over tokens of ``||o_h W_O[:, h]^T||``, its output through the output
  projection (the paper takes the norm of the head's output before the projection; through it, a head whose
  output projection is zero counts as dead too). Grouped-query heads are kept or dropped by whole groups
  (the query heads that share one key/value head), their importances summed;
- an MLP neuron: the mean over tokens of ``|a_i| * ||W_down[:, i]||``, its activation times the norm of its
  column in the down projection (the paper: the activation alone);
- a hidden (embedding) channel: the mean over tokens of ``|LN(x)_i|`` summed over every LayerNorm/RMSNorm
  of the model, as in the paper;
- a layer (depth): Block Importance (Men et al. 2024, ShortGPT), ``1 - cos(x_in, x_out)`` of its input and
  output hidden states averaged over tokens; the layers that change the stream least are dropped.

The least important units are removed and every kept weight is copied bit for bit into a model of the
teacher's own class and architecture with smaller config sizes, so the result saves and loads with
``save_pretrained`` / ``from_pretrained``. Depth is pruned first (`student_from_teacher` keeps the chosen
layers), then width is measured on that shallower model. Removing a head or a neuron whose contribution is
exactly zero leaves the outputs unchanged; removing hidden channels always changes LayerNorm/RMSNorm
statistics (the mean and variance run over the remaining channels), so a width-pruned hidden size is an
approximation that distillation then repairs.

Supported: BERT-style encoders (BERT, RoBERTa, ELECTRA, XLM-R: ``attention.self.query`` ...) and Llama-style
decoders (Llama, Mistral, Qwen2/3, SmolLM: ``self_attn.q_proj`` ...). In BERT the heads span the hidden size,
so ``hidden_size`` must be ``num_attention_heads`` times the teacher's head size; Llama-style configs keep
the teacher's ``head_dim`` whatever the hidden size.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import InputError
from .student import (
    _layer_list,
    check_student_folders,
    load_teacher_folder,
    parse_student_layers,
    student_config_from,
    student_from_teacher,
)

#: The record of what a pruned student kept, written beside its weights.
PLAN_NAME = "hf_kd_pruning.json"

__all__ = [
    "Importance", "PrunePlan", "Family", "family_of", "calibration_batches", "measure_importance",
    "layer_importance", "choose_layers", "prune_width", "prune_student", "prune_folder", "PLAN_NAME",
]


@dataclass(frozen=True)
class Family:
    """Where a block keeps its attention and MLP projections (names relative to the block)."""

    name: str
    query: tuple[str, ...]  # outputs: one slice per query head
    key_value: tuple[str, ...]  # outputs: one slice per key/value head
    attention_out: str  # inputs: one slice per query head
    mlp_in: tuple[str, ...]  # outputs: one row per neuron
    mlp_out: str  # inputs: one column per neuron
    explicit_head_dim: bool  # the config's head_dim stays the teacher's whatever the hidden size


FAMILIES = (
    Family("bert", ("attention.self.query",), ("attention.self.key", "attention.self.value"),
           "attention.output.dense", ("intermediate.dense",), "output.dense", explicit_head_dim=False),
    Family("llama", ("self_attn.q_proj",), ("self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj",
           ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", explicit_head_dim=True),
)


def family_of(model) -> Family:
    """The family whose projections every block of `model` has; InputError names the supported ones."""
    _, _, blocks = _layer_list(model)
    for family in FAMILIES:
        names = (*family.query, *family.key_value, family.attention_out, *family.mlp_in, family.mlp_out)
        if all(_has(block, n) for block in blocks for n in names):
            return family
    raise InputError(
        f"cannot prune a {type(model).__name__}: pruning knows BERT-style encoders (attention.self.query, "
        "intermediate.dense, ...) and Llama-style decoders (self_attn.q_proj, mlp.gate_proj, ...). Drop layers "
        "instead (--layers N without --prune), or start from a fresh student (--student_config)."
    )


def _has(module: nn.Module, name: str) -> bool:
    try:
        return isinstance(module.get_submodule(name), nn.Linear)
    except AttributeError:
        return False


def _sizes(config) -> dict:
    """hidden, heads, kv heads, head size, intermediate size, layers of a (text) config."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    return {"hidden_size": text.hidden_size, "num_attention_heads": heads, "num_key_value_heads": kv,
            "head_dim": head_dim, "intermediate_size": text.intermediate_size, "layers": text.num_hidden_layers}


# ---------------------------------------------------------------------------- calibration and measurement
def calibration_batches(tokenizer, texts: list[str], batch_size: int = 16, max_length: int = 128) -> list[dict]:
    """`texts` tokenised by the teacher's tokenizer into padded batches (input_ids, attention_mask, ...)."""
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise InputError("the calibration set holds no text; give rows with a non-empty text column.")
    if tokenizer.pad_token is None:  # decoders often have none; padding is masked out of every measure
        tokenizer = copy.copy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    return [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt"))
            for i in range(0, len(texts), batch_size)]


def _token_mask(batch: dict) -> torch.Tensor:
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return (mask if mask is not None else torch.ones_like(ids)).bool()  # (B, T)


def _forward(model, batch: dict) -> None:
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    model(**inputs)


def _run(model, batches: list[dict], state: dict, hooks: list) -> int:
    """Run `model` in eval mode over `batches` with `hooks` attached (each batch's token mask in ``state["mask"]``),
    then remove them and restore the mode; the number of real tokens seen."""
    was_training, tokens = model.training, 0
    model.eval()
    try:
        for batch in batches:
            state["mask"] = _token_mask(batch)
            tokens += int(state["mask"].sum())
            _forward(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if tokens == 0:
        raise InputError("the calibration batches hold no tokens; give some text.")
    return tokens


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the real tokens of (B, T, ...) values: (...)."""
    return values[mask.to(values.device)].sum(0)


@dataclass
class Importance:
    """Per-layer head and neuron importances and per-channel hidden importance (means over calibration tokens)."""

    heads: list[torch.Tensor]  # per block: (query heads,)
    neurons: list[torch.Tensor]  # per block: (intermediate,)
    channels: torch.Tensor  # (hidden,)
    tokens: int


@torch.no_grad()
def measure_importance(model, batches: list[dict]) -> Importance:
    """Head, neuron and hidden-channel importance of `model` over the calibration `batches` (see the module)."""
    family, sizes = family_of(model), _sizes(model.config)
    _, _, blocks = _layer_list(model)
    n, d, hidden = len(blocks), sizes["head_dim"], sizes["hidden_size"]
    heads = [torch.zeros(sizes["num_attention_heads"], dtype=torch.float64) for _ in range(n)]
    neurons = [torch.zeros(sizes["intermediate_size"], dtype=torch.float64) for _ in range(n)]
    channels = torch.zeros(hidden, dtype=torch.float64)
    state = {"mask": None}
    hooks = []

    def head_hook(i, out_proj):
        def hook(module, args):
            x = args[0].float()  # (B, T, A * d)
            w = out_proj.weight.float()  # (H, A * d)
            for h in range(heads[i].numel()):
                part = x[..., h * d:(h + 1) * d] @ w[:, h * d:(h + 1) * d].T  # (B, T, H)
                heads[i][h] += _masked_sum(part.norm(dim=-1), state["mask"]).double().cpu()
        return hook

    def neuron_hook(i, down):
        def hook(module, args):
            a = args[0].float().abs()  # (B, T, F)
            column = down.weight.float().norm(dim=0)  # (F,)
            neurons[i] += (_masked_sum(a, state["mask"]) * column).double().cpu()
        return hook

    def channel_hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        if out.shape[-1] == hidden and out.dim() == 3:
            channels.add_(_masked_sum(out.float().abs(), state["mask"]).double().cpu())

    for i, block in enumerate(blocks):
        out_proj, down = block.get_submodule(family.attention_out), block.get_submodule(family.mlp_out)
        hooks.append(out_proj.register_forward_pre_hook(head_hook(i, out_proj)))
        hooks.append(down.register_forward_pre_hook(neuron_hook(i, down)))
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if _is_norm(module) and isinstance(weight, torch.Tensor) and weight.shape == (hidden,):
            hooks.append(module.register_forward_hook(channel_hook))
    tokens = _run(model, batches, state, hooks)
    return Importance([h / tokens for h in heads], [f / tokens for f in neurons], channels / tokens, tokens)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


@torch.no_grad()
def layer_importance(model, batches: list[dict]) -> list[float]:
    """Block Importance of each layer (first to last): ``1 - cos(input, output)`` averaged over real tokens."""
    _, _, blocks = _layer_list(model)
    totals, state, hooks = [0.0] * len(blocks), {"mask": None}, []

    def hook(i):
        def record(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, T)
            totals[i] += float(_masked_sum(1 - cos, state["mask"]))
        return record

    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_hook(hook(i), with_kwargs=True))
    tokens = _run(model, batches, state, hooks)
    return [t / tokens for t in totals]


def choose_layers(importance: list[float], n: int) -> list[int]:
    """The `n` most important layers, 1-based and in order (ties: the earlier layer)."""
    ranked = sorted(range(len(importance)), key=lambda i: (-importance[i], i))
    return sorted(i + 1 for i in ranked[:n])


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the `k` largest scores, in increasing index order (ties: the earlier index)."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


# ---------------------------------------------------------------------------- the plan and the copy
@dataclass
class PrunePlan:
    """What a pruned student keeps of its teacher: 0-based indices (layers 1-based, as `student_layers`)."""

    family: str
    layers: list[int]  # teacher layers kept, 1-based
    channels: list[int]  # hidden channels kept
    heads: list[list[int]] = field(default_factory=list)  # per kept layer: query heads kept
    kv_heads: list[list[int]] = field(default_factory=list)  # per kept layer: key/value heads kept
    neurons: list[list[int]] = field(default_factory=list)  # per kept layer: MLP neurons kept
    sizes: dict = field(default_factory=dict)  # the student's config sizes
    layer_importance: list[float] | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def check_sizes(sizes: dict, family: Family, hidden_size=None, num_attention_heads=None, intermediate_size=None,
                layers=None) -> dict:
    """The student's sizes, every one checked against the teacher's; InputError lists every problem and its fix."""
    problems = []
    asked = {"hidden_size": hidden_size, "num_attention_heads": num_attention_heads,
             "intermediate_size": intermediate_size, "layers": layers}
    for key, value in asked.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{key}={value!r} must be a positive integer")
        elif value > sizes[key]:
            problems.append(f"{key}={value} is above the teacher's {sizes[key]}: pruning only removes units; "
                            f"give at most {sizes[key]}")
    if problems:
        raise InputError("cannot prune to these sizes: " + "; ".join(problems) + ".")
    d, heads, kv = sizes["head_dim"], sizes["num_attention_heads"], sizes["num_key_value_heads"]
    group = heads // kv
    out = {key: (sizes[key] if value is None else value) for key, value in asked.items()}
    if not family.explicit_head_dim:  # BERT: the heads span the hidden size, head size fixed by the teacher
        if hidden_size is not None and num_attention_heads is None:
            if hidden_size % d:
                problems.append(f"hidden_size={hidden_size} is not a whole number of the teacher's {d}-channel heads "
                                f"(this architecture's heads span the hidden size); give a multiple of {d}, e.g. "
                                f"{max(d, hidden_size // d * d)}")
            out["num_attention_heads"] = hidden_size // d
        elif num_attention_heads is not None and hidden_size is None:
            out["hidden_size"] = num_attention_heads * d
        elif out["hidden_size"] != out["num_attention_heads"] * d:
            problems.append(
                f"hidden_size={out['hidden_size']} with num_attention_heads={out['num_attention_heads']} would need "
                f"heads of {out['hidden_size'] / out['num_attention_heads']:g} channels, but the teacher's have {d} "
                f"and this architecture's heads span the hidden size: give hidden_size = {d} x num_attention_heads "
                f"(e.g. {out['num_attention_heads'] * d}), or leave one of them out")
    if out["num_attention_heads"] % group:
        problems.append(
            f"num_attention_heads={out['num_attention_heads']} does not divide into the teacher's key/value groups of "
            f"{group} query heads (heads are pruned by whole groups): give a multiple of {group}, e.g. "
            f"{max(group, out['num_attention_heads'] // group * group)}")
    if problems:
        raise InputError("cannot prune to these sizes: " + "; ".join(problems) + ".")
    out["num_key_value_heads"] = out["num_attention_heads"] // group
    return out


def prune_width(model, batches: list[dict], hidden_size=None, num_attention_heads=None, intermediate_size=None,
                importance: Importance | None = None, layers: list[int] | None = None):
    """(student, PrunePlan): `model` narrowed to the given sizes by importance, every kept weight copied.

    `importance` (default: measured on `batches`) may be given, e.g. to prune exactly some units in a test;
    `layers` only records which teacher layers `model`'s blocks are (1-based; default all).
    """
    family, sizes = family_of(model), _sizes(model.config)
    want = check_sizes(sizes, family, hidden_size, num_attention_heads, intermediate_size)
    if importance is None:
        importance = measure_importance(model, batches)
    group = sizes["num_attention_heads"] // sizes["num_key_value_heads"]
    plan = PrunePlan(family.name, layers or list(range(1, sizes["layers"] + 1)),
                     _top(importance.channels, want["hidden_size"]))
    for head_scores, neuron_scores in zip(importance.heads, importance.neurons):
        groups = _top(head_scores.view(-1, group).sum(-1), want["num_key_value_heads"])  # (kv heads,)
        plan.kv_heads.append(groups)
        plan.heads.append([g * group + j for g in groups for j in range(group)])
        plan.neurons.append(_top(neuron_scores, want["intermediate_size"]))
    overrides = {k: want[k] for k in ("hidden_size", "num_attention_heads", "intermediate_size")}
    if family.explicit_head_dim:
        overrides.update(head_dim=sizes["head_dim"], num_key_value_heads=want["num_key_value_heads"])
    config = student_config_from(model.config, overrides)
    plan.sizes = {**overrides, "num_hidden_layers": sizes["layers"]}
    student = type(model)(config)
    student.load_state_dict(_pruned_state(model, plan, family, sizes), strict=True)
    student.train(model.training)
    return student, plan


def _pruned_state(model, plan: PrunePlan, family: Family, sizes: dict) -> dict:
    """The teacher's state dict with each axis cut to the kept indices (index_select: bit-identical copies)."""
    d = sizes["head_dim"]
    parent, attr, _ = _layer_list(model)
    prefix = next(name for name, module in model.named_modules() if module is getattr(parent, attr)) + "."
    channels, hidden = torch.tensor(plan.channels), sizes["hidden_size"]
    modules = dict(model.named_modules())
    state = {}
    for name, tensor in model.state_dict().items():
        axes = None
        owner = modules.get(name.rpartition(".")[0])
        if not tensor.is_floating_point():  # position / token-type id buffers
            axes = ()
        elif isinstance(owner, nn.Embedding):  # (vocabulary or positions, hidden): only the hidden axis
            axes = (None, channels)
        elif name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            module, _, kind = rest.rpartition(".")
            i = int(index)
            q = torch.tensor([h * d + j for h in plan.heads[i] for j in range(d)])
            kv = torch.tensor([h * d + j for h in plan.kv_heads[i] for j in range(d)])
            f = torch.tensor(plan.neurons[i])
            roles = {**{m: (q, channels) for m in family.query}, **{m: (kv, channels) for m in family.key_value},
                     family.attention_out: (channels, q), **{m: (f, channels) for m in family.mlp_in},
                     family.mlp_out: (channels, f)}
            if module in roles:
                axes = roles[module] if kind == "weight" else roles[module][:1]
        if axes is None:  # embeddings, norms, pooler, heads: every axis of the teacher's hidden size
            axes = tuple(channels if size == hidden else None for size in tensor.shape)
        for dim, keep in enumerate(axes):
            if keep is not None and keep.numel() != tensor.shape[dim]:
                tensor = tensor.index_select(dim, keep)
        state[name] = tensor.clone()
    return state


def prune_student(teacher, batches: list[dict], hidden_size=None, num_attention_heads=None, intermediate_size=None,
                  layers=None):
    """(student, PrunePlan): `teacher` cut to `layers` (a number: the most important by Block Importance; a list:
    those, 1-based) then narrowed to the given sizes by importance measured on the calibration `batches`.

    The student is a model of the teacher's class whose config differs only in its sizes; the teacher is not
    modified. See the module docstring for the measures and what is exact.
    """
    family, sizes = family_of(teacher), _sizes(teacher.config)
    check_sizes(sizes, family, hidden_size, num_attention_heads, intermediate_size,
                layers if isinstance(layers, int) else None)
    depth_scores = None
    if isinstance(layers, int) and not isinstance(layers, bool):
        depth_scores = layer_importance(teacher, batches)
        kept = choose_layers(depth_scores, layers)
    elif layers is not None:
        kept = list(layers)
        if not kept or any(not (1 <= k <= sizes["layers"]) for k in kept) or len(set(kept)) != len(kept):
            raise InputError(f"layers={kept} must be distinct teacher layers in 1..{sizes['layers']}, e.g. [1, 3, 5].")
    else:
        kept = list(range(1, sizes["layers"] + 1))
    shallow = student_from_teacher(teacher, kept) if kept != list(range(1, sizes["layers"] + 1)) else teacher
    student, plan = prune_width(shallow, batches, hidden_size, num_attention_heads, intermediate_size, layers=kept)
    plan.layer_importance = depth_scores
    return student, plan


def prune_folder(teacher: str, output_dir: str, texts: list[str], hidden_size=None, num_attention_heads=None,
                 intermediate_size=None, layers=None, max_length: int = 128, batch_size: int = 16,
                 overwrite_output_dir: bool = False) -> dict:
    """Write to `output_dir` the teacher folder `teacher` pruned by importance measured on `texts` (see
    `prune_student`), with the teacher's tokenizer and `hf_kd_pruning.json` (what was kept, the layer scores).

    Sizes and folders are checked before the teacher is run; nothing is written when a check fails. `layers`: a
    number (chosen by importance), a 1-based list, or their text. Returns a summary.
    """
    source, out = check_student_folders(teacher, output_dir, overwrite_output_dir)
    layers = parse_student_layers(layers) if layers is not None else None
    model, tokenizer = load_teacher_folder(source)
    if tokenizer is None:
        raise InputError(f"the teacher folder {teacher!r} has no tokenizer to read the calibration text with; save "
                         "the teacher's tokenizer into it (tokenizer.save_pretrained).")
    check_sizes(_sizes(model.config), family_of(model), hidden_size, num_attention_heads, intermediate_size,
                layers if isinstance(layers, int) else None)
    batches = calibration_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length)
    student, plan = prune_student(model, batches, hidden_size, num_attention_heads, intermediate_size, layers)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / PLAN_NAME).write_text(json.dumps({"teacher": str(teacher), "calibration_rows": len(texts), **plan.to_dict()},
                                            indent=1))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"teacher": str(teacher), "output_dir": str(out), "plan": plan, "teacher_layers": _sizes(model.config)["layers"],
            "parameters": count(student), "teacher_parameters": count(model)}
