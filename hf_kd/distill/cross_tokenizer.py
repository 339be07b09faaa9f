"""A teacher with its own tokenizer: its inputs re-tokenized from the text, its logits aligned to the student's.

The text the teacher reads is the student's ids decoded with the student's tokenizer, one text per run of
content tokens between special tokens (a question and its context are two runs, given to the teacher as a
pair). No dataset column has to be kept, and generations of the student (ids only) work the same way. The
offsets of the student's tokens come from re-tokenizing the text when that gives the same ids back (the
tokenizer's own tokenization, one call for the batch), else from decoding each prefix of the run
(`decoded_offsets`: a generated completion, or a prompt and its completion tokenized apart, are tokenizations
the tokenizer would not make itself). A student tokenizer that normalises (lowercasing, stripped accents) hands
the teacher normalised text.

Alignment is by character offsets into that text (fast tokenizers' ``offset_mapping``):

* sequence classification: none is needed, the logits are per example;
* token classification: each student token is compared with the teacher token holding its first
  non-space character (the first sub-token of each word carries the label: words align);
* question answering: start logits by each token's first non-space character, end logits by its last;
* causal LM: the tokens are grouped into spans whose both tokenizations end at the same character
  (`spans`). The prefix before each span is the same text for both models, so their predictions of the
  span's first token are compared: ULD or the hybrid (`hf_kd.cross_losses`), per ``cross_tokenizer_loss``;
* seq2seq: the source (the student's ``input_ids``) is re-tokenized for the teacher's encoder, the target (the
  student's ``labels``) for its decoder (``text_target``; the teacher's decoder inputs are its labels shifted by the
  teacher's own ``prepare_decoder_input_ids_from_labels``), and the decoder positions are aligned by the same spans
  as a causal LM: the logits at a label's position predict that label, after the same target text in both models.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch

from ..cross_losses import hybrid_loss, uld_loss
from ..errors import InputError
from ..losses import cross_entropy_loss, logit_distillation_loss
from ..tasks import token_mask

#: Tasks a teacher with its own tokenizer can teach.
CROSS_TASKS = ("sequence_classification", "token_classification", "question_answering", "causal_lm", "seq2seq_lm")
#: Tasks aligned by spans (a prediction of each span's first token).
LM_TASKS = ("causal_lm", "seq2seq_lm")


def token_ends(offsets) -> dict[int, int]:
    """{character where a token ends: its index} for the tokens after which the next starts at or past that
    character (a character split into several byte tokens ends only at its last one)."""
    ends = {}
    for i, (start, end) in enumerate(offsets):
        if end > start and (i + 1 == len(offsets) or offsets[i + 1][0] >= end):
            ends[end] = i
    return ends


def spans(student_offsets, teacher_offsets) -> list[tuple[range, range]]:
    """Consecutive groups of student and teacher tokens that cover the same characters: every token before the
    last common end is in exactly one group (tokens past it, e.g. cut by truncation, are in none)."""
    s_ends, t_ends = token_ends(student_offsets), token_ends(teacher_offsets)
    out, i0, j0 = [], 0, 0
    for char in sorted(s_ends.keys() & t_ends.keys()):
        i1, j1 = s_ends[char], t_ends[char]
        out.append((range(i0, i1 + 1), range(j0, j1 + 1)))
        i0, j0 = i1 + 1, j1 + 1
    return out


def decoded_offsets(tokenizer, ids: list[int], text: str) -> list[tuple[int, int]]:
    """Character offsets of each of `ids` in `text`, their decoding, found by decoding every prefix: for a
    tokenization the tokenizer would not make itself. A token whose prefix does not decode to the start of `text`
    (a byte of a character split into several byte tokens) shares the offsets of the token that completes it, as
    a fast tokenizer's offset_mapping does."""
    prefixes = tokenizer.batch_decode([ids[: k + 1] for k in range(len(ids))], clean_up_tokenization_spaces=False)
    out, start, pending = [], 0, 0
    for prefix in prefixes:
        pending += 1
        if len(prefix) >= start and text.startswith(prefix):
            out += [(start, len(prefix))] * pending
            start, pending = len(prefix), 0
    return out + [(start, len(text))] * pending  # only when the whole run does not decode to `text`


def _owners(text: str, offsets) -> dict[int, int]:
    """{character: index of the first token covering it}."""
    owner = {}
    for j, (start, end) in enumerate(offsets):
        for c in range(start, end):
            owner.setdefault(c, j)
    return owner


def _edge(text: str, start: int, end: int, last: bool) -> int | None:
    """The first (or last) non-space character of text[start:end], or None."""
    chars = range(end - 1, start - 1, -1) if last else range(start, end)
    return next((c for c in chars if not text[c].isspace()), None)


@dataclass
class Row:
    """One example as both tokenizers see it: its texts (runs between special tokens), and per run the
    positions (in the padded batch) and character offsets of its tokens."""

    texts: list[str]
    s_positions: list[list[int]]
    s_offsets: list[list[tuple[int, int]]]
    t_positions: list[list[int]] | None = None
    t_offsets: list[list[tuple[int, int]]] | None = None


class CrossTokenizer:
    """The teacher's inputs and the aligned logit terms, for a teacher whose tokenizer is not the student's."""

    def __init__(self, args, task: str, student_tokenizer, teacher_tokenizer, teacher_keys: set,
                 student_classes: int | None, teacher_classes: int | None, max_length: int | None,
                 decoder_inputs=None):
        self.args, self.task, self.decoder_inputs = args, task, decoder_inputs  # seq2seq: labels -> decoder inputs
        self.s_tok, self.t_tok, self.teacher_keys = student_tokenizer, teacher_tokenizer, teacher_keys
        self.s_classes, self.t_classes, self.max_length = student_classes, teacher_classes, max_length
        self.s_special = set(student_tokenizer.all_special_ids)
        self.rows: list[Row] = []  # the last batch's alignment (set by teacher_inputs, read by terms)
        self.masks: tuple = (None, None)  # the last batch's (student, teacher) attention masks
        self.targets: list[Row] = []  # seq2seq: the last batch's alignment of the labels
        self.target_masks: tuple = (None, None)  # seq2seq: the last batch's (student, teacher) label masks
        if task in LM_TASKS:
            sv, tv = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
            pairs = sorted((sv[k], tv[k]) for k in sv.keys() & tv.keys() if sv[k] < student_classes and tv[k] < teacher_classes)
            self.matched = (torch.tensor([p[0] for p in pairs], dtype=torch.long),
                            torch.tensor([p[1] for p in pairs], dtype=torch.long))

    @classmethod
    def start(cls, student, teacher, args, task: str, student_tokenizer, teacher_tokenizer) -> "CrossTokenizer":
        """The refusals of a cross-tokenizer run, then its `CrossTokenizer`."""
        problems = []
        if task not in CROSS_TASKS:
            problems.append(f"{task} is not supported across tokenizers yet (supported: {', '.join(CROSS_TASKS)}).")
        for who, tok in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
            if tok is None:
                problems.append(f"the {who}'s tokenizer is unknown: pass processing_class=<the student's tokenizer> "
                                "to DistillationTrainer.")
            elif not getattr(tok, "is_fast", False):
                problems.append(f"the {who}'s tokenizer {getattr(tok, 'name_or_path', '')!r} is not a fast "
                                "tokenizer: character offsets need one (AutoTokenizer.from_pretrained(..., use_fast=True)).")
        if task in LM_TASKS and args.uses_teacher_logits and args.kd_loss != "forward_kl":
            problems.append(f"kd_loss={args.kd_loss!r} compares one vocabulary; across tokenizers a causal LM or "
                            "seq2seq model uses cross_tokenizer_loss (uld or hybrid). Leave kd_loss at forward_kl.")
        decoder_inputs = getattr(teacher, "prepare_decoder_input_ids_from_labels", None)
        if task == "seq2seq_lm" and decoder_inputs is None:
            problems.append(f"the teacher ({type(teacher).__name__}) has no prepare_decoder_input_ids_from_labels to "
                            "make its decoder inputs from its own tokens of the target; use an encoder-decoder with one "
                            "(T5, BART, ...).")
        if problems:
            raise InputError("Cannot distil across tokenizers:\n  - " + "\n  - ".join(problems))
        if teacher_tokenizer.pad_token is None:  # batches of the teacher's texts are padded (and masked): a copy pads
            teacher_tokenizer = copy.deepcopy(teacher_tokenizer)  # with its end token, the user's is left as it is
            teacher_tokenizer.pad_token = teacher_tokenizer.eos_token or teacher_tokenizer.unk_token
        keys = set(inspect.signature(teacher.forward).parameters)
        s_classes = t_classes = None
        if task in LM_TASKS:  # each model's real vocabulary: padded rows are left out
            s_classes = min(len(student_tokenizer), student.config.get_text_config().vocab_size)
            t_classes = min(len(teacher_tokenizer), teacher.config.get_text_config().vocab_size)
        limit = getattr(teacher.config.get_text_config(), "max_position_embeddings", None)
        return cls(args, task, student_tokenizer, teacher_tokenizer, keys, s_classes, t_classes, limit,
                   decoder_inputs if task == "seq2seq_lm" else None)

    # ------------------------------------------------------------------ the teacher's inputs
    def student_rows(self, ids: torch.Tensor, mask: torch.Tensor) -> list[Row]:
        """The texts of each student example (runs between special tokens) and the offsets of their tokens; every run
        of the batch is re-tokenized in one call (`decoded_offsets` for the runs that do not tokenize back to their
        ids)."""
        rows, runs = [], []  # runs: (row, positions, ids)
        for b, (row_ids, row_mask) in enumerate(zip(ids.tolist(), mask.tolist())):
            found, run = [], []
            for p, (i, m) in enumerate(zip(row_ids, row_mask)):
                if m and i not in self.s_special:
                    run.append((p, i))
                elif run:
                    found, run = found + [run], []
            found += [run] if run else []
            if len(found) > 2:
                raise InputError(f"an example has {len(found)} runs of text between special tokens; a teacher with its "
                                 "own tokenizer reads one text or a pair. Tokenize each example as one text or a pair.")
            rows.append(Row([], [], []))
            runs += [(b, [p for p, _ in r], [i for _, i in r]) for r in found]
        texts = self.s_tok.batch_decode([content for _, _, content in runs], clean_up_tokenization_spaces=False)
        encs = self.s_tok(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else None
        for k, ((b, positions, content), text) in enumerate(zip(runs, texts)):
            same = encs["input_ids"][k] == content
            offsets = encs["offset_mapping"][k] if same else decoded_offsets(self.s_tok, content, text)
            rows[b].texts.append(text)
            rows[b].s_positions.append(positions)
            rows[b].s_offsets.append([tuple(o) for o in offsets])
        return rows

    def teacher_inputs(self, model_inputs: dict, labels: torch.Tensor | None = None) -> dict:
        """The teacher's tokenization of the batch's text (on the batch's device); remembers the alignment.
        Seq2seq: `labels` (the student's) give the target text of the teacher's decoder."""
        ids = model_inputs["input_ids"]
        mask = model_inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        self.rows = self.student_rows(ids, mask)
        self.masks = (mask.bool().tolist(), None)
        first = [r.texts[0] if r.texts else "" for r in self.rows]
        second = [r.texts[1] for r in self.rows if len(r.texts) > 1]
        pairs = second if len(second) == len(first) and second else None
        enc = self.t_tok(first, pairs, padding=True, truncation=True, max_length=self.max_length,
                         return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="pt")
        offsets = enc["offset_mapping"].tolist()  # (B, T, 2) as lists: read per token below
        for b, row in enumerate(self.rows):
            seq = enc.sequence_ids(b)
            row.t_positions = [[j for j, s in enumerate(seq) if s == k] for k in range(len(row.texts))]
            row.t_offsets = [[tuple(offsets[b][j]) for j in pos] for pos in row.t_positions]
        self.masks = (self.masks[0], enc["attention_mask"].bool().tolist())
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc and k in self.teacher_keys]
        out = {k: enc[k].to(ids.device) for k in keys}
        if self.task == "seq2seq_lm":
            out["decoder_input_ids"] = self.target_inputs(labels).to(ids.device)
        return out

    def target_inputs(self, labels: torch.Tensor | None) -> torch.Tensor:
        """Seq2seq: the teacher's decoder inputs (B, T') from its tokenization of the target text, the student's
        labels decoded; remembers the alignment of the two label sequences."""
        if labels is None:
            raise InputError("a seq2seq batch without labels reached a teacher with its own tokenizer: the target text "
                             "it reads comes from the labels. Give the batches labels (the target's token ids).")
        valid = labels != -100  # (B, T)
        pad = self.s_tok.pad_token_id if self.s_tok.pad_token_id is not None else 0
        self.targets = self.student_rows(labels.masked_fill(~valid, pad).cpu(), valid.cpu())
        texts = [row.texts[0] if row.texts else "" for row in self.targets]  # the target: one run
        enc = self.t_tok(text_target=texts, padding=True, truncation=True, max_length=self.max_length,
                         return_offsets_mapping=True, return_tensors="pt")
        offsets = enc["offset_mapping"].tolist()
        for b, row in enumerate(self.targets):
            seq = enc.sequence_ids(b)
            row.t_positions = [[j for j, s in enumerate(seq) if s == 0]][: len(row.texts)]
            row.t_offsets = [[tuple(offsets[b][j]) for j in pos] for pos in row.t_positions]
        t_valid = enc["attention_mask"].bool()  # (B, T')
        self.target_masks = (valid.tolist(), t_valid.tolist())
        return self.decoder_inputs(labels=enc["input_ids"].masked_fill(~t_valid, -100))

    # ------------------------------------------------------------------ the aligned terms
    def position_map(self, length: int, last: bool) -> torch.Tensor:
        """(B, length) long: for each student position the teacher position holding its first (or last)
        non-space character, -1 where none (special tokens, padding, characters the teacher cut off)."""
        out = torch.full((len(self.rows), length), -1, dtype=torch.long)
        for b, row in enumerate(self.rows):
            for text, s_pos, s_off, t_pos, t_off in zip(row.texts, row.s_positions, row.s_offsets, row.t_positions,
                                                        row.t_offsets):
                owner = _owners(text, t_off)
                for p, (start, end) in zip(s_pos, s_off):
                    c = _edge(text, start, end, last)
                    if c is not None and c in owner:
                        out[b, p] = t_pos[owner[c]]
        return out

    def span_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(example, student row, teacher row) of each span's prediction, (N,) each: the logits that predict the
        span's first token in each model. Causal LM: the positions just before it (the shifted logits' rows; spans
        without one, or where it is padding on the left, are left out); seq2seq: its positions in the labels."""
        seq2seq = self.task == "seq2seq_lm"
        rows, (s_mask, t_mask) = (self.targets, self.target_masks) if seq2seq else (self.rows, self.masks)
        shift, found = 0 if seq2seq else 1, []
        for b, row in enumerate(rows):
            if not row.texts:
                continue
            s_pos, t_pos = row.s_positions[0], row.t_positions[0]
            for s_span, t_span in spans(row.s_offsets[0], row.t_offsets[0]):
                ps, pt = s_pos[s_span[0]] - shift, t_pos[t_span[0]] - shift
                if ps >= 0 and pt >= 0 and s_mask[b][ps] and t_mask[b][pt]:
                    found.append((b, ps, pt))
        return tuple(torch.tensor([f[k] for f in found], dtype=torch.long) for k in range(3))

    def terms(self, batch, targets, counts, temperature, alpha) -> tuple[torch.Tensor, dict]:
        """(weighted KD + CE, {"kd_loss", "ce_loss"}) on the aligned logits (the trainer's head terms)."""
        args, components = self.args, {}
        s_logits, device = targets.student, targets.student[0].device
        kd = None
        if args.uses_teacher_logits and self.task in LM_TASKS:
            b, ps, pt = (x.to(device) for x in self.span_rows())
            zs = targets.student[0][b, ps, : self.s_classes]  # (N, Vs); causal LM: shifted, index p predicts p + 1
            zt = targets.teacher[0][b, pt, : self.t_classes].to(device)  # (N, Vt)
            valid = targets.mask[b, ps] if targets.mask is not None else None  # (N,) the student's label is kept
            if args.cross_tokenizer_loss == "uld":
                kd = uld_loss(zs, zt, valid, temperature=temperature, normalizer=counts["logit"])
            else:
                kd = hybrid_loss(zs, zt, *self.matched, valid, temperature=temperature, normalizer=counts["logit"])
        elif args.uses_teacher_logits:
            kd = self._aligned_kd(targets, counts, temperature, device)
        total = torch.zeros((), device=device, dtype=torch.float32)
        if kd is not None:
            components["kd_loss"] = kd
            total = total + alpha * (1.0 if args.kd_loss == "mse" else temperature**2) * kd
        if all(label is not None for label in targets.labels) and alpha < 1:
            class_mask = token_mask(batch) if self.task == "question_answering" else None
            components["ce_loss"] = sum(
                cross_entropy_loss(s, label, normalizer=counts["label"], class_mask=class_mask)
                for s, label in zip(s_logits, targets.labels)
            ) / len(s_logits)
            total = total + (1 - alpha) * components["ce_loss"]
        return total, components

    def _aligned_kd(self, targets, counts, temperature, device) -> torch.Tensor:
        """Encoder tasks: the teacher's logits moved to the student's positions, then the usual divergence."""
        args = self.args
        options = dict(kind=args.kd_loss, temperature=temperature, jsd_beta=args.jsd_beta, normalizer=counts["logit"])
        if self.task == "sequence_classification":  # one row per example: nothing to align
            return logit_distillation_loss(targets.student[0], targets.teacher[0].to(device), **options)
        length = targets.student[0].shape[1]
        if self.task == "token_classification":
            where = self.position_map(length, last=False).to(device)  # (B, T)
            zt = targets.teacher[0].to(device).gather(1, where.clamp_min(0)[..., None].expand(-1, -1, targets.teacher[0].shape[-1]))
            mask = (where >= 0) & (targets.mask if targets.mask is not None else True)  # (B, T)
            return logit_distillation_loss(targets.student[0], zt, mask, **options)
        losses = []  # question answering: start by first characters, end by last characters
        for s, t, last in zip(targets.student, targets.teacher, (False, True)):
            where = self.position_map(length, last).to(device)  # (B, T)
            zt = t.to(device).gather(1, where.clamp_min(0))  # (B, T)
            losses.append(logit_distillation_loss(s, zt, class_mask=where >= 0, **options))
        return sum(losses) / 2
