"""FusedGRPOTrainer against stock TRL GRPOTrainer on the tiny offline model (float64), on replayed completions.

Both trainers get their completions from the same `rollout_func` (`ReplayedCompletions`: a fixed bank replayed by
prompt), so they train on identical data; seeded sampling would not do (a 1e-7 change in a parameter can flip a
sampled token). Per optimizer step the loss, every metric TRL logs and every parameter must agree to 1e-5 (TRL's head
computes its log-probs in float32; ours in float64), over a matrix that covers every loss type at the token and the
sequence level, beta 0 and > 0 with and without the bias-corrected KL, off-policy training (old log-probs forced by
`gradient_accumulation_steps=2, steps_per_generation=4`, and `num_iterations=2`), temperature, delta and
epsilon_high, the entropy bonus (fixed and adaptive), `mask_truncated_completions`, the off-policy mask (against
old and sampler log-probs), LoRA with beta > 0, an MoE model's router loss, evaluation, and the reference and triton
backends. Each cell combines several settings, so that the matrix costs one short run per cell. Then: 2-process DDP
equals 1 process, a resumed run equals the uninterrupted one, the head builds no `[N, V]` tensor and never calls
the lm_head module, a frozen lm_head skips its weight-gradient matmul, and what cannot be matched is refused.
"""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testing_utils import GRPO_ARGS, GRPO_MAX_COMPLETION, LargestTensor, tiny_lora_config, train_and_resume
from testing_utils import logged as logged_values
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from hf_plugins import FusedGRPOConfig, FusedGRPOTrainer
from hf_plugins.testing import (
    ReplayedCompletions,
    replayed_completion_reward,
    save_tiny_model,
    tiny_prompt_completion_dataset,
)


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # `rollout_func` is experimental in TRL 1.16

MAX_COMPLETION, ARGS = GRPO_MAX_COMPLETION, GRPO_ARGS
#: Wall-clock values (`step_time`, `train_runtime`, `eval_samples_per_second`, ...), not results
TIMINGS = ("step_time", "runtime", "_per_second")
ATOL = RTOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def frozen_heap():
    """`Trainer.train()` starts with a full `gc.collect()` (accelerate's `free_memory`), about a second over the
    objects that importing transformers and TRL leaves: moved out of the collector's reach for this module's many
    short runs, and given back after."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def prompts(n=16, seed=0):
    return tiny_prompt_completion_dataset(n, seed=seed).select_columns(["prompt"])


class ParameterRecorder(TrainerCallback):
    """Every parameter after every optimizer step."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append({name: p.detach().clone() for name, p in model.named_parameters()})


def make_trainer(
    trainer_cls, model_dir, output_dir, *, peft_config=None, logprobs=False, evaluate=False, fused=None, **overrides
):
    """A stock or fused trainer on `model_dir` with replayed completions; `fused` holds the FusedGRPOConfig-only
    options (ignored for the stock trainer)."""
    config_cls = FusedGRPOConfig if trainer_cls is FusedGRPOTrainer else GRPOConfig
    settings = {**ARGS, "output_dir": str(output_dir), **overrides}
    if config_cls is FusedGRPOConfig:
        settings.update(fused or {})
    if evaluate:
        settings.update(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)  # the same LoRA initialisation in both trainers of a comparison
    trainer = trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        reward_funcs=replayed_completion_reward,
        args=config_cls(**settings),
        train_dataset=prompts(),
        eval_dataset=prompts(8, seed=1) if evaluate else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        rollout_func=ReplayedCompletions(tokenizer, MAX_COMPLETION, logprobs=logprobs),
    )
    recorder = ParameterRecorder()
    trainer.add_callback(recorder)
    trainer.parameter_steps = recorder.steps
    return trainer


def step_logs(trainer):
    return [entry for entry in trainer.state.log_history if "train_runtime" not in entry]


def assert_logs_equal(got: list, expected: list):
    assert len(got) == len(expected) > 0
    for step, (entry, reference) in enumerate(zip(got, expected, strict=True)):
        assert set(entry) == set(reference), (step, sorted(set(entry) ^ set(reference)))
        for key, value in reference.items():
            if key.endswith(TIMINGS):
                continue
            if value is None or entry[key] is None:
                assert entry[key] is value, (step, key)
            else:
                assert entry[key] == pytest.approx(value, abs=ATOL, rel=RTOL), (step, key)


def assert_parameters_equal(got: list, expected: list):
    assert len(got) == len(expected) > 0
    for step, (params, reference) in enumerate(zip(got, expected, strict=True)):
        assert params.keys() == reference.keys()
        for name, value in reference.items():
            torch.testing.assert_close(params[name], value, atol=ATOL, rtol=RTOL, msg=f"step {step}: {name}")


def train_both(model_dir, tmp_path, **cell):
    stock = make_trainer(GRPOTrainer, model_dir, tmp_path / "stock", **cell)
    stock.train()
    fused = make_trainer(FusedGRPOTrainer, model_dir, tmp_path / "fused", **cell)
    fused.train()
    return stock, fused


GA = {"gradient_accumulation_steps": 2, "steps_per_generation": 4}  # 2 % 4 != 0: TRL computes old log-probs
ITERS = {"num_iterations": 2}  # the second pass over a generation is off-policy
KL = {"beta": 0.04}  # use_bias_correction_kl=True is TRL's default
KL_PLAIN = {"beta": 0.04, "use_bias_correction_kl": False}
SEQ = {"importance_sampling_level": "sequence"}
MATRIX = {
    "dapo-token-kl-ga-temperature-epsilon_high-entropy-eval": dict(
        loss_type="dapo", **KL, **GA, temperature=0.7, epsilon_high=0.28, entropy_coef=0.01, evaluate=True
    ),
    "dapo-sequence-iterations-delta-chunk5": dict(
        loss_type="dapo", **SEQ, **ITERS, delta=1.5, fused={"loss_chunk_size": 5}
    ),
    "dapo-token-off_policy_mask-old": dict(loss_type="dapo", **ITERS, off_policy_mask_threshold=0.0),
    "grpo-token-klplain-iterations-truncated": dict(
        loss_type="grpo", **KL_PLAIN, **ITERS, mask_truncated_completions=True
    ),
    "gspo-kl-ga-adaptive_entropy": dict(
        loss_type="grpo", **SEQ, **KL, **GA, use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=6.0
    ),
    "bnpo-token-ga-delta-epsilon_high": dict(loss_type="bnpo", **GA, delta=1.5, epsilon_high=0.28),
    "bnpo-sequence-kl-on_policy_accumulation": dict(
        loss_type="bnpo", **SEQ, **KL, gradient_accumulation_steps=2, steps_per_generation=2
    ),
    "dr_grpo-token-kl-iterations-temperature": dict(loss_type="dr_grpo", **KL, **ITERS, temperature=0.7),
    "dr_grpo-sequence-klplain-reference_backend": dict(
        loss_type="dr_grpo", **SEQ, **KL_PLAIN, fused={"loss_backend": "reference"}
    ),
    "cispo-token-ga-cap5": dict(loss_type="cispo", **GA, epsilon_high=5.0),
    "cispo-sequence-kl-iterations-default_cap": dict(loss_type="cispo", **SEQ, **KL, **ITERS),
    "sapo-token-kl-ga": dict(loss_type="sapo", **KL, **GA),
    "sapo-sequence-iterations-temperature": dict(loss_type="sapo", **SEQ, **ITERS, temperature=0.7),
    "luspo-sequence-kl-ga": dict(loss_type="luspo", **SEQ, **KL, **GA),
    "luspo-token-entropy-fp32_head": dict(loss_type="luspo", entropy_coef=0.01, cast_lm_head_to_fp32=True),
    "vespo-token-kl-ga-off_policy_mask-sampler": dict(
        loss_type="vespo", **KL, **GA, off_policy_mask_threshold=5.0, logprobs=True
    ),
    "vespo-sequence-iterations-triton": dict(loss_type="vespo", **SEQ, **ITERS, fused={"loss_backend": "triton"}),
}


@pytest.fixture
def one_vocabulary_block(monkeypatch):
    """The triton cell under the interpreter: one vocabulary block per row (the kernel's blocks are tested with
    small blocks in tests/test_grpo_loss.py), which keeps the interpreted kernel to seconds."""
    from hf_plugins.ops.triton import head

    if not torch.cuda.is_available():
        monkeypatch.setattr(head, "DEFAULT_BLOCK_V", 512)


@pytest.mark.parametrize("cell", MATRIX.values(), ids=MATRIX.keys())
def test_matches_stock_grpo_trainer_step_by_step(tiny_model_dir, tmp_path, cell, one_vocabulary_block):
    stock, fused = train_both(tiny_model_dir, tmp_path, **cell)
    assert_logs_equal(step_logs(fused), step_logs(stock))
    assert_parameters_equal(fused.parameter_steps, stock.parameter_steps)
    losses = logged_values(fused)
    assert len(losses) == fused.args.max_steps and len(set(losses)) > 1  # the comparison is not of constants


def test_the_matrix_leaves_the_clip_range(tiny_model_dir, tmp_path):
    """The off-policy cells are off-policy: by the second step the ratios leave the clip range on both sides; the
    bank has truncated completions (for `mask_truncated_completions`)."""
    fused = make_trainer(FusedGRPOTrainer, tiny_model_dir, tmp_path, loss_type="grpo", **KL, **ITERS)
    fused.train()
    first, second = step_logs(fused)
    assert first["clip_ratio/region_mean"] == 0  # on-policy: every ratio is 1
    assert second["clip_ratio/low_mean"] > 0 and second["clip_ratio/high_mean"] > 0
    assert first["completions/clipped_ratio"] > 0 and second["kl"] > 0


def test_lora_with_kl_to_the_adapter_free_model_matches_stock(tiny_model_dir, tmp_path):
    """LoRA with beta > 0: the reference is the model with its adapters off (TRL's), the head's weight is frozen."""
    cell = dict(loss_type="grpo", **KL, **ITERS, entropy_coef=0.01, peft_config=tiny_lora_config())
    stock, fused = train_both(tiny_model_dir, tmp_path, **cell)
    assert_logs_equal(step_logs(fused), step_logs(stock))
    assert_parameters_equal(fused.parameter_steps, stock.parameter_steps)
    trained = {name for name, p in fused.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    assert logged_values(fused, "kl")[-1] > 0


def test_moe_router_loss_matches_stock(tmp_path):
    """An MoE model: TRL adds the router load-balancing loss (`router_aux_loss_coef`) and logs `aux_loss`."""
    # float32: the experts' grouped matmul has no float64 kernel
    model_dir = save_tiny_model(tmp_path / "moe", arch="qwen3_moe")
    stock, fused = train_both(model_dir, tmp_path, loss_type="dapo", **KL, router_aux_loss_coef=0.5)
    assert_logs_equal(step_logs(fused), step_logs(stock))
    assert_parameters_equal(fused.parameter_steps, stock.parameter_steps)
    assert all(value > 0 for value in logged_values(fused, "aux_loss"))


# ----------------------------------------------------------------------------------------------- DDP and resume

SCRIPT = Path(__file__).parent / "scripts" / "train_grpo_tiny.py"
DDP_CELL = dict(loss_type="dapo", beta=0.04, num_iterations=2, entropy_coef=0.01, max_steps=3)


@pytest.mark.slow
def test_two_processes_equal_one_process_over_the_same_global_batch(tiny_model_dir, tmp_path):
    """torchrun, 2 CPU processes (gloo) with 2 completions each, stock and fused, against 1 fused process with 4:
    the same losses, metrics and parameters (dapo's normaliser divides by the number of processes)."""
    one = make_trainer(FusedGRPOTrainer, tiny_model_dir, tmp_path / "one", **DDP_CELL)
    one.train()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(SCRIPT),
        tiny_model_dir,
        str(tmp_path / "two"),
        json.dumps(DDP_CELL),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WORLD 2" in result.stdout, result.stdout[-2000:]
    for which in ("stock", "fused"):
        logs = json.loads((tmp_path / "two" / f"{which}_logs.json").read_text())
        params = torch.load(tmp_path / "two" / f"{which}_params.pt", weights_only=True)
        assert_logs_equal(logs, step_logs(one))
        assert_parameters_equal([params], one.parameter_steps[-1:])


def test_resume_from_checkpoint_continues_identically(tiny_model_dir, tmp_path):
    """Adaptive entropy control keeps its coefficient and last entropy in the checkpoint; generation, old log-probs
    (num_iterations... here steps_per_generation=2) and the shuffling restart where they were."""
    cell = dict(
        loss_type="grpo",
        **KL,
        steps_per_generation=2,
        use_adaptive_entropy=True,
        entropy_coef=0.01,
        entropy_target=6.0,
        max_steps=4,
    )

    def make(output_dir, **overrides):
        return make_trainer(FusedGRPOTrainer, tiny_model_dir, output_dir, **{**cell, **overrides})

    full = make(tmp_path / "full")
    full.train()
    resumed, _ = train_and_resume(make, tmp_path / "resumed")
    assert_logs_equal(step_logs(resumed)[2:], step_logs(full)[2:])
    assert_parameters_equal(resumed.parameter_steps, full.parameter_steps[2:])
    assert len(set(logged_values(full, "entropy_coef"))) > 1  # the coefficient moves, so the state matters


# ------------------------------------------------------------------------------------------ logits and matmuls


def head_call(trainer):
    """One training micro-step's loss and backward on prepared inputs (generation and the no-grad passes done)."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # as `train()` sets it
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    positions = inputs["prompt_ids"].shape[1] + inputs["completion_ids"].shape[1]
    with LargestTensor() as tracker:
        trainer.compute_loss(trainer.model, inputs).backward()
    return tracker, inputs["prompt_ids"].shape[0] * positions


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_no_logits_and_no_lm_head_call_on_the_training_path(tiny_model_dir, tmp_path, lora):
    """The training loss holds no `[N, V]` tensor (N the batch's positions), never runs the lm_head module, and
    makes three head matmuls per tile (logits, grad hidden, grad weight); two with the lm_head frozen (LoRA)."""
    vocab, hidden = AutoModelForCausalLM.from_pretrained(tiny_model_dir).lm_head.weight.shape
    peft_config = tiny_lora_config() if lora else None
    fused = make_trainer(
        FusedGRPOTrainer,
        tiny_model_dir,
        tmp_path / "fused",
        peft_config=peft_config,
        **KL,
        fused={"loss_chunk_size": 8},
    )
    calls = []
    lm_head = fused.model.get_output_embeddings()
    lm_head.register_forward_hook(lambda module, args, output: calls.append(tuple(output.shape)))
    tracker, positions = head_call(fused)
    assert calls == []
    assert tracker.largest < positions * vocab // 2
    tiles = [shape for shape in tracker.matmul_outputs if shape[-1] == vocab and shape[0] <= 8]
    weight_grads = [shape for shape in tracker.matmul_outputs if shape == (vocab, hidden)]
    assert tiles and len(weight_grads) == (0 if lora else len(tiles))
    # the checks can fail: stock TRL's head builds the logits of every position, and a plain forward calls the head
    stock = make_trainer(GRPOTrainer, tiny_model_dir, tmp_path / "stock", **KL)
    tracker, positions = head_call(stock)
    assert tracker.largest >= positions * vocab
    fused.model(input_ids=torch.tensor([[1, 2, 3]]))
    assert len(calls) == 1


# -------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"top_entropy_quantile": 0.2}, "top_entropy_quantile"),
        ({"loss_backend": "liger"}, "loss_backend='liger'"),
        ({"loss_backend": "fast"}, "loss_backend"),
        ({"loss_chunk_size": 0}, "loss_chunk_size"),
    ],
)
def test_bad_config_values_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        FusedGRPOConfig(output_dir=str(tmp_path), **{**ARGS, **overrides})


def test_what_the_head_cannot_match_is_refused_before_training(tiny_model_dir, tmp_path, monkeypatch):
    from peft import PromptTuningConfig

    with pytest.raises(ValueError, match="prompt-learning PEFT"):
        make_trainer(
            FusedGRPOTrainer,
            tiny_model_dir,
            tmp_path,
            peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        )
    softcapped = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    softcapped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        FusedGRPOTrainer(
            model=softcapped,
            reward_funcs=replayed_completion_reward,
            args=FusedGRPOConfig(output_dir=str(tmp_path), **ARGS),
            train_dataset=prompts(),
        )
    from hf_plugins.trainers import grpo_trainer

    monkeypatch.setattr(grpo_trainer, "triton_usable", lambda device: False)
    with pytest.raises(ValueError, match="loss_backend='triton'"):
        make_trainer(FusedGRPOTrainer, tiny_model_dir, tmp_path, fused={"loss_backend": "triton"})
    fused = make_trainer(FusedGRPOTrainer, tiny_model_dir, tmp_path)
    inputs = fused._prepare_inputs(next(iter(fused.get_train_dataloader())))
    with pytest.raises(ValueError, match="multimodal"):
        fused.compute_loss(fused.model, {**inputs, "pixel_values": torch.zeros(4, 3, 8, 8)})


def test_a_plain_grpo_config_is_converted_with_its_values(tiny_model_dir, tmp_path):
    args = GRPOConfig(
        output_dir=str(tmp_path), **{**ARGS, "beta": 0.04, "steps_per_generation": 2, "loss_type": "cispo"}
    )
    trainer = FusedGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        reward_funcs=replayed_completion_reward,
        args=args,
        train_dataset=prompts(),
    )
    assert isinstance(trainer.args, FusedGRPOConfig)
    assert (trainer.args.beta, trainer.args.steps_per_generation, trainer.args.loss_type) == (0.04, 2, "cispo")
    assert trainer.args.generation_batch_size == args.generation_batch_size
    assert trainer.args.loss_backend == "auto"
