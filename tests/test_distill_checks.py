"""hf_kd.distill.checks: start-up refusals, before Trainer creates anything."""

import pytest
import torch

from conftest import ListDataset, build_tokenizer, make_bert, random_batch, rows_from_batch
from hf_kd import DistillationConfig, InputError
from hf_kd.distill.checks import check_arguments, check_dataset, check_placement, check_tokenizers, start


def _args(tmp_path, **kw):
    return DistillationConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)


def test_the_trainer_needs_a_config_a_student_and_one_teacher_source(tmp_path):
    with pytest.raises(TypeError, match="DistillationConfig"):
        check_arguments(make_bert(), make_bert(), object(), {})
    with pytest.raises(ValueError, match="either teacher_model or args.teacher_cache"):
        check_arguments(make_bert(), None, _args(tmp_path), {})
    with pytest.raises(ValueError, match="model_init"):
        check_arguments(make_bert(), make_bert(), _args(tmp_path), {"model_init": make_bert})


def test_data_problems_are_listed_together():
    student = make_bert(num_labels=2)
    batch = random_batch("sequence_classification", batch=3, length=5)
    rows = rows_from_batch(batch)
    rows[0]["labels"] = torch.tensor(7)
    rows[1]["input_ids"] = torch.arange(80) % 60 + 5  # longer than max_position_embeddings=64
    with pytest.raises(InputError) as err:
        check_dataset(ListDataset(rows), student, make_bert(), "sequence_classification")
    assert "labels [7] outside 0..1" in str(err.value) and "sequences of 80 tokens" in str(err.value)
    with pytest.raises(InputError, match="empty"):
        check_dataset(ListDataset([]), student, None, "sequence_classification")
    check_dataset(ListDataset(rows_from_batch(batch)), student, None, "sequence_classification")  # fine


def test_weights_on_the_meta_device_are_refused():
    with torch.device("meta"):
        ghost = make_bert()
    with pytest.raises(InputError, match="teacher's weights are on the 'meta' device"):
        check_placement(make_bert(), ghost)


def test_tokenizers_that_number_tokens_otherwise_are_refused():
    a, b = build_tokenizer(), build_tokenizer()
    check_tokenizers(a, b)
    b.add_tokens(["zzz"])
    with pytest.raises(InputError, match="1 tokens are in one vocabulary only"):
        check_tokenizers(a, b)


def test_start_gives_the_first_teachers_plan(tmp_path):
    first, second = make_bert(layers=4, seed=1), make_bert(layers=4, seed=2)
    teachers, plan = start(make_bert(layers=2), [first, second], _args(tmp_path), "sequence_classification",
                           None, None, None)
    assert teachers.first is first and len(teachers.models) == 2 and plan.hidden_pairs == []
