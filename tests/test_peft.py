"""PEFT: a LoRA student (only the adapter and the head train), a teacher given as base + adapter, merging on save."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ListDataset, make_bert, make_llama, random_batch, rows_from_batch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification

from hf_kd import DistillationConfig, DistillationTrainer, InputError
from hf_kd.hub import PROVENANCE_NAME
from hf_kd.teachers import load_teacher

BERT_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}


def make_args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, learning_rate=1e-2,
    )
    base.update(kw)
    return DistillationConfig(**base)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("task", ["sequence_classification", "causal_lm"])
def test_lora_student_trains_the_adapter_and_head_only(tmp_path, task):
    if task == "causal_lm":
        teacher, student = make_llama(layers=2, hidden=16, seed=1), make_llama(layers=2, hidden=8, heads=2, seed=2)
        lora = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    else:
        teacher, student = make_bert(layers=4, hidden=16, heads=4, seed=1), make_bert(layers=2, hidden=8, heads=2, seed=2)
        lora = BERT_LORA
    batch = random_batch(task, batch=8)
    # Widths differ: the hidden loss adds projections, which train too.
    args = make_args(tmp_path, peft_config=lora, hidden_weight=1.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=ListDataset(rows_from_batch(batch)))
    model = trainer.model
    assert isinstance(model, PeftModel)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    if task == "sequence_classification":  # the head is a module peft saves and trains (task_type SEQ_CLS)
        assert any("classifier" in n and "modules_to_save" in n for n in trainable)
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"base weight {n} changed"
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    expected = {id(p) for p in model.parameters() if p.requires_grad} | {id(p) for p in trainer.projections.parameters()}
    assert len(trainer.projections) and in_optimizer == expected


def test_peft_model_is_trained_as_given_and_peft_config_twice_is_refused(tmp_path):
    teacher = make_bert(layers=4, hidden=16, heads=4, seed=1)
    student = get_peft_model(make_bert(layers=2, hidden=8, heads=2, seed=2),
                             LoraConfig(task_type="SEQ_CLS", **BERT_LORA))
    with pytest.raises(InputError, match="already a peft.PeftModel and peft_config is set"):
        DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path, peft_config=BERT_LORA))
    batch = random_batch("sequence_classification", batch=8)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(tmp_path),
                                  train_dataset=ListDataset(rows_from_batch(batch)))
    assert trainer.model is student
    base = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    trainer.train()
    assert all(torch.equal(p, base[n]) for n, p in student.named_parameters() if n in base)


def _adapter_teacher(tmp_path):
    """A base teacher saved in a folder, and a LoRA adapter on it (non-zero, head included) saved in another."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    make_bert(layers=2, hidden=16, heads=4, seed=1).save_pretrained(base_dir)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir)
    peft_teacher = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", **BERT_LORA))
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in peft_teacher.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:  # LoRA starts as the identity (B = 0): move it
                p.add_(torch.randn_like(p) * 0.5)
    peft_teacher.save_pretrained(adapter_dir)
    return peft_teacher, adapter_dir


def test_teacher_from_base_and_adapter_folder_matches_the_merged_model(tmp_path):
    peft_teacher, adapter_dir = _adapter_teacher(tmp_path)
    batch = random_batch("sequence_classification", batch=4)
    with_adapter = _logits(peft_teacher, batch)
    without = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    assert not torch.allclose(_logits(without, batch), with_adapter, atol=1e-3)  # the adapter matters
    loaded = load_teacher(str(adapter_dir), "sequence_classification")
    assert not isinstance(loaded, PeftModel)  # merged into the base weights
    assert torch.allclose(_logits(loaded, batch), with_adapter, atol=1e-5)

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    merged = PeftModel.from_pretrained(merged, adapter_dir).merge_and_unload()
    student = make_bert(layers=2, hidden=8, heads=2, seed=2)
    for given in (str(adapter_dir), peft_teacher):  # a folder, or a PeftModel object
        trainer = DistillationTrainer(model=student, teacher_model=given, args=make_args(tmp_path))
        assert torch.allclose(_logits(trainer.teacher, batch), _logits(merged, batch), atol=1e-5)
        assert all(not p.requires_grad for p in trainer.teacher.parameters())


def _trained_lora_student(tmp_path, **config):
    teacher, student = make_bert(layers=4, hidden=16, heads=4, seed=1), make_bert(layers=2, hidden=8, heads=2, seed=2)
    batch = random_batch("sequence_classification", batch=8)
    args = make_args(tmp_path, peft_config=BERT_LORA, max_steps=2, save_strategy="steps", save_steps=2, **config)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=ListDataset(rows_from_batch(batch)))
    trainer.train()
    return trainer, batch


def test_merge_adapter_on_save_writes_a_plain_transformers_model(tmp_path):
    trainer, batch = _trained_lora_student(tmp_path, merge_adapter_on_save=True)
    folder = tmp_path / "final"
    trainer.save_model(str(folder))
    assert (folder / "model.safetensors").is_file() and not (folder / "adapter_config.json").exists()
    reloaded = AutoModelForSequenceClassification.from_pretrained(folder)  # no peft involved
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    assert torch.allclose(_logits(reloaded, batch), _logits(trainer.model, batch), atol=1e-5)
    assert json.loads((folder / PROVENANCE_NAME).read_text())["student"]["adapter"] is False
    assert "library_name: transformers" in (folder / "README.md").read_text()
    # The student being trained keeps its adapter, and checkpoints hold the adapter.
    assert isinstance(trainer.model, PeftModel) and any("lora_" in n for n, _ in trainer.model.named_parameters())
    assert (tmp_path / "out" / "checkpoint-2" / "adapter_config.json").is_file()


def test_default_save_writes_the_adapter(tmp_path):
    trainer, batch = _trained_lora_student(tmp_path)
    folder = tmp_path / "final"
    trainer.save_model(str(folder))
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert not (folder / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(make_bert(layers=2, hidden=8, heads=2, seed=2), folder)
    assert torch.allclose(_logits(reloaded, batch), _logits(trainer.model, batch), atol=1e-5)
    record = json.loads((folder / PROVENANCE_NAME).read_text())
    assert record["student"]["adapter"] is True and record["config"]["peft_config"]["r"] == 4
    assert "library_name: peft" in (folder / "README.md").read_text()


def test_config_refuses_a_bad_peft_config(tmp_path):
    with pytest.raises(ValueError, match="not a valid LORA configuration"):
        make_args(tmp_path, peft_config={"rank": 4})
    with pytest.raises(ValueError, match="peft_config=.* is not JSON"):
        make_args(tmp_path, peft_config="{r: 4")
    config = make_args(tmp_path, peft_config=LoraConfig(r=4, target_modules={"query", "value"}))
    assert config.peft_config["target_modules"] == ["query", "value"]
    json.dumps(config.to_dict())  # stored as plain data: provenance and logs can write it
