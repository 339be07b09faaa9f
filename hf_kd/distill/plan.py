"""Which loss terms a run computes and between which layers: the loss plan, built once from config and models.

`build_plan(student, teacher, args, task)` checks that the pair can be distilled the way `args` asks and
returns a `LossPlan` (layer pairs of the encoder or single stack, of the decoder for encoder-decoder models,
MiniLM's q/k/v modules and relation heads) or raises `InputError` listing every problem. `LossPlan.record()`
is what a checkpoint and the provenance record say of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import relations
from ..config import DistillationConfig
from ..errors import InputError
from ..layer_map import resolve_layer_map
from ..tasks import detect_task


def depth(config) -> int:
    return config.get_text_config().num_hidden_layers


def decoder_depth(config) -> int:
    """Layers of the decoder of an encoder-decoder model (T5: num_decoder_layers; BART, Marian...: decoder_layers)."""
    text = config.get_text_config()  # get_text_config(decoder=True) rebuilds a BART config with default depths
    for name in ("num_decoder_layers", "decoder_layers"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    return text.num_hidden_layers


Pairs = list  # [(student layer, teacher layer), ...]


@dataclass
class LossPlan:
    """The terms of one run and their layer pairs (0 = embeddings for hidden states; attention from 1)."""

    args: DistillationConfig
    hidden_pairs: Pairs = field(default_factory=list)
    attention_pairs: Pairs = field(default_factory=list)
    decoder_hidden_pairs: Pairs = field(default_factory=list)
    decoder_attention_pairs: Pairs = field(default_factory=list)
    encoder_decoder: bool = False
    minilm_modules: dict = field(default_factory=dict)  # {"student"|"teacher": {layer: (q, k, v) modules}}
    minilm_relation_heads: int | None = None

    @property
    def hidden(self) -> bool:
        return bool(self.hidden_pairs)

    @property
    def attention_maps(self) -> bool:
        return bool(self.attention_pairs) and self.args.uses_attention_maps

    @property
    def minilm(self) -> bool:
        return bool(self.minilm_modules) and self.args.uses_attention

    @property
    def n_hidden_pairs(self) -> int:
        """Hidden pairs of every stack, the encoder's first: one projection each when widths differ."""
        return len(self.hidden_pairs) + len(self.decoder_hidden_pairs)

    def needs_teacher(self) -> bool:
        """Whether any term reads a live teacher's outputs."""
        a = self.args
        return a.uses_teacher_logits or self.hidden or self.attention_maps or self.minilm or a.uses_relations

    def record(self, projections: int) -> dict:
        """The loss settings in use, as a checkpoint and the provenance record keep them."""
        a = self.args
        out = {
            "kd_loss": a.kd_loss, "temperature": a.temperature, "alpha": a.alpha, "jsd_beta": a.jsd_beta,
            "hidden_weight": a.hidden_weight, "hidden_loss": a.hidden_loss,
            "attention_weight": a.attention_weight, "attention_loss": a.attention_loss,
            "hidden_pairs": [list(p) for p in self.hidden_pairs],
            "attention_pairs": [list(p) for p in self.attention_pairs],
            "projections": projections,
        }
        # Fields below only when in use, so that records and checkpoints from before they existed still match.
        if self.minilm:
            out["minilm_relation_heads"] = self.minilm_relation_heads
        if a.uses_relations:
            out.update(relation_weight=a.relation_weight, relation_loss=a.relation_loss,
                       relation_pooling=a.relation_pooling)
        if a.teacher_tokenizer is not None:  # the teacher read its own tokens (hf_kd.distill.cross_tokenizer)
            out.update(teacher_tokenizer=a.teacher_tokenizer, cross_tokenizer_loss=a.cross_tokenizer_loss)
        for name in ("temperature", "alpha"):
            if getattr(a, f"{name}_schedule") != "constant":
                out.update({f"{name}_{key}": getattr(a, f"{name}_{key}") for key in ("schedule", "end")})
        if self.decoder_hidden_pairs or self.decoder_attention_pairs:
            out.update(decoder_hidden_pairs=[list(p) for p in self.decoder_hidden_pairs],
                       decoder_attention_pairs=[list(p) for p in self.decoder_attention_pairs])
        return out


def build_plan(student, teacher, args: DistillationConfig, task: str) -> LossPlan:
    """The plan for distilling `teacher` into `student` (plain transformers models); InputError lists the problems."""
    problems = pair_problems(student, teacher, args, task)
    plan = LossPlan(args, encoder_decoder=bool(student.config.is_encoder_decoder))
    ls, lt = depth(student.config), depth(teacher.config)  # the encoders of encoder-decoder models
    problems += _decoder_pairs(plan, student.config, teacher.config, args)
    try:
        if args.uses_hidden:
            plan.hidden_pairs = resolve_layer_map(args.layer_map, ls, lt, allow_embeddings=True)
        if args.uses_attention:
            plan.attention_pairs = resolve_layer_map(args.layer_map, ls, lt, allow_embeddings=False, what="attention")
    except ValueError as err:
        problems.append(str(err))
    if args.uses_attention and args.attention_loss == "minilm" and plan.attention_pairs:
        problems.extend(_minilm(plan, student, teacher, args))
    if args.uses_attention_maps:
        problems.extend(_eager_attention(student, teacher))
    if problems:
        raise InputError("Cannot distil this teacher into this student:\n  - " + "\n  - ".join(problems))
    return plan


def pair_problems(student, teacher, args: DistillationConfig, task: str) -> list[str]:
    """What makes this teacher unusable for this student at all: another task, other labels or vocabulary."""
    problems = []
    teacher_task = detect_task(teacher)
    if teacher_task != task:
        problems.append(
            f"the student solves {task} but the teacher {type(teacher).__name__} solves {teacher_task}; "
            "load the teacher with the student's task head."
        )
    s_cfg, t_cfg = student.config, teacher.config
    if task == "sequence_classification" and getattr(s_cfg, "problem_type", None) in (
        "regression", "multi_label_classification",
    ):
        problems.append(f"problem_type={s_cfg.problem_type} is not supported yet; hf_kd distils single-label classifiers.")
    if args.uses_teacher_logits and task in ("sequence_classification", "token_classification"):
        if s_cfg.num_labels != t_cfg.num_labels:
            problems.append(
                f"the student has {s_cfg.num_labels} labels and the teacher {t_cfg.num_labels}; logit "
                "distillation needs the same label set. Build the student with num_labels="
                f"{t_cfg.num_labels} (and the teacher's id2label)."
            )
    if s_cfg.is_encoder_decoder and (args.uses_relations or (args.uses_attention and args.attention_loss == "minilm")):
        problems.append(
            "MiniLM relations and sample relations for encoder-decoder models are not supported yet; set "
            "relation_weight=0 and use attention_loss='mse' or 'kl' (hidden and attention losses cover both stacks)."
        )
    return problems


def _decoder_pairs(plan: LossPlan, s_cfg, t_cfg, args: DistillationConfig) -> list[str]:
    """Encoder-decoder models: the decoders' own layer pairs (`decoder_layer_map`, default `layer_map`)."""
    if not plan.encoder_decoder:
        if args.decoder_layer_map is not None:
            return [
                f"decoder_layer_map is set but the student {type(s_cfg).__name__} has a single stack of layers "
                "(not an encoder-decoder model); use layer_map alone."
            ]
        return []
    layer_map = args.decoder_layer_map if args.decoder_layer_map is not None else args.layer_map
    ls, lt = decoder_depth(s_cfg), decoder_depth(t_cfg)
    try:
        if args.uses_hidden:
            plan.decoder_hidden_pairs = resolve_layer_map(layer_map, ls, lt, what="decoder hidden")
        if args.uses_attention:
            plan.decoder_attention_pairs = resolve_layer_map(
                layer_map, ls, lt, allow_embeddings=False, what="decoder attention"
            )
    except ValueError as err:
        return [f"{err} (decoder_layer_map maps the decoders; layer_map the encoders)"]
    return []


def _minilm(plan: LossPlan, student, teacher, args: DistillationConfig) -> list[str]:
    """attention_loss="minilm": find the q/k/v projections of the mapped layers and fix the relation heads."""
    found_by = {}
    try:
        for who, m, layers in (("student", student, [s for s, _ in plan.attention_pairs]),
                               ("teacher", teacher, [t for _, t in plan.attention_pairs])):
            found = relations.find_qkv_modules(m, depth(m.config), layers, who=who)
            missing = sorted(set(layers) - set(found))
            if missing:
                return [f"no query/key/value projections found in layers {missing} of the {who}; "
                        "attention_loss='minilm' needs them. Use attention_loss='mse' or 'kl'."]
            found_by[who] = found
    except ValueError as err:
        return [str(err)]
    widths = {
        who: sorted({w for trio in found.values() for w in map(relations.projection_width, trio) if w})
        for who, found in found_by.items()
    }
    given = args.minilm_relation_heads
    heads = given if given is not None else teacher.config.get_text_config().num_attention_heads
    if any(w % heads for ws in widths.values() for w in ws):
        if given is None:
            return [f"attention_loss='minilm' splits the q/k/v vectors into relation heads; the default, the "
                    f"teacher's {heads} heads, does not divide every width (student {widths['student']}, teacher "
                    f"{widths['teacher']}). Set minilm_relation_heads to a common divisor of them."]
        return [f"minilm_relation_heads={heads} does not divide every q/k/v width (student {widths['student']}, "
                f"teacher {widths['teacher']}); set it to a common divisor of them."]
    plan.minilm_modules = found_by
    plan.minilm_relation_heads = heads
    return []


def _eager_attention(student, teacher) -> list[str]:
    """Attention maps come from eager attention only: switch both models to it, or say why it cannot be done."""
    problems = []
    for name, m in (("student", student), ("teacher", teacher)):
        if m.config._attn_implementation != "eager":
            try:
                m.set_attn_implementation("eager")
            except Exception as err:  # noqa: BLE001 - any failure means no attention maps
                problems.append(
                    f"the {name} cannot switch to eager attention ({err}); attention maps are needed "
                    "for attention_weight > 0. Load it with attn_implementation='eager' or set attention_weight=0."
                )
    return problems
