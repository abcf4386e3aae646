"""FusedSFTTrainer against stock TRL SFTTrainer on the tiny offline model."""

import math
import os
import traceback
from collections import defaultdict

import pytest
import testing_utils
import torch
from datasets import Dataset
from testing_utils import (
    CLI_LORA_DROPOUT,
    CPU_ARGS,
    assert_same_parameters,
    logged,
    needs_triton,
    one_block_per_row,
    tiny_lora_config,
    train_and_list_changed_parameters,
    uninterrupted_and_resumed,
)
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from hf_plugins import FusedSFTConfig, FusedSFTTrainer, sft_loss
from hf_plugins.testing import (
    TOOL_CHAT_TEMPLATE,
    save_tiny_model,
    tiny_conversational_dataset,
    tiny_prompt_completion_dataset,
    tiny_tool_calling_dataset,
)


def make_trainer(trainer_cls, config_cls, model_dir, tmp_path, dataset, **overrides):
    """5 steps, in a folder of `tmp_path` named after the trainer class (a stock and a fused run side by side)."""
    return testing_utils.make_trainer(
        trainer_cls, config_cls, model_dir, tmp_path / trainer_cls.__name__, dataset, **{"max_steps": 5, **overrides}
    )


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize("dataset_kind", ["conversational", "prompt_completion"])
def test_matches_stock_sft_trainer_step_by_step(tiny_model_dir, tmp_path, loss_type, dataset_kind):
    if dataset_kind == "conversational":
        dataset, extra = tiny_conversational_dataset(32), {"assistant_only_loss": True}
    else:
        dataset, extra = tiny_prompt_completion_dataset(32), {}
    # plain SGD keeps the parameter comparison meaningful: Adam turns float noise in near-zero gradients into
    # full-size steps of either sign
    extra.update(optim="sgd", learning_rate=0.5 if loss_type == "nll" else 50.0)
    stock = make_trainer(SFTTrainer, SFTConfig, tiny_model_dir, tmp_path, dataset, loss_type=loss_type, **extra)
    stock.train()
    fused = make_trainer(
        FusedSFTTrainer, FusedSFTConfig, tiny_model_dir, tmp_path, dataset, loss_type=loss_type, **extra
    )
    fused.train()
    stock_losses, fused_losses = logged(stock), logged(fused)
    assert len(fused_losses) == 5
    assert fused_losses == pytest.approx(stock_losses, abs=1e-5, rel=1e-5)
    # the losses move: the comparison is not between two constant sequences
    assert len({round(x, 6) for x in fused_losses}) > 1
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert logged(fused, key) == pytest.approx(logged(stock, key), abs=1e-4)
    assert_same_parameters(stock, fused)


def test_gradient_accumulation_4x1_equals_1x4(tiny_model_dir, tmp_path):
    dataset = tiny_conversational_dataset(32)
    one_by_four = make_trainer(
        FusedSFTTrainer,
        FusedSFTConfig,
        tiny_model_dir,
        tmp_path / "a",
        dataset,
        max_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        assistant_only_loss=True,
    )
    one_by_four.train()
    four_by_one = make_trainer(
        FusedSFTTrainer,
        FusedSFTConfig,
        tiny_model_dir,
        tmp_path / "b",
        dataset,
        max_steps=3,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        assistant_only_loss=True,
    )
    four_by_one.train()
    assert logged(four_by_one) == pytest.approx(logged(one_by_four), abs=1e-5)
    assert_same_parameters(one_by_four, four_by_one)


def test_never_applies_lm_head_to_all_positions(tiny_model_dir, tmp_path):
    dataset = tiny_conversational_dataset(16)
    trainer = make_trainer(
        FusedSFTTrainer,
        FusedSFTConfig,
        tiny_model_dir,
        tmp_path,
        dataset,
        eval_dataset=dataset,
        max_steps=2,
        assistant_only_loss=True,
    )
    calls = []
    trainer.model.lm_head.register_forward_hook(lambda module, args, output: calls.append(tuple(output.shape)))
    trainer.train()
    trainer.evaluate()
    assert calls == []
    # the hook does record calls: a plain forward goes through the lm_head
    batch = trainer.data_collator([trainer.train_dataset[0]])
    trainer.model(input_ids=batch["input_ids"].to(trainer.model.device))
    assert len(calls) == 1


def test_eval_loss_matches_stock_and_materialised_logits(tiny_model_dir, tmp_path):
    dataset = tiny_prompt_completion_dataset(16)
    stock = make_trainer(SFTTrainer, SFTConfig, tiny_model_dir, tmp_path, dataset, eval_dataset=dataset)
    fused = make_trainer(FusedSFTTrainer, FusedSFTConfig, tiny_model_dir, tmp_path, dataset, eval_dataset=dataset)
    stock_eval, fused_eval = stock.evaluate(), fused.evaluate()
    assert fused_eval["eval_loss"] == pytest.approx(stock_eval["eval_loss"], abs=1e-6)
    assert fused_eval["eval_mean_token_accuracy"] == pytest.approx(stock_eval["eval_mean_token_accuracy"])

    # completion-only: the loss is the NLL of the completion tokens alone, computed here from full logits
    tokenizer = fused.processing_class
    model = fused.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in dataset:
            prompt_ids = tokenizer(example["prompt"])["input_ids"]
            full_ids = tokenizer(example["prompt"] + example["completion"])["input_ids"] + [tokenizer.eos_token_id]
            labels = torch.tensor([-100] * len(prompt_ids) + full_ids[len(prompt_ids) :])
            logits = model(input_ids=torch.tensor([full_ids])).logits[0, :-1]
            total += sft_loss(logits, labels[1:], num_items_in_batch=1).item()
            count += int((labels[1:] != -100).sum())
    # eval batches are means per batch; compare the per-token mean over one batch of everything
    one_batch = make_trainer(
        FusedSFTTrainer,
        FusedSFTConfig,
        tiny_model_dir,
        tmp_path / "one",
        dataset,
        eval_dataset=dataset,
        per_device_eval_batch_size=16,
    )
    assert one_batch.evaluate()["eval_loss"] == pytest.approx(total / count, rel=1e-5)


def test_compute_metrics_and_preprocess_logits_see_the_models_logits_as_in_stock(tiny_model_dir, tmp_path):
    """Evaluation with `compute_metrics` needs the logits: Trainer's prediction step gets them from the model's own
    forward, as in stock SFTTrainer (the fused head computes only the loss), and `preprocess_logits_for_metrics`
    sees the same tensors."""
    dataset = tiny_prompt_completion_dataset(8)
    seen = defaultdict(list)

    def preprocess(logits, labels):
        seen["shapes"].append(tuple(logits.shape))
        return logits.argmax(-1)

    def accuracy(prediction):
        predicted, labels = prediction.predictions[:, :-1], prediction.label_ids[:, 1:]
        mask = labels != -100
        return {"next_token_accuracy": float((predicted == labels)[mask].mean()), "supervised": int(mask.sum())}

    results = {}
    for trainer_cls, config_cls in ((SFTTrainer, SFTConfig), (FusedSFTTrainer, FusedSFTConfig)):
        trainer = make_trainer(
            trainer_cls,
            config_cls,
            tiny_model_dir,
            tmp_path,
            dataset,
            eval_dataset=dataset,
            per_device_eval_batch_size=4,
            trainer_kwargs={"compute_metrics": accuracy, "preprocess_logits_for_metrics": preprocess},
        )
        results[trainer_cls.__name__] = trainer.evaluate()
    stock, fused = results["SFTTrainer"], results["FusedSFTTrainer"]
    assert fused["eval_supervised"] == stock["eval_supervised"] > 0
    assert fused["eval_next_token_accuracy"] == stock["eval_next_token_accuracy"]
    assert fused["eval_loss"] == pytest.approx(stock["eval_loss"], abs=1e-6)
    vocab = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.vocab_size
    assert seen["shapes"] and all(shape[-1] == vocab for shape in seen["shapes"])
    assert len(seen["shapes"]) == 2 * math.ceil(len(dataset) / 4)


def test_assistant_only_mask_ignores_prompt_tokens(tiny_model_dir, tmp_path):
    """Two datasets that differ only in a trailing user turn (prompt tokens after the last assistant turn): with
    assistant-only loss the training losses are identical; with loss on every token they differ."""
    base = tiny_conversational_dataset(16, multi_turn=False)
    variants = []
    for text in ("what is the capital of france ?", "one two three four five six seven"):
        variants.append(
            Dataset.from_dict({"messages": [m + [{"role": "user", "content": text}] for m in base["messages"]]})
        )

    def losses(dataset, assistant_only, tag):
        trainer = make_trainer(
            FusedSFTTrainer,
            FusedSFTConfig,
            tiny_model_dir,
            tmp_path / tag,
            dataset,
            max_steps=3,
            assistant_only_loss=assistant_only,
        )
        trainer.train()
        return logged(trainer)

    assert losses(variants[0], True, "a") == pytest.approx(losses(variants[1], True, "b"), abs=1e-7)
    assert losses(variants[0], False, "c") != pytest.approx(losses(variants[1], False, "d"), abs=1e-4)


def test_lora_trains_only_adapter_weights(tiny_model_dir, tmp_path):
    dataset = tiny_conversational_dataset(16)
    trainer = make_trainer(
        FusedSFTTrainer,
        FusedSFTConfig,
        tiny_model_dir,
        tmp_path,
        dataset,
        max_steps=3,
        learning_rate=5e-2,
        assistant_only_loss=True,
        peft_config=tiny_lora_config(target_modules=["q_proj", "v_proj", "up_proj"]),
    )
    changed = train_and_list_changed_parameters(trainer)
    assert changed, "no parameter changed"
    assert all("lora_" in name for name in changed), sorted(changed)
    assert any("lora_B" in name for name in changed)
    assert all(math.isfinite(x) for x in logged(trainer))


def test_peft_modules_to_save_lm_head_is_trained(tiny_model_dir, tmp_path):
    dataset = tiny_conversational_dataset(16)
    config = tiny_lora_config(modules_to_save=["lm_head"])
    trainer = make_trainer(
        FusedSFTTrainer,
        FusedSFTConfig,
        tiny_model_dir,
        tmp_path,
        dataset,
        max_steps=2,
        learning_rate=5e-2,
        assistant_only_loss=True,
        peft_config=config,
    )
    head = trainer.model.get_output_embeddings()
    trained_copy = head.modules_to_save["default"].weight
    before, original = trained_copy.detach().clone(), head.original_module.weight.detach().clone()
    trainer.train()
    assert not torch.equal(trained_copy, before)
    assert torch.equal(head.original_module.weight, original)


def test_lora_on_lm_head_is_refused(tiny_model_dir, tmp_path):
    config = tiny_lora_config(target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="lm_head"):
        make_trainer(
            FusedSFTTrainer,
            FusedSFTConfig,
            tiny_model_dir,
            tmp_path,
            tiny_conversational_dataset(8),
            peft_config=config,
        )


def test_gradient_checkpointing_gives_same_losses(tiny_model_dir, tmp_path):
    dataset = tiny_conversational_dataset(16)
    plain = make_trainer(FusedSFTTrainer, FusedSFTConfig, tiny_model_dir, tmp_path / "a", dataset, max_steps=3)
    plain.train()
    checkpointed = make_trainer(
        FusedSFTTrainer,
        FusedSFTConfig,
        tiny_model_dir,
        tmp_path / "b",
        dataset,
        max_steps=3,
        gradient_checkpointing=True,
    )
    checkpointed.train()
    assert logged(checkpointed) == pytest.approx(logged(plain), abs=1e-6)


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize(
    "batching",
    [
        dict(packing=True, max_length=128),
        dict(packing=True, packing_strategy="wrapped", max_length=64),
        dict(padding_free=True, max_length=None),
    ],
    ids=["bfd", "wrapped", "padding_free"],
)
def test_packing_matches_stock(tiny_model_dir, tmp_path, loss_type, batching):
    dataset = tiny_conversational_dataset(32)
    settings = dict(
        max_steps=3,
        per_device_train_batch_size=4,
        loss_type=loss_type,
        optim="sgd",
        learning_rate=0.5 if loss_type == "nll" else 50.0,
        **batching,
    )
    stock = make_trainer(SFTTrainer, SFTConfig, tiny_model_dir, tmp_path, dataset, **settings)
    stock.train()
    fused = make_trainer(FusedSFTTrainer, FusedSFTConfig, tiny_model_dir, tmp_path, dataset, **settings)
    fused.train()
    assert fused.train_dataset["input_ids"] == stock.train_dataset["input_ids"]
    assert logged(fused) == pytest.approx(logged(stock), rel=1e-5)
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert logged(fused, key) == pytest.approx(logged(stock, key), abs=1e-4), key
    assert_same_parameters(stock, fused)


def test_chunked_and_reference_backends_agree(tiny_model_dir, tmp_path):
    dataset = tiny_conversational_dataset(16)
    runs = []
    for backend, chunk in (("chunked", 7), ("reference", None)):
        trainer = make_trainer(
            FusedSFTTrainer,
            FusedSFTConfig,
            tiny_model_dir,
            tmp_path / backend,
            dataset,
            max_steps=3,
            loss_backend=backend,
            loss_chunk_size=chunk,
        )
        trainer.train()
        runs.append(logged(trainer))
    assert runs[0] == pytest.approx(runs[1], abs=1e-6)


@pytest.mark.parametrize("lora_dropout", [None, CLI_LORA_DROPOUT], ids=["full", "lora-dropout"])
def test_resume_from_checkpoint_continues_identically(tiny_model_dir, tmp_path, lora_dropout):
    dataset = tiny_conversational_dataset(32)

    def make(output_dir, **overrides):
        # the same 4-step run (same learning-rate schedule) every time; the interrupted one saves after step 2
        peft_config = None if lora_dropout is None else tiny_lora_config(lora_dropout)
        return make_trainer(
            FusedSFTTrainer,
            FusedSFTConfig,
            tiny_model_dir,
            output_dir,
            dataset,
            peft_config=peft_config,
            max_steps=4,
            **overrides,
        )

    full, resumed, _ = uninterrupted_and_resumed(make, tmp_path)
    assert len(logged(resumed)) == 4
    assert logged(resumed)[2:] == pytest.approx(logged(full)[2:], abs=1e-6)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"loss_backend": "fast"}, "loss_backend"),
        ({"loss_chunk_size": 0}, "loss_chunk_size"),
        ({"loss_chunk_size": -3}, "loss_chunk_size"),
        ({"loss_type": "focal"}, "loss_type"),
    ],
)
def test_bad_config_values_raise(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        FusedSFTConfig(output_dir=str(tmp_path), **{**CPU_ARGS, **overrides})


def test_compute_loss_func_is_refused(tiny_model_dir, tmp_path):
    dataset = tiny_conversational_dataset(8)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="compute_loss_func"):
        FusedSFTTrainer(
            model=model,
            args=FusedSFTConfig(output_dir=str(tmp_path), **CPU_ARGS),
            train_dataset=dataset,
            processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss,
        )


@pytest.mark.parametrize("variant", ["qwen2", "tied_embeddings"])
def test_matches_stock_on_other_architectures(tmp_path, variant):
    if variant == "qwen2":
        model_dir = save_tiny_model(tmp_path / "model", arch="qwen2", dtype=torch.float64)
    else:
        model_dir = save_tiny_model(tmp_path / "model", arch="llama", tie_word_embeddings=True, dtype=torch.float64)
    dataset = tiny_conversational_dataset(16)
    stock = make_trainer(SFTTrainer, SFTConfig, model_dir, tmp_path, dataset, max_steps=3, assistant_only_loss=True)
    stock.train()
    fused = make_trainer(
        FusedSFTTrainer, FusedSFTConfig, model_dir, tmp_path, dataset, max_steps=3, assistant_only_loss=True
    )
    fused.train()
    assert logged(fused) == pytest.approx(logged(stock), abs=1e-5)
    if variant == "tied_embeddings":
        assert fused.model.lm_head.weight is fused.model.model.embed_tokens.weight


def test_plain_sft_config_is_converted_with_its_values(tiny_model_dir, tmp_path):
    trainer = testing_utils.make_trainer(
        FusedSFTTrainer,
        SFTConfig,
        tiny_model_dir,
        tmp_path,
        tiny_conversational_dataset(4),
        hub_token="secret-token",
        max_steps=7,
    )
    assert isinstance(trainer.args, FusedSFTConfig)
    assert trainer.args.max_steps == 7 and trainer.args.hub_token == "secret-token"
    assert trainer.args.loss_backend == "auto"
    with pytest.raises(ValueError, match="positional order"):
        FusedSFTTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_dir), object())


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "liger"])
@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_gpu_backends_train_like_chunked(tiny_model_dir, tmp_path, monkeypatch, backend, loss_type):
    """The triton and liger backends inside the trainer (on CPU under Triton's interpreter): same losses and metrics
    as the chunked backend, step by step."""
    pytest.importorskip("liger_kernel") if backend == "liger" else None
    one_block_per_row(monkeypatch)
    dataset = tiny_conversational_dataset(8)
    runs = {}
    for name in ("chunked", backend):
        trainer = make_trainer(
            FusedSFTTrainer,
            FusedSFTConfig,
            tiny_model_dir,
            tmp_path / name,
            dataset,
            max_steps=2,
            per_device_train_batch_size=2,
            loss_backend=name,
            loss_type=loss_type,
        )
        trainer.train()
        runs[name] = trainer
    assert logged(runs[backend]) == pytest.approx(logged(runs["chunked"]), rel=1e-4)
    for key in ("mean_token_accuracy",) + (("entropy",) if backend == "triton" else ()):
        assert logged(runs[backend], key) == pytest.approx(logged(runs["chunked"], key), rel=1e-4, abs=1e-6)


def test_gpu_backends_are_refused_before_training_without_a_gpu(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only refusal")
    for backend in ("triton", "liger"):
        with pytest.raises(ValueError, match=f"`loss_backend='{backend}'` needs a CUDA device.*'auto'"):
            make_trainer(
                FusedSFTTrainer,
                FusedSFTConfig,
                tiny_model_dir,
                tmp_path,
                tiny_conversational_dataset(4),
                loss_backend=backend,
            )


@needs_triton
def test_liger_backend_refuses_methods_it_does_not_cover(tiny_model_dir, tmp_path):
    pytest.importorskip("liger_kernel")
    from hf_plugins import OTRConfig, OTRTrainer

    with pytest.raises(ValueError, match="`loss_backend='liger'` covers the losses sft, dft, weighted; OTRTrainer"):
        make_trainer(
            OTRTrainer, OTRConfig, tiny_model_dir, tmp_path, tiny_conversational_dataset(4), loss_backend="liger"
        )


class HostReads(TorchDispatchMode):
    """Records each place that reads a tensor's value on the host, i.e. waits for the GPU there: `.item()`, `float()`,
    `int()` and `bool()` of a tensor (`_local_scalar_dense`), `.tolist()`, `nonzero` and boolean-mask indexing (whose
    result size is a host value). Each read is named by the innermost `hf_plugins` frame that made it."""

    SYNCING_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def record(self):
        frames = [f for f in traceback.extract_stack() if f"{os.sep}hf_plugins{os.sep}" in f.filename]
        if frames:
            where = frames[-1]
            self.reads.append(f"{where.filename.split(os.sep + 'hf_plugins' + os.sep)[-1]}:{where.name}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        boolean_index = func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
        )
        if func in self.SYNCING_OPS or boolean_index:
            self.record()
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        mode = self

        def tolist(tensor):
            mode.record()
            return mode._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def _method_trainer(kind, model_dir, tmp_path):
    from hf_plugins import PoFTConfig, PoFTTrainer, TLConfig, TLTrainer

    if kind == "sft":
        return make_trainer(FusedSFTTrainer, FusedSFTConfig, model_dir, tmp_path, tiny_conversational_dataset(8))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if kind == "tl":
        tokenizer.chat_template = TOOL_CHAT_TEMPLATE
        trainer_cls, config_cls, dataset = TLTrainer, TLConfig, tiny_tool_calling_dataset(8)
    else:
        scores = [-2.0 - 0.1 * i for i in range(8)]
        trainer_cls, config_cls = PoFTTrainer, PoFTConfig
        dataset = tiny_conversational_dataset(8).add_column("ref_score", scores)
    args = config_cls(output_dir=str(tmp_path / kind), **CPU_ARGS, max_steps=1, per_device_train_batch_size=4)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize("kind", ["sft", "tl", "poft"])
def test_a_training_step_reads_no_value_on_the_host_for_its_hooks_and_metrics(tiny_model_dir, tmp_path, kind):
    """Within a training step the trainers' own code (the hooks, the metric reduction) never waits for the device:
    the step's metrics stay device values until `log`, which reads them back as floats."""
    trainer = _method_trainer(kind, tiny_model_dir, tmp_path)
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with HostReads() as mode:
        num_items = trainer._get_num_items_in_batch([batch], trainer.args.device)
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_items)
        loss.backward()
    assert [read for read in mode.reads if read.startswith("trainers")] == []
    assert any(read.startswith("ops") for read in mode.reads)  # the counter sees the head's own reads
    trainer.log({})
    logs = trainer.state.log_history[-1]
    names = {"sft": [], "tl": ["token_weight"], "poft": ["reward_margin", "poft_weight", "policy_score", "nll"]}[kind]
    for name in ["entropy", "mean_token_accuracy", "num_tokens", *names]:
        assert isinstance(logs[name], (float, int)) and math.isfinite(logs[name]), name


def test_device_metrics_are_read_back_as_trl_would_average_them():
    """`read_on_host` gives TRL's lists of floats: a token mean of a step without tokens is 0.0 (as TRL logs it), a
    mean over sequences of a step without sequences is left out, and a metric left without values disappears."""
    from hf_plugins.trainers.metric_logging import StepMean, read_on_host

    def mean(total, count, empty=0.0):
        return StepMean(torch.tensor(float(total)), torch.tensor(float(count)), empty)

    metrics = defaultdict(list)
    metrics["entropy"] += [mean(3.0, 2.0), mean(0.0, 0.0)]
    metrics["reward_margin"] += [mean(1.0, 4.0, None), mean(0.0, 0.0, None), mean(-3.0, 3.0, None)]
    metrics["policy_score"] += [mean(0.0, 0.0, None)]
    metrics["num_tokens"] = [torch.tensor(12345678901)]
    metrics["uds/selected_fraction"] = [0.25]
    read_on_host(metrics)
    assert metrics == {
        "entropy": [1.5, 0.0],
        "reward_margin": [0.25, -1.0],
        "num_tokens": [12345678901],
        "uds/selected_fraction": [0.25],
    }
    assert type(metrics["num_tokens"][0]) is int
