"""SRPPOTrainer (Self-Rewarding PPO) on the tiny offline model (float64 weights), on replayed completions.

The reward is checked against `log pi_SFT - log pi_base` from materialised float64 logits for both sources of the two
models (an SFT LoRA adapter; a full SFT checkpoint with a second base model, under full fine-tuning and under LoRA),
for the sum and the per-token mean, and at a sampling temperature that is not 1 (the reward stays the temperature-1
one). With the adapter source no second copy of the base weights exists. Training equals FusedGRPOTrainer given the
same reward as a plain function, step by step. Bad input is refused before training.
"""

import os
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel
from testing_utils import GRPO_ARGS, GRPO_MAX_COMPLETION
from testing_utils import logged as logged_values
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from hf_plugins import FusedGRPOConfig, FusedGRPOTrainer, SRPPOConfig, SRPPOTrainer
from hf_plugins.testing import ReplayedCompletions, tiny_prompt_completion_dataset


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # `rollout_func` is experimental in TRL 1.16

MAX_COMPLETION, ARGS = GRPO_MAX_COMPLETION, GRPO_ARGS
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def prompts(n=8, seed=0):
    return tiny_prompt_completion_dataset(n, seed=seed).select_columns(["prompt"])


@pytest.fixture(scope="module")
def sft_adapter_dir(tiny_sft_adapter_dir):
    return tiny_sft_adapter_dir


@pytest.fixture(scope="module")
def sft_full_dir(tiny_model_dir, tmp_path_factory):
    """A full 'SFT' checkpoint: the tiny model with every weight perturbed, and its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    folder = tmp_path_factory.mktemp("sft-full")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return str(folder)


def make_srppo(model, tmp_path, *, reward_funcs=None, peft_config=None, tokenizer_from=None, **overrides):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from or tiny_model_dir_of(model))
    torch.manual_seed(0)
    return SRPPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        # TRL loads a model given by path in float32 unless told otherwise: float64 keeps the comparisons exact
        args=SRPPOConfig(
            **{**ARGS, "output_dir": str(tmp_path / "out"), "model_init_kwargs": {"dtype": torch.float64}, **overrides}
        ),
        train_dataset=prompts(),
        processing_class=tokenizer,
        peft_config=peft_config,
        rollout_func=ReplayedCompletions(tokenizer, MAX_COMPLETION),
    )


def tiny_model_dir_of(model):
    return model if isinstance(model, str) else model.config._name_or_path


@torch.no_grad()
def completion_log_probs(model, prompt_ids, completion_ids) -> torch.Tensor:
    """Summed log-probs of each completion from the materialised float64 logits of the whole sequence."""
    sums = []
    for prompt, completion in zip(prompt_ids, completion_ids):
        ids = torch.tensor([list(prompt) + list(completion)])
        logits = model(input_ids=ids).logits.double()[0]
        log_probs = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
        sums.append(log_probs[len(prompt) - 1 :].sum())
    return torch.stack(sums)


def reference_models(source, tiny_model_dir, sft_adapter_dir, sft_full_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    if source == "adapter":
        sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), sft_adapter_dir).eval()
    else:
        sft = AutoModelForCausalLM.from_pretrained(sft_full_dir).eval()
    return sft, base


def sample_batch(tokenizer, n=6):
    rollout = ReplayedCompletions(tokenizer, MAX_COMPLETION)
    texts = [row["prompt"] for row in prompts(3)] * 2
    out = rollout(texts[:n])
    return texts[:n], out["prompt_ids"], out["completion_ids"]


# ------------------------------------------------------------------------------------------------------- the reward


@pytest.mark.parametrize(
    "source, normalization, temperature",
    [
        ("adapter", "sum", 1.0),
        ("adapter", "mean", 0.7),
        ("base_model", "sum", 0.7),
        ("base_model+lora", "mean", 1.0),
        ("base_model+beta", "sum", 1.0),
    ],
)
def test_reward_is_the_log_ratio_of_materialised_logits(
    tmp_path, tiny_model_dir, sft_adapter_dir, sft_full_dir, source, normalization, temperature
):
    """For each source of the two models: the reward of a completion is `log pi_SFT - log pi_base` (summed, or per
    token) at temperature 1, from the frozen models even after the policy's weights moved."""
    options = dict(self_reward_normalization=normalization, temperature=temperature)
    if source == "adapter":
        trainer = make_srppo(tiny_model_dir, tmp_path, sft_adapter_path=sft_adapter_dir, **options)
    else:
        peft_config = LoraConfig(**LORA) if source == "base_model+lora" else None
        beta = 0.04 if source == "base_model+beta" else 0.0
        trainer = make_srppo(
            sft_full_dir, tmp_path, base_model=tiny_model_dir, peft_config=peft_config, beta=beta, **options
        )
    with torch.no_grad():  # the policy moves away from its start: the reward's models must not
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1)
    texts, prompt_ids, completion_ids = sample_batch(trainer.processing_class)
    logged = {}
    got = torch.tensor(trainer.self_reward(texts, completion_ids, log_metric=logged.__setitem__), dtype=torch.float64)

    sft, base = reference_models(source.split("+")[0], tiny_model_dir, sft_adapter_dir, sft_full_dir)
    sft_logp = completion_log_probs(sft, prompt_ids, completion_ids)
    base_logp = completion_log_probs(base, prompt_ids, completion_ids)
    lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.float64)
    expected = sft_logp - base_logp
    if normalization == "mean":
        expected = expected / lengths
    assert expected.abs().min() > 1e-5  # the two models differ on every completion
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert logged["self_reward/sft_logp"] == pytest.approx(sft_logp.mean().item(), rel=1e-9)
    assert logged["self_reward/base_logp"] == pytest.approx(base_logp.mean().item(), rel=1e-9)
    per_token = ((sft_logp - base_logp) / lengths).mean().item()
    assert logged["self_reward/per_token"] == pytest.approx(per_token, rel=1e-9)


def test_adapter_source_keeps_one_copy_of_the_weights(tmp_path, tiny_model_dir, sft_adapter_dir):
    """The SFT adapter and the adapters-off base share the policy's base weights: every base parameter is stored
    once, and the only extra storage is the frozen adapter's."""
    trainer = make_srppo(tiny_model_dir, tmp_path, sft_adapter_path=sft_adapter_dir)
    assert trainer._base_model is None and trainer._sft_model is None and trainer.ref_model is None
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    storages = {}
    for parameter in trainer.model.parameters():
        storage = parameter.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    lora = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in lora.items() if ".default." in n)
    assert {n.split(".lora_")[1].split(".")[1] for n in lora} == {"default", "sft"}
    assert sum(storages.values()) == base_bytes + 2 * adapter_bytes
    assert all(not p.requires_grad for n, p in lora.items() if ".sft." in n)
    assert all(p.requires_grad for n, p in lora.items() if ".default." in n)


# ------------------------------------------------------------------------------------------------------- training


class ParameterRecorder(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def test_training_equals_fused_grpo_with_the_reward_as_a_plain_function(tmp_path, tiny_model_dir, sft_adapter_dir):
    """SRPPO's steps (losses, metrics, parameters) are FusedGRPOTrainer's with a plain reward function computing the
    same log-ratio from materialised logits on separately loaded frozen models; the self-reward metrics are logged."""
    srppo = make_srppo(tiny_model_dir, tmp_path / "srppo", sft_adapter_path=sft_adapter_dir, temperature=0.7)
    srppo_steps = ParameterRecorder()
    srppo.add_callback(srppo_steps)
    srppo.train()

    sft, base = reference_models("adapter", tiny_model_dir, sft_adapter_dir, None)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def self_reward(prompts, completion_ids, **kwargs):
        prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
        ratio = completion_log_probs(sft, prompt_ids, completion_ids) - completion_log_probs(
            base, prompt_ids, completion_ids
        )
        return ratio.tolist()

    policy = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), sft_adapter_dir, is_trainable=True
    )
    torch.manual_seed(0)
    fused = FusedGRPOTrainer(
        model=policy,
        reward_funcs=self_reward,
        args=FusedGRPOConfig(**{**ARGS, "output_dir": str(tmp_path / "fused"), "temperature": 0.7}),
        train_dataset=prompts(),
        processing_class=tokenizer,
        rollout_func=ReplayedCompletions(tokenizer, MAX_COMPLETION),
    )
    fused_steps = ParameterRecorder()
    fused.add_callback(fused_steps)
    fused.train()

    for key in ("loss", "rewards/self_reward/mean", "rewards/self_reward/std", "reward", "entropy"):
        torch.testing.assert_close(logged_values(srppo, key), logged_values(fused, key), rtol=1e-7, atol=1e-9)
    assert len(srppo_steps.steps) == len(fused_steps.steps) == 2
    for got, expected in zip(srppo_steps.steps, fused_steps.steps):
        assert set(got) == set(expected)  # the trained parameters: the `default` adapter only
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, atol=1e-9, rtol=1e-7)
    assert any(float(value) != 0 for value in logged_values(srppo, "loss"))
    for key in ("self_reward/sft_logp", "self_reward/base_logp", "self_reward/per_token"):
        assert len(logged_values(srppo, key)) == 2


def test_extra_reward_functions_follow_the_self_reward(tmp_path, tiny_model_dir, sft_adapter_dir):
    def length(completion_ids, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    trainer = make_srppo(tiny_model_dir, tmp_path, sft_adapter_path=sft_adapter_dir, reward_funcs=[length])
    assert trainer.reward_func_names == ["self_reward", "length"]


# ------------------------------------------------------------------------------------------------------- refusals


def test_bad_sources_are_refused_before_any_model_loads(tmp_path, tiny_model_dir, sft_adapter_dir, sft_full_dir):
    unloadable = tmp_path / "unloadable"
    unloadable.mkdir()
    (unloadable / "config.json").write_text('{"model_type": "not-a-model-type"}')
    model = str(unloadable)
    cases = [
        ({}, "neither source is set"),
        ({"sft_adapter_path": str(tmp_path / "missing")}, "does not exist"),
        ({"sft_adapter_path": str(unloadable)}, "no adapter_config.json"),
        ({"sft_adapter_path": sft_adapter_dir, "base_model": tiny_model_dir}, "is not the base of the policy"),
        ({"base_model": model}, "pi_SFT would be pi_base"),
        ({"base_model": str(tmp_path / "missing")}, "does not exist"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            make_srppo(model, tmp_path, tokenizer_from=tiny_model_dir, **fields)
    with pytest.raises(ValueError, match="drop `peft_config`"):
        make_srppo(
            model,
            tmp_path,
            sft_adapter_path=sft_adapter_dir,
            peft_config=LoraConfig(**LORA),
            tokenizer_from=tiny_model_dir,
        )
    config = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="does not take `tools`"):
        SRPPOTrainer(model, args=SRPPOConfig(**config, sft_adapter_path=sft_adapter_dir), tools=[len])
    with pytest.raises(ValueError, match="self_reward_normalization"):
        SRPPOConfig(**config, self_reward_normalization="max")
    with pytest.raises(ValueError, match="sft_adapter_name"):
        SRPPOConfig(**config, sft_adapter_name="ref")


def test_peft_policy_on_the_named_base_is_refused(tmp_path, tiny_model_dir, sft_adapter_dir):
    """A LoRA policy on the base model itself with `base_model` naming that base: adapters off would be pi_base,
    not pi_SFT."""
    with pytest.raises(ValueError, match="pi_SFT would be pi_base"):
        make_srppo(tiny_model_dir, tmp_path, base_model=tiny_model_dir, peft_config=LoraConfig(**LORA))


def test_base_model_with_another_vocabulary_is_refused(tmp_path, tiny_model_dir, sft_full_dir):
    from hf_plugins.testing import save_tiny_model

    other = save_tiny_model(tmp_path / "other", vocab_size=300, dtype=torch.float64)
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    with pytest.raises(ValueError, match="tokenizer"):
        make_srppo(sft_full_dir, tmp_path, base_model=other)
