"""The collator that keeps a method's extra columns, alone and through a trainer, and packing with those columns."""

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from testing_utils import assert_same_parameters, logged, make_trainer
from transformers import AutoTokenizer
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from hf_plugins import FusedSFTConfig, FusedSFTTrainer
from hf_plugins.data import DataCollatorWithExtraColumns
from hf_plugins.data.packing import batch_sequences, pack_with_columns, sequence_values


EXAMPLES = [
    {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "token_weights": [0.0, 1.0, 2.0], "score": 0.5, "idx": 3},
    {"input_ids": [8, 9], "labels": [-100, 9], "token_weights": [0.0, 3.0], "score": -1.0, "idx": 7},
]


def test_pads_token_columns_like_input_ids_and_stacks_example_columns():
    collator = DataCollatorWithExtraColumns(
        DataCollatorForLanguageModeling(pad_token_id=0),
        token_columns={"token_weights": 0.0},
        example_columns=("score", "idx"),
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

    def loss_method_inputs(self, model, inputs, extra_columns):
        return {"token_inputs": {"token_weights": extra_columns["token_weights"]}}


def _tokenized_dataset(tokenizer, weight_fn):
    rows = {"input_ids": [], "labels": [], "token_weights": []}
    for i in range(16):
        ids = tokenizer(f"the answer to {i} plus {i} is {2 * i} .")["input_ids"]
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] * 3 + ids[3:])
        rows["token_weights"].append([weight_fn(t) for t in range(len(ids))])
    return Dataset.from_dict(rows)


def _train(model_dir, tmp_path, trainer_cls, dataset):
    trainer = make_trainer(
        trainer_cls,
        FusedSFTConfig,
        model_dir,
        tmp_path,
        dataset,
        per_device_train_batch_size=4,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer.train()
    return logged(trainer)


def test_extra_column_reaches_the_loss_through_the_trainer(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ones = _tokenized_dataset(tokenizer, lambda t: 1.0)
    plain = _train(tiny_model_dir, tmp_path / "plain", FusedSFTTrainer, ones.remove_columns("token_weights"))
    weighted_ones = _train(tiny_model_dir, tmp_path / "ones", TokenWeightedTrainer, ones)
    assert weighted_ones == pytest.approx(plain, abs=1e-6)
    doubled = _train(
        tiny_model_dir, tmp_path / "twos", TokenWeightedTrainer, _tokenized_dataset(tokenizer, lambda t: 2.0)
    )
    assert doubled[0] == pytest.approx(2 * plain[0], rel=1e-5)


def test_token_columns_pack_with_their_tokens_through_the_trainer(tiny_model_dir, tmp_path):
    """Packed (`bfd`, several examples a row), the token-weighted trainer trains as it does on padded rows: one
    full batch a step, so both runs see the same tokens with the same weights."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    dataset = _tokenized_dataset(tokenizer, lambda t: 1.0 + (t % 3) / 2)
    runs = []
    for packing in (False, True):
        trainer = make_trainer(
            TokenWeightedTrainer,
            FusedSFTConfig,
            tiny_model_dir,
            tmp_path / str(packing),
            dataset,
            tokenizer=tokenizer,
            per_device_train_batch_size=16,
            optim="sgd",
            learning_rate=0.5,
            packing=packing,
            max_length=48,
        )
        trainer.train()
        runs.append(trainer)
    packed = runs[1].train_dataset
    assert len(packed) < 16 and max(len(lengths) for lengths in packed["seq_lengths"]) > 1
    assert logged(runs[1]) == pytest.approx(logged(runs[0]), rel=1e-5)
    assert_same_parameters(runs[0], runs[1])


# ------------------------------------------------------------------------------------- packing with extra columns


def test_padding_free_spreads_example_columns_over_their_tokens():
    collator = DataCollatorWithExtraColumns(
        DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True),
        token_columns={"token_weights": 0.0},
        example_columns=("score", "idx"),
        padding_free=True,
    )
    batch = collator([dict(e) for e in EXAMPLES])
    assert batch["score"].dtype == torch.float32 and batch["score"].tolist() == [[0.5, 0.5, 0.5, -1.0, -1.0]]
    assert batch["idx"].dtype == torch.int64 and batch["idx"].tolist() == [[3, 3, 3, 7, 7]]
    # one value per sequence again, in the order the position ids give the sequences
    assert sequence_values(batch["score"], batch, "score").tolist() == [0.5, -1.0]
    assert sequence_values(batch["idx"], batch, "idx").tolist() == [3, 7]


def _packed_examples():
    """Two packed rows (as `pack_dataset` with `bfd` leaves them): sequences of 3 + 2 and of 2 tokens."""
    return [
        {
            "input_ids": [5, 6, 7, 8, 9],
            "labels": [-100, 6, 7, -100, 9],
            "token_weights": [0.0, 1.0, 2.0, 0.0, 3.0],
            "score": [0.5, 0.5, 0.5, -1.0, -1.0],
            "seq_lengths": [3, 2],
        },
        {
            "input_ids": [4, 3],
            "labels": [-100, 3],
            "token_weights": [0.0, 4.0],
            "score": [2.0, 2.0],
            "seq_lengths": [2],
        },
    ]


def test_packed_rows_keep_their_per_token_example_values():
    columns = dict(token_columns={"token_weights": 0.0}, example_columns=("score",))
    padded = DataCollatorWithExtraColumns(DataCollatorForLanguageModeling(pad_token_id=0), **columns)
    batch = padded(_packed_examples())
    assert batch["score"].tolist() == [[0.5, 0.5, 0.5, -1.0, -1.0], [2.0, 2.0, 0.0, 0.0, 0.0]]
    flat = DataCollatorWithExtraColumns(
        DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=4),
        padding_free=True,
        **columns,
    )
    batch = flat(_packed_examples())
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0]]  # padded to 8: one padding position
    assert batch["token_weights"].tolist() == [[0.0, 1.0, 2.0, 0.0, 3.0, 0.0, 4.0, 0.0]]
    assert batch["score"].tolist() == [[0.5, 0.5, 0.5, -1.0, -1.0, 2.0, 2.0, 0.0]]
    # the sequences the loss head sees (after the next-token shift), the padding position one of its own
    ids, count = batch_sequences(batch)
    assert count == 4 and ids.tolist() == [[0, 0, 1, 1, 2, 2, 3]]
    assert sequence_values(batch["score"], batch, "score").tolist() == [0.5, -1.0, 2.0, 0.0]


def test_a_sequence_with_two_values_raises():
    examples = _packed_examples()
    examples[0]["score"] = [0.5, 0.5, 0.5, -1.0, 7.0]
    collator = DataCollatorWithExtraColumns(
        DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True),
        example_columns=("score",),
        padding_free=True,
    )
    batch = collator(examples)
    with pytest.raises(ValueError, match="`score` holds several values within one packed sequence"):
        sequence_values(batch["score"], batch, "score")


def _packing_args(strategy, max_length=8):
    return SimpleNamespace(
        max_length=max_length, packing_strategy=strategy, shuffle_dataset=False, seed=0, dataset_num_proc=None
    )


def _source_rows():
    """Rows of 1 to 11 tokens; each token's weight is a function of its id, each row's score its index."""
    rows = {"input_ids": [], "labels": [], "token_weights": [], "score": []}
    for i, length in enumerate((5, 11, 3, 7, 1, 4, 6, 2)):
        ids = [(7 * i + 3 * t) % 50 + 4 for t in range(length)]
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] + ids[1:])
        rows["token_weights"].append([weight_of(token) for token in ids])
        rows["score"].append(float(i))
    return Dataset.from_dict(rows)


def weight_of(token):
    return 1.0 + (token % 5) / 4


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "wrapped"])
def test_packing_moves_the_columns_with_their_tokens(strategy):
    source = _source_rows()
    packed = pack_with_columns(source, _packing_args(strategy), ["token_weights"], ["score"], "train")
    # the tokens are packed exactly as TRL packs them alone
    stock = pack_dataset(source.select_columns(["input_ids", "labels"]), 8, strategy)
    assert packed["input_ids"] == stock["input_ids"] and packed["labels"] == stock["labels"]
    if strategy != "wrapped":
        assert packed["seq_lengths"] == stock["seq_lengths"]
    for row in packed:
        assert len(row["token_weights"]) == len(row["score"]) == len(row["input_ids"]) <= 8
        assert row["token_weights"] == [weight_of(token) for token in row["input_ids"]]
    if strategy == "wrapped":  # a plain cut every 8 tokens: the scores are the source's, spread, in order
        spread = [float(i) for i, ids in enumerate(source["input_ids"]) for _ in ids]
        assert sum(packed["score"], []) == spread
        return
    # whole sequences (bfd: the first 8 tokens; bfd_split: pieces of 8), each carrying its own example's score
    pieces = 0
    for row in packed:
        start = 0
        for length in row["seq_lengths"]:
            scores = set(row["score"][start : start + length])
            assert len(scores) == 1
            source_ids = source["input_ids"][int(scores.pop())]
            pieces_of_8 = [source_ids[k : k + 8] for k in range(0, len(source_ids), 8)]
            assert row["input_ids"][start : start + length] in pieces_of_8
            start += length
            pieces += 1
    assert pieces == (9 if strategy == "bfd_split" else 8)  # the row of 11 tokens is cut in two, or truncated


def test_packing_needs_max_length_and_one_number_per_example():
    with pytest.raises(ValueError, match="`max_length` can't be `None`"):
        pack_with_columns(_source_rows(), _packing_args("bfd", None), ["token_weights"], ["score"], "train")
    listed = _source_rows().map(lambda row: {"score": [row["score"]]})
    with pytest.raises(ValueError, match="Column `score` must hold one number per example"):
        pack_with_columns(listed, _packing_args("bfd"), [], ["score"], "train")
