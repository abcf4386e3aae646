"""The collator that keeps a method's extra columns, alone and through a trainer."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from hf_plugins import FusedSFTConfig, FusedSFTTrainer
from hf_plugins.data import DataCollatorWithExtraColumns
from hf_plugins.testing import CPU_TRAINING_ARGS

EXAMPLES = [
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "token_weights": [0.0, 1.0, 2.0], "score": 0.5, "idx": 3},
    {"input_ids": [8, 9], "labels": [-100, 9], "token_weights": [0.0, 3.0], "score": -1.0, "idx": 7},
]


def test_pads_token_columns_like_input_ids_and_stacks_example_columns():
    collator = DataCollatorWithExtraColumns(
        DataCollatorForLanguageModeling(pad_token_id=0), token_columns={"token_weights": 0.0}, example_columns=("score", "idx")
    )
    batch = collator([dict(e) for e in EXAMPLES])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["token_weights"].tolist() == [[0.0, 1.0, 2.0], [0.0, 3.0, 0.0]]
    assert batch["score"].dtype == torch.float32 and batch["score"].tolist() == [0.5, -1.0]
    assert batch["idx"].dtype == torch.int64 and batch["idx"].tolist() == [3, 7]


def test_padding_free_flattens_token_columns():
    collator = DataCollatorWithExtraColumns(
        DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True),
        token_columns={"token_weights": 0.0},
        padding_free=True,
    )
    batch = collator([dict(e) for e in EXAMPLES])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["token_weights"].tolist() == [[0.0, 1.0, 2.0, 0.0, 3.0]]


def test_missing_or_misaligned_columns_raise():
    collator = DataCollatorWithExtraColumns(DataCollatorForLanguageModeling(pad_token_id=0), token_columns={"w": 0.0})
    with pytest.raises(ValueError, match="`w`"):
        collator([dict(e) for e in EXAMPLES])
    bad = [{**EXAMPLES[0], "w": [1.0, 1.0]}]
    with pytest.raises(ValueError, match="one entry per token"):
        collator(bad)


class TokenWeightedTrainer(FusedSFTTrainer):
    """A minimal method trainer: the fused 'weighted' head fed from a per-token dataset column."""

    token_columns = {"token_weights": 0.0}

    def loss_method(self):
        return "weighted"

    def loss_method_inputs(self, model, inputs):
        return {"token_inputs": {"token_weights": self._extra_batch["token_weights"]}}


def _tokenized_dataset(tokenizer, weight_fn):
    rows = {"input_ids": [], "labels": [], "token_weights": []}
    for i in range(16):
        ids = tokenizer(f"the answer to {i} plus {i} is {2 * i} .")["input_ids"]
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] * 3 + ids[3:])
        rows["token_weights"].append([weight_fn(t) for t in range(len(ids))])
    return Dataset.from_dict(rows)


def _train(model_dir, tmp_path, trainer_cls, dataset):
    args = FusedSFTConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3,
        dataset_kwargs={"skip_prepare_dataset": True}, **CPU_TRAINING_ARGS,
    )
    trainer = trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_extra_column_reaches_the_loss_through_the_trainer(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ones = _tokenized_dataset(tokenizer, lambda t: 1.0)
    plain = _train(tiny_model_dir, tmp_path / "plain", FusedSFTTrainer, ones.remove_columns("token_weights"))
    weighted_ones = _train(tiny_model_dir, tmp_path / "ones", TokenWeightedTrainer, ones)
    assert weighted_ones == pytest.approx(plain, abs=1e-6)
    doubled = _train(tiny_model_dir, tmp_path / "twos", TokenWeightedTrainer, _tokenized_dataset(tokenizer, lambda t: 2.0))
    assert doubled[0] == pytest.approx(2 * plain[0], rel=1e-5)


def test_extra_columns_refuse_packing(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="packing"):
        TokenWeightedTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            args=FusedSFTConfig(output_dir=str(tmp_path), packing=True, bf16=False, use_cpu=True, report_to="none"),
            train_dataset=_tokenized_dataset(tokenizer, lambda t: 1.0),
            processing_class=tokenizer,
        )

