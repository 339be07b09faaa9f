"""Where each accumulation window's completions come from, their generation, and the batches the losses read.

For prompt-completion data (`hf_kd.prompts`), once per optimizer step (Trainer's ``get_batch_samples``):

- with probability ``lmbda`` (at that step, after its schedule) the student generates the window's completions
  (on-policy distillation; GKD, Agarwal et al. 2024);
- otherwise, with ``seq_kd``, the teacher generates them (sequence-level KD, Kim & Rush 2016);
- otherwise the dataset's completions are used.

The draw depends on the seed and the step alone: every process makes the same choice, and a resumed run the
same as an uninterrupted one. Generation runs once per window, on all its prompts, with ``model.generate`` in
evaluation mode (dropout off, and gradient checkpointing, which only acts in training mode, off) with the KV
cache on; the model's mode is restored after. Under DDP each process generates for its own prompts.

Each micro-batch then becomes an ordinary LM batch, so every logit loss and the chunked head route apply
unchanged: for decoder-only models ``input_ids`` = the prompt's tokens followed by the completion's, right-padded,
and ``labels`` = -100 on the prompt, the completion's tokens up to and including the first EOS, -100 after it
(also when the pad token is the EOS token); for encoder-decoder models the prompt is the encoder's input and the
labels are the completion's tokens, masked the same way (the decoder reads them shifted right, after its start
token, exactly as `generate` produced them).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random

import torch

from .. import prompts
from ..prompts import causal_batch, first_eos_mask, seq2seq_batch
from ..errors import InputError
from .vocab import embedding_rows
from .cross_generation import TeacherWriter

logger = logging.getLogger(__name__)

SOURCES = ("student", "teacher", "dataset")
GENERATIVE_TASKS = ("causal_lm", "seq2seq_lm")


def generates(args) -> bool:
    """Whether training ever generates completions (lmbda > 0 at some step, or seq_kd)."""
    return args.lmbda > 0 or (args.lmbda_schedule != "constant" and (args.lmbda_end or 0) > 0) or args.seq_kd


def concat_prompts(batches: list[dict], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts of a window's micro-batches as one (N, P) batch, re-padded to the longest."""
    width = max(b["prompt_input_ids"].shape[1] for b in batches)
    ids, masks = [], []
    for b in batches:
        i, m = b["prompt_input_ids"], b["prompt_attention_mask"]
        extra = width - i.shape[1]
        side = (extra, 0) if left else (0, extra)
        ids.append(torch.nn.functional.pad(i, side, value=pad_id))
        masks.append(torch.nn.functional.pad(m, side, value=0))
    return torch.cat(ids), torch.cat(masks)


@contextlib.contextmanager
def generation_mode(model):
    """Evaluation mode (dropout off; gradient checkpointing acts in training mode only) and no autograd, for
    `generate`; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


class Rollout:
    """Completions per accumulation window, and the LM batches built from them (see the module).

    Args:
        args: the `DistillationConfig` (lmbda and its schedule, seq_kd, generation_config, seed).
        task: "causal_lm" or "seq2seq_lm".
        tokenizer: the student's tokenizer (pad and EOS ids; may be None when the model configs give them).
        student_model: the student (its generation_config and config give pad and EOS ids the tokenizer lacks).
        suppressed: ids generation never produces (`unreadable_ids`: padding ids a model that reads the completions
            cannot embed).

    ``teacher_writer``: with a teacher that has its own tokenizer and ``seq_kd``, a `TeacherWriter` (the teacher's
    completions re-tokenized for the student), else None.
    """

    def __init__(self, args, task: str, tokenizer, student_model, suppressed: list[int] | None = None):
        self.args, self.task = args, task
        self.teacher_writer = None  # set by `prepare` across tokenizers with seq_kd
        self.encoder_decoder = task == "seq2seq_lm"
        gen = copy.deepcopy(args.generation_config)
        defaults = getattr(student_model, "generation_config", None)
        eos = gen.eos_token_id if gen.eos_token_id is not None else getattr(defaults, "eos_token_id", None)
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        eos = [e for e in ([eos] if isinstance(eos, int) else list(eos or [])) + [tok_eos] if e is not None]
        if not eos:
            eos = [student_model.config.get_text_config().eos_token_id]
        self.eos_ids = sorted({e for e in eos if e is not None})
        pads = (getattr(tokenizer, "pad_token_id", None), gen.pad_token_id, getattr(defaults, "pad_token_id", None))
        pads += tuple(self.eos_ids[:1])  # pad == EOS is fine: see the module
        self.pad_id = next((p for p in pads if p is not None), None)
        if self.pad_id is None:
            raise InputError(
                "neither the tokenizer nor the generation configs give a pad or an end-of-sequence token id, so "
                "completions can be neither padded nor ended. Pass processing_class=<the student's tokenizer, with an "
                "EOS token>, or set generation_config={'eos_token_id': ..., 'pad_token_id': ...}."
            )
        gen.eos_token_id, gen.pad_token_id, gen.use_cache = self.eos_ids, self.pad_id, True
        if suppressed:
            gen.suppress_tokens = sorted(set(gen.suppress_tokens or []) | set(suppressed))
        self.generation_config = gen
        self.greedy_config = copy.deepcopy(gen)
        self.greedy_config.do_sample, self.greedy_config.temperature = False, None
        self.greedy_config.top_p = self.greedy_config.top_k = None
        self.last_source: str | None = None  # of the last window: "student", "teacher" or "dataset"
        self.windows = {s: 0 for s in SOURCES}  # windows per source since the start (logged)

    @staticmethod
    def applies(batch: dict) -> bool:
        return "prompt_input_ids" in batch

    def source(self, step: int, total_steps: int) -> str:
        """Who provides the completions of the window of optimizer step `step` (0-based)."""
        lmbda = self.args.scheduled("lmbda", step, total_steps)
        if lmbda > 0 and random.Random(f"{self.args.seed}:{step}").random() < lmbda:
            return "student"
        return "teacher" if self.args.seq_kd else "dataset"

    def window(self, batches: list[dict], student, teacher, step: int, total_steps: int) -> list[dict]:
        """The LM batches of one accumulation window, with the completions of `source(step)`."""
        source = self.last_source = self.source(step, total_steps)
        self.windows[source] += 1
        if source == "dataset":
            return [self.dataset_batch(b) for b in batches]
        model = student if source == "student" else teacher
        device = next(model.parameters()).device
        batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
        ids, mask = concat_prompts(batches, self.pad_id, left=not self.encoder_decoder)
        if source == "teacher" and self.teacher_writer is not None:  # written in the teacher's tokens, then the student's
            completions, valid = self.teacher_writer.completions(
                lambda m, i, a, config: self.generate(m, i, a, config=config), model, ids, mask)
        else:
            completions, valid = self.generate(model, ids, mask), None  # (N, L)
        out, start = [], 0
        for b in batches:
            n = b["prompt_input_ids"].shape[0]
            c, kept = completions[start: start + n], None if valid is None else valid[start: start + n]
            p_ids, p_mask = ids[start: start + n], mask[start: start + n]
            out.append(self.lm_batch(p_ids, p_mask, c, first_eos_mask(c, self.eos_ids, kept)))
            start += n
        return out

    def generate(self, model, ids: torch.Tensor, mask: torch.Tensor, greedy: bool = False, config=None) -> torch.Tensor:
        """The generated completion ids (N, L) for left-padded (decoder-only) or right-padded prompts; `greedy`:
        without sampling (evaluation), else with `generation_config` (or `config`, for a model with other ids)."""
        config = config if config is not None else self.greedy_config if greedy else self.generation_config
        # the start-up check reads the first rows only: a longer prompt later is refused here, not by an IndexError
        problem = context_problem(ids.shape[1], config.max_new_tokens, context_limit(model), self.encoder_decoder,
                                  "a prompt of this batch has")
        if problem:
            raise InputError(problem)
        with generation_mode(model):
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        # decoder-only: the prompt comes back first; encoder-decoder: the decoder's start token does
        return out[:, 1:] if self.encoder_decoder else out[:, ids.shape[1]:]

    def dataset_batch(self, batch: dict) -> dict:
        """The LM batch of a prompt-completion batch with the dataset's completions."""
        if "completion_input_ids" not in batch:
            raise InputError(
                "a prompt-only batch (no completion) reached a step that trains on the dataset's completions; with "
                "prompt-only data set lmbda=1 or seq_kd=True so that every completion is generated."
            )
        c = batch["completion_input_ids"]
        return self.lm_batch(batch["prompt_input_ids"], batch["prompt_attention_mask"], c,
                             first_eos_mask(c, self.eos_ids, batch["completion_attention_mask"]))

    def model_batch(self, batch: dict) -> dict:
        """A model-ready batch of a prompt-completion batch (e.g. to time the models): the dataset's completions, or
        the prompts alone (seq2seq: with one decoder position) for prompt-only data."""
        if "completion_input_ids" in batch:
            return self.dataset_batch(batch)
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        c = torch.full((ids.shape[0], 1), (self.eos_ids or [self.pad_id])[0], dtype=ids.dtype, device=ids.device)
        return self.lm_batch(ids, mask, c, torch.ones_like(c, dtype=torch.bool))

    def lm_batch(self, p_ids, p_mask, c_ids, c_mask) -> dict:
        if self.encoder_decoder:
            return seq2seq_batch(p_ids, p_mask, c_ids, c_mask)
        return causal_batch(p_ids, p_mask, c_ids, c_mask, self.pad_id)


# ---------------------------------------------------------------------------------------------- start-up checks
def context_limit(model) -> int | None:
    """Positions the model can embed (max_position_embeddings), or None when it has no such limit (T5)."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def context_problem(prompt_tokens: int, new_tokens: int, limit: int | None, encoder_decoder: bool,
                    subject: str = "a prompt has") -> str | None:
    """Why prompts of `prompt_tokens` tokens and `new_tokens` generated ones do not fit `limit` positions, or None.

    Decoder-only: prompt and completion share the context. Encoder-decoder: the prompt fills the encoder's; the
    decoder's start token and the completion fill the decoder's."""
    if limit is None:
        return None
    if encoder_decoder:
        if new_tokens + 1 > limit:
            return (f"generation_config.max_new_tokens={new_tokens} tokens after the decoder's start token exceed the "
                    f"decoder's context of {limit} positions (max_position_embeddings). Set max_new_tokens <= "
                    f"{limit - 1}.")
        if prompt_tokens > limit:
            return (f"{subject} {prompt_tokens} tokens, past the encoder's context of {limit} positions "
                    f"(max_position_embeddings). Set max_prompt_length <= {limit}.")
        return None
    if new_tokens >= limit:
        return (f"generation_config.max_new_tokens={new_tokens} leaves no room for a prompt in the models' context of "
                f"{limit} positions (max_position_embeddings). Set max_new_tokens below {limit}, and max_prompt_length "
                "to what remains.")
    if prompt_tokens + new_tokens > limit:
        return (f"{subject} {prompt_tokens} tokens and {new_tokens} more are generated, past the models' context of "
                f"{limit} positions (max_position_embeddings). Set max_prompt_length <= {limit - new_tokens} or lower "
                "generation_config.max_new_tokens.")
    return None


def room_needed(args) -> int:
    """Completion tokens the context must hold beyond the prompt: max_new_tokens when generating, else one."""
    return args.generation_config.max_new_tokens if generates(args) or args.eval_generation else 1


def unreadable_ids(student, teacher, tokenizer) -> list[int]:
    """Ids that generation must not produce because a model that reads the completions cannot embed them.

    The student trains on every completion and the teacher scores it (`prepare` calls this only when the teacher
    reads the student's ids, not across tokenizers). With one tokenizer and embeddings padded to different sizes (Qwen2.5: 151,936 vs
    152,064 rows for 151,665 tokens), the ids past the smaller model's rows are padding, never a token: they are
    suppressed. When the tokenizer's own tokens do not fit, the pair is refused."""
    if teacher is None:
        return []
    size = lambda m: m.config.get_text_config().vocab_size  # noqa: E731 - output ids a model generates
    rows = {name: embedding_rows(m) or size(m) for name, m in (("student", student), ("teacher", teacher))}
    reader = min(rows, key=rows.get)  # the model that embeds the fewest ids
    outputs = max(size(student), size(teacher))
    if outputs <= rows[reader]:
        return []
    tokens = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None
    if tokens is None or tokens > rows[reader]:
        have = f"the tokenizer has {tokens} tokens" if tokens is not None else "the tokenizer is unknown"
        raise InputError(
            f"the {reader} embeds {rows[reader]} token ids but {have} and the models generate up to {outputs} ids: "
            f"the {reader} cannot read every token of the generated completions. Use a teacher with the student's "
            "tokenizer (or set teacher_tokenizer=<the teacher's tokenizer> to distil across tokenizers, see "
            "docs/cross-tokenizer.md), and pass processing_class=<the student's tokenizer>."
        )
    logger.info("Generation never produces ids %d..%d: the %s cannot embed them (padding past the tokenizer's %d "
                "tokens).", rows[reader], outputs - 1, reader, tokens)
    return list(range(rows[reader], outputs))


def prepare(kwargs: dict, args, task: str, student, teacher, cross=None) -> Rollout | None:
    """Start-up: refuse what generation cannot serve, default the collator of prompt-completion data, and return
    the `Rollout` (None when neither the data nor the settings involve completions). `cross`: the run's
    `CrossTokenizer` when the teacher has its own tokenizer (the student's completions reach it as text; with
    ``seq_kd`` it writes its own, `hf_kd.distill.cross_generation`)."""
    datasets = [kwargs.get("train_dataset"), kwargs.get("eval_dataset")]
    datasets = [d for d in datasets if d is not None and not isinstance(d, dict)]
    prompt_data = any(prompts.is_prompt_data(d) for d in datasets)
    if not (prompt_data or generates(args) or args.eval_generation):
        return None
    if task not in GENERATIVE_TASKS:
        raise InputError(
            f"lmbda, seq_kd, eval_generation and prompt-completion data need a generative student (causal or seq2seq "
            f"LM); this student is a {task} model. Unset them, or tokenize the data into input_ids/labels."
        )
    if args.teacher_cache is not None and (generates(args) or args.eval_generation):
        raise InputError("a teacher cache holds the teacher's outputs on the dataset's text; generated completions "
                         "need the live teacher. Unset teacher_cache, or set lmbda=0, seq_kd=False.")
    tokenizer = getattr(kwargs.get("processing_class"), "tokenizer", kwargs.get("processing_class"))
    if tokenizer is not None and tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise InputError("the tokenizer has no pad token and no EOS token to pad with, so prompts and completions "
                             "cannot be batched. Set tokenizer.pad_token to a token it already has (e.g. "
                             "tokenizer.pad_token = tokenizer.unk_token), or give it an EOS token.")
        logger.warning("The tokenizer has no pad token; padding with its EOS token %r.", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    if prompt_data and kwargs.get("data_collator") is None:
        if tokenizer is None:
            raise InputError("prompt-completion data is tokenized by the collator: pass processing_class=tokenizer "
                             "(or a data_collator such as hf_kd.PromptCollator).")
        kwargs["data_collator"] = prompts.PromptCollator(tokenizer, task == "seq2seq_lm", args.max_prompt_length)
    if cross is not None and args.eval_generation:
        raise InputError("eval_generation scores the student's completions with the teacher on the student's tokens; "
                         "a teacher with its own tokenizer (teacher_tokenizer) cannot read them. Set "
                         "eval_generation=False.")
    # across tokenizers the teacher reads text, not the student's ids
    needs_ids = cross is None and (generates(args) or args.eval_generation)
    suppressed = unreadable_ids(student, teacher, tokenizer) if needs_ids else []
    models = [m for m in (student, teacher) if m is not None]
    limit = min((c for c in map(context_limit, models) if c), default=None)
    problem = context_problem(args.max_prompt_length or 0, room_needed(args), limit, task == "seq2seq_lm",
                              f"max_prompt_length={args.max_prompt_length} lets a prompt have")
    if problem:
        raise InputError(problem)
    eval_dataset = kwargs.get("eval_dataset")
    if args.eval_generation and eval_dataset is not None and not isinstance(eval_dataset, dict) \
            and not prompts.is_prompt_data(eval_dataset):
        raise InputError("eval_generation=True generates completions for the evaluation prompts, but eval_dataset has "
                         "no prompt/completion (or messages) rows; give it prompt rows, or set eval_generation=False.")
    for d in datasets:
        check_prompts(d, kwargs.get("data_collator"), args, task, models,
                      args.lmbda < 1 and not args.seq_kd and d is kwargs.get("train_dataset"))
    out = Rollout(args, task, tokenizer, student, suppressed)
    if cross is not None and args.seq_kd:
        out.teacher_writer = TeacherWriter(cross.s_tok, cross.t_tok, teacher, out.generation_config, out.eos_ids[0],
                                           out.pad_id, encoder_decoder=out.encoder_decoder)
    return out


def backend_problems(backend, args) -> list[str]:
    """Generation needs whole models on each process: FSDP and DeepSpeed ZeRO-3 shard them."""
    if (generates(args) or args.eval_generation) and backend.shards_models:
        return [f"lmbda/seq_kd/eval_generation generate with model.generate, which cannot run on the shards that "
                f"{backend.name} holds on each process; use DDP (or one process), or set lmbda=0, seq_kd=False, "
                "eval_generation=False."]
    return []


def check_prompts(dataset, collator, args, task: str, models: list, needs_completions: bool, rows: int = 100) -> None:
    """The first `rows` rows: a chat template for chat rows, completions where the dataset must give them, and room
    in the models' context for the prompt and max_new_tokens (`context_problem`; `Rollout.generate` refuses a longer
    prompt met later)."""
    row = prompts.first_row(dataset)
    if row is None or not prompts.is_prompt_data(dataset):
        return
    tokenizer = getattr(collator, "tokenizer", None)
    if prompts.is_chat(row) and tokenizer is not None and getattr(tokenizer, "chat_template", None) is None:
        raise InputError("the data holds chat messages but the tokenizer has no chat template to render them; set "
                         "tokenizer.chat_template (e.g. from the instruct model's tokenizer), or give "
                         "prompt/completion text columns.")
    if needs_completions and not ("completion" in row or "messages" in row or "completion_input_ids" in row):
        raise InputError("the training data has prompts without completions, but lmbda < 1 and seq_kd=False train "
                         "some steps on the dataset's completions. Set lmbda=1 or seq_kd=True, or add completions.")
    if not isinstance(collator, prompts.PromptCollator):
        return
    longest = max(len(collator.encode(dataset[i])[0]) for i in range(min(rows, len(dataset))))
    limit = min((c for c in map(context_limit, models) if c), default=None)
    problem = context_problem(longest, room_needed(args), limit, task == "seq2seq_lm")
    if problem:
        raise InputError(problem)
