"""Tiny models and data built from configs: no downloads, seconds on 2 CPU cores."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

WORDS = (
    "good great fine fun superb lovely bad awful dull boring poor weak the a film movie plot was is "
    "very not quite really story acting"
).split()


def bert_config(layers=4, hidden=16, heads=4, num_labels=2, vocab=64, **kw):
    return BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=num_labels,
        attn_implementation="eager",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kw,
    )


def make_bert(cls=BertForSequenceClassification, seed=0, **kw):
    torch.manual_seed(seed)
    return cls(bert_config(**kw))


def make_llama(layers=2, hidden=16, heads=4, vocab=64, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=64,
        attn_implementation="eager",
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


TASK_MODELS = {
    "sequence_classification": BertForSequenceClassification,
    "token_classification": BertForTokenClassification,
    "question_answering": BertForQuestionAnswering,
    "masked_lm": BertForMaskedLM,
}


def random_batch(task, batch=4, length=10, vocab=64, num_labels=2, seed=0, pad_from=None):
    """A batch for `task`; rows i >= 1 are right-padded from `pad_from[i]` on when given."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad_from is not None:
        for i, start in enumerate(pad_from):
            ids[i, start:] = 0
            mask[i, start:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if task == "sequence_classification":
        out["labels"] = torch.randint(0, num_labels, (batch,), generator=g)
    elif task in ("token_classification", "masked_lm", "causal_lm"):
        high = num_labels if task == "token_classification" else vocab
        labels = torch.randint(0, high, (batch, length), generator=g)
        labels[mask == 0] = -100
        out["labels"] = labels
    elif task == "question_answering":
        out["start_positions"] = torch.randint(0, 3, (batch,), generator=g)
        out["end_positions"] = out["start_positions"] + 1
    return out


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def rows_from_batch(batch):
    n = batch["input_ids"].shape[0]
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level BERT-style tokenizer over WORDS, made locally (no Hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )


@pytest.fixture
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def tiny_pair():
    """A 4-layer, width-16 teacher and a 2-layer, width-8 student for sequence classification."""
    teacher = make_bert(layers=4, hidden=16, heads=4, seed=1)
    student = make_bert(layers=2, hidden=8, heads=2, seed=2)
    return teacher, student


def write_tiny_csv(path, n=48, seed=0):
    """A toy sentiment CSV (text,label) from WORDS: label 1 when a positive word leads."""
    import csv
    import random

    rng = random.Random(seed)
    pos, neg, rest = WORDS[:6], WORDS[6:12], WORDS[12:]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            label = i % 2
            words = [rng.choice(pos if label else neg)] + rng.sample(rest, 4)
            w.writerow([" ".join(words), label])
    return path


def forward_hooks(model) -> dict:
    """{module name: its forward (pre-)hooks}: what a test compares to see that no hook was left behind."""
    return {
        name: (tuple(m._forward_hooks.values()), tuple(m._forward_pre_hooks.values()))
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks
    }
