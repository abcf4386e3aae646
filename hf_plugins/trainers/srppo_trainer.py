"""`SRPPOTrainer`: Self-Rewarding PPO (arXiv 2510.21090) on `FusedGRPOTrainer`.

The reward of a completion y of a prompt x is the log-ratio of two frozen models, `log pi_SFT(y|x) - log
pi_base(y|x)`, summed over the completion's tokens (or their mean, `self_reward_normalization="mean"`, ours). GRPO,
critic-free, replaces the paper's PPO with a critic and GAE; one scalar per completion is what the paper's reward at
EOS is to GRPO. The reward is the trainer's reward function `self_reward` (first in `reward_funcs`, so TRL's
reward weights, advantages and `rewards/self_reward/*` logging apply to it): TRL calls it after generation and the
reference pass, on each process's completions before the gather. Generation, the reference and old log-probs, the
loss (the fused head) and the logging stay FusedGRPOTrainer's and TRL's.

Both log-probs come from the models' last hidden states and the library's chunked label-log-prob head
(`hf_plugins.data.scoring.sequence_log_probs`, PoFT's scorer), under no_grad, without `[tokens, vocab]` logits and at
temperature 1 whatever the sampling `temperature` (TRL's patched head divides by it; this one does not).
"""

from __future__ import annotations

import inspect
import logging
import textwrap
from pathlib import Path

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer
from trl.trainer.utils import get_config_model_id, use_adapter

from ..data.scoring import sequence_log_probs
from ..utils import get_logger
from .frozen_models import load_frozen_model, parameter_bytes, place_frozen_model, tokenizer_differs, vocab_rows
from .grpo_trainer import FusedGRPOTrainer
from .model_card import is_hub_repo_id
from .srppo_config import SRPPOConfig


logger = get_logger(__name__)


def _is_peft(model) -> bool:
    return not isinstance(model, str) and is_peft_model(model)


def _model_name(model) -> str | None:
    """The path or Hub id a model (or a PEFT model's base) was loaded from; the string itself for a path."""
    if isinstance(model, str):
        return model
    if _is_peft(model):
        model = model.get_base_model()
    return get_config_model_id(model.config) or None


def _same_model(a: str | None, b: str | None) -> bool:
    """Whether two model names designate the same model: the same folder, or the same Hub id."""
    if not a or not b:
        return False
    first, second = Path(a).expanduser(), Path(b).expanduser()
    if first.exists() and second.exists():
        return first.resolve() == second.resolve()
    return a.rstrip("/") == b.rstrip("/")


class _LoadedHere(logging.Filter):
    def filter(self, record) -> bool:
        return "model_init_kwargs" not in record.getMessage()


class SRPPOTrainer(FusedGRPOTrainer):
    """
    Trainer for Self-Rewarding PPO (SRPPO, arXiv 2510.21090), a drop-in replacement for `trl.GRPOTrainer` whose
    reward is `log pi_SFT(y|x) - log pi_base(y|x)`: alignment from demonstrations only, on prompts without them.

    It takes the arguments of `GRPOTrainer` with an [`SRPPOConfig`] as `args`, and needs no reward function:
    `reward_funcs`, if given, are added after the self-reward (`reward_weights` then list the self-reward first).
    The two frozen models come from an SFT LoRA adapter (`args.sft_adapter_path`: one model, a frozen `sft`
    adapter for pi_SFT and the adapters off for pi_base, no extra weights) or from a full SFT checkpoint as `model`
    and `args.base_model`, a second frozen model. Logged (besides TRL's and FusedGRPOTrainer's):
    `self_reward/sft_logp` and `self_reward/base_logp` (the mean summed log-prob of a completion under each model)
    and `self_reward/per_token` (the mean per-token log-ratio); watch `completions/mean_length` with the summed
    reward, which can favour long completions.

    Refused before training, with the reason (besides FusedGRPOTrainer's refusals): no source of the two models (no
    SFT adapter and no base model), a `base_model` that is not the base of the SFT adapter's policy, a base model
    that is the SFT model itself, an SFT adapter with a new `peft_config`, a base model with another tokenizer, and
    tools or environments (their tool-output tokens are not the policy's).
    """

    command = "srppo"
    description = "Self-Rewarding PPO: the SFT/base log-ratio as the GRPO reward, on the fused head"
    #: The trainer computes its own reward: `hf-plugins srppo` needs no `--reward_funcs`
    builds_own_reward = True

    _tag_names = ["trl", "grpo", "srppo", "hf-plugins"]
    _name = "SRPPO"
    _paper = {
        "title": "Self-Rewarding PPO: Aligning Large Language Models with Demonstrations Only",
        "id": "2510.21090",
        "citation": textwrap.dedent("""\
            @article{srppo2025,
                title        = {{Self-Rewarding PPO: Aligning Large Language Models with Demonstrations Only}},
                year         = 2025,
                eprint       = {arXiv:2510.21090},
            }"""),
    }

    config_class = SRPPOConfig

    def __init__(self, model, reward_funcs=None, args: SRPPOConfig | None = None, *positional, **kwargs):
        args = self.coerce_args(model, args)
        named = inspect.signature(GRPOTrainer.__init__).bind(None, model, reward_funcs, args, *positional, **kwargs)
        named = dict(named.arguments)
        named.pop("self")
        for name in ("tools", "environment_factory"):
            if named.get(name):
                raise ValueError(
                    f"SRPPOTrainer does not take `{name}`: the tool outputs inside a completion are not the policy's "
                    "tokens, so the SFT/base log-ratio over them is not the paper's reward. Use FusedGRPOTrainer."
                )
        self.self_reward_source = self._check_sources(named["model"], args, named.get("peft_config"))
        if self.self_reward_source == "adapter" and args.sft_adapter_path is not None:
            quantization_config = None
            if isinstance(named["model"], str):  # loaded here, so TRL's loading options are used here
                quantization_config = named.pop("quantization_config", None)
            named["model"] = self._with_sft_adapter(named["model"], args, quantization_config)
        named["reward_funcs"] = [self.self_reward, *self.reward_list(named.get("reward_funcs"))]
        trl_logger = logging.getLogger(GRPOTrainer.__module__)
        loaded_here = _LoadedHere()  # TRL would say that `model_init_kwargs` are ignored: they were used here
        if self.self_reward_source == "adapter" and isinstance(model, str):
            trl_logger.addFilter(loaded_here)
        try:
            super().__init__(**named)
        finally:
            trl_logger.removeFilter(loaded_here)

        self._sft_model = self._base_model = None
        if self.self_reward_source == "adapter":
            policy = self.accelerator.unwrap_model(self.model)
            policy.set_requires_grad(args.sft_adapter_name, requires_grad=False)
            logger.info(
                "SRPPO: pi_SFT is the frozen adapter %r, pi_base the policy with its adapters off: no second model.",
                args.sft_adapter_name,
            )
        else:
            self._base_model = self._frozen(args.base_model, "base_model")
            if is_peft_model(self.model):
                pass  # pi_SFT: the policy with its adapters off
            elif self.ref_model is not None and not args.sync_ref_model:
                self._sft_model = self.ref_model  # TRL's reference: the starting (SFT) weights, frozen
            else:
                sft_path = _model_name(self.model)
                if sft_path is None:
                    raise ValueError(
                        "SRPPO with full fine-tuning needs a frozen copy of the SFT model, loaded from its path, but "
                        "the model has no `name_or_path`: pass the SFT model by path, or train a LoRA adapter "
                        "(`peft_config`), whose adapters-off model is the SFT model at no memory cost."
                    )
                self._sft_model = self._frozen(sft_path, "the SFT model's frozen copy")

    # ------------------------------------------------------------------------------------ the two models
    @staticmethod
    def _check_sources(model, args: SRPPOConfig, peft_config) -> str:
        """Which source gives pi_SFT and pi_base ("adapter" or "base_model"), checked before any model loads."""
        name = args.sft_adapter_name
        holds_sft_adapter = _is_peft(model) and name in model.peft_config
        if args.sft_adapter_path is not None or holds_sft_adapter:
            if args.sft_adapter_path is not None and holds_sft_adapter:
                raise ValueError(
                    f"The model already holds an adapter named {name!r} and `sft_adapter_path` is set too: drop "
                    "`sft_adapter_path`, or pass the base model without the adapter."
                )
            if args.sft_adapter_path is not None and _is_peft(model):
                raise ValueError(
                    "`sft_adapter_path` loads the SFT adapter onto the base model: pass the base model as `model`, "
                    f"not a PeftModel (or load the adapter into it yourself as {name!r} and drop `sft_adapter_path`)."
                )
            if peft_config is not None:
                raise ValueError(
                    "`peft_config` is set together with an SFT adapter: the policy trains a copy of the SFT adapter "
                    "(its LoRA settings), so drop `peft_config` (`--use_peft` and the `--lora_*` options)."
                )
            policy_base = _model_name(model)
            if args.base_model is not None and not _same_model(args.base_model, policy_base):
                raise ValueError(
                    f"`base_model={args.base_model!r}` is not the base of the policy, which is {policy_base!r}: with an "
                    "SFT adapter, pi_base is the policy's own base model (adapters off). Drop `base_model`, or pass "
                    "the adapter's base model as `model`."
                )
            path = args.sft_adapter_path
            if path is not None and Path(path).expanduser().exists():
                if not (Path(path).expanduser() / "adapter_config.json").is_file():
                    raise ValueError(
                        f"`sft_adapter_path={path!r}` has no adapter_config.json: give the folder of a PEFT adapter "
                        "(as `save_pretrained` of a PeftModel writes it)."
                    )
            elif path is not None and not is_hub_repo_id(path):
                raise ValueError(f"`sft_adapter_path={path!r}` does not exist: give the folder of the SFT adapter.")
            return "adapter"
        if args.base_model is not None:
            sft_name = _model_name(model)
            if _same_model(args.base_model, sft_name):
                what = "the policy with its adapters off" if _is_peft(model) else "the model"
                raise ValueError(
                    f"`base_model={args.base_model!r}` is {what}, so pi_SFT would be pi_base and every reward 0. Pass "
                    "the SFT checkpoint as `model`; if the SFT model is a LoRA adapter, give it as `sft_adapter_path` "
                    "(with its base model as `model`)."
                )
            if not Path(args.base_model).expanduser().exists() and not is_hub_repo_id(args.base_model):
                raise ValueError(f"`base_model={args.base_model!r}` does not exist: give the base model's folder.")
            return "base_model"
        raise ValueError(
            "SRPPO needs the SFT and the base model, and neither source is set: give `sft_adapter_path` (the SFT LoRA "
            "adapter, with its base model as `model`) or `base_model` (the base model, with the full SFT checkpoint "
            f"as `model`), or pass a PeftModel holding the SFT adapter as {args.sft_adapter_name!r}."
        )

    def _with_sft_adapter(self, model, args: SRPPOConfig, quantization_config):
        """The base model with the SFT adapter twice: the trainable `default` copy (the policy starts from pi_SFT)
        and the frozen `sft_adapter_name` copy (pi_SFT)."""
        from peft import PeftModel

        if isinstance(model, str):
            init_kwargs = dict(args.model_init_kwargs or {})
            if quantization_config is not None:
                init_kwargs["quantization_config"] = quantization_config
            model = load_frozen_model(model, args, init_kwargs)  # loaded as TRL loads the policy; trained below
        policy = PeftModel.from_pretrained(model, args.sft_adapter_path, is_trainable=True)
        policy.load_adapter(args.sft_adapter_path, adapter_name=args.sft_adapter_name, is_trainable=False)
        policy.set_adapter("default")
        return policy

    def _frozen(self, path: str, what: str):
        """A second model from `path`, frozen and placed like TRL's reference model; its memory is logged."""
        init_kwargs = dict(self.args.model_init_kwargs or {})
        init_kwargs.setdefault("dtype", self.model.dtype)
        init_kwargs.setdefault("attn_implementation", self.model.config._attn_implementation)
        if tokenizer_differs(path, self.processing_class, init_kwargs.get("trust_remote_code", False)):
            raise ValueError(
                f"The model at {path!r} ({what}) has another tokenizer than the policy's: the log-ratio compares both "
                "models on the same token ids. Use models that share one tokenizer."
            )
        model = load_frozen_model(path, self.args, init_kwargs)
        if vocab_rows(model) != vocab_rows(self.model):
            raise ValueError(
                f"The model at {path!r} ({what}) scores {vocab_rows(model)} tokens but the policy scores "
                f"{vocab_rows(self.model)}: use models that share one tokenizer and vocabulary."
            )
        logger.warning(
            "SRPPO: %s (%s) is a second frozen model: %.1f MiB more memory per process (%d parameters). An SFT LoRA "
            "adapter (`sft_adapter_path`) on the base model needs none.",
            what,
            path,
            parameter_bytes(model) / 2**20,
            sum(p.numel() for p in model.parameters()),
        )
        self.self_reward_extra_bytes = getattr(self, "self_reward_extra_bytes", 0) + parameter_bytes(model)
        return place_frozen_model(model, self)

    def _scoring_models(self):
        """`(sft, base)`: for each side, the model to run and the adapter to switch on in the policy (a name, None
        for adapters off) or False when it is a model of its own."""
        name = self.args.sft_adapter_name
        if self.self_reward_source == "adapter":
            return (self.model, name), (self.model, None)
        sft = (self.model, None) if self._sft_model is None else (self._sft_model, False)
        return sft, (self._base_model, False)

    # ------------------------------------------------------------------------------------ the reward
    @torch.no_grad()
    def self_reward(self, prompts, completion_ids, log_metric=None, **kwargs) -> list[float]:
        """The reward function: `log pi_SFT(y|x) - log pi_base(y|x)` per completion (summed, or its per-token mean
        with `self_reward_normalization="mean"`), at temperature 1. The prompts are tokenised as generation
        tokenises them (`_tokenize_prompts`); an empty completion gets 0."""
        prompt_ids, _, _ = self._tokenize_prompts(prompts)
        rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
        device = self.accelerator.device
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self._tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        scored = torch.zeros_like(input_ids, dtype=torch.bool)
        for i, (row, prompt) in enumerate(zip(rows, prompt_ids, strict=True)):
            # Right-padded: every token keeps its position, so the scores are those of the unpadded sequence
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
            scored[i, len(prompt) : len(row)] = True
        input_ids, attention_mask, scored = input_ids.to(device), attention_mask.to(device), scored.to(device)
        batch, chunk = self.args.per_device_train_batch_size, self.args.loss_chunk_size

        def log_probs(model) -> torch.Tensor:
            sums = []
            for start in range(0, len(rows), batch):
                part = slice(start, start + batch)
                sums.append(sequence_log_probs(model, input_ids[part], attention_mask[part], scored[part], chunk)[0])
            return torch.cat(sums)

        (sft_model, sft_adapter), (base_model, base_adapter) = self._scoring_models()
        policy = self.accelerator.unwrap_model(self.model)
        training = policy.training
        policy.eval()  # the frozen models without dropout (LoRA's included)
        try:
            sides = []
            for model, adapter in ((sft_model, sft_adapter), (base_model, base_adapter)):
                if adapter is False:
                    sides.append(log_probs(model))
                else:
                    with use_adapter(policy, adapter_name=adapter):
                        sides.append(log_probs(model))
        finally:
            policy.train(training)
            if self.self_reward_source == "adapter":  # `use_adapter` makes the adapter it switches on trainable
                policy.set_requires_grad(self.args.sft_adapter_name, requires_grad=False)
        sft, base = sides
        counts = scored[:, 1:].sum(1).clamp(min=1).double()
        ratio = sft - base
        if self.args.self_reward_normalization == "mean":
            ratio = ratio / counts
        if log_metric is not None:
            log_metric("self_reward/sft_logp", sft.mean().item())
            log_metric("self_reward/base_logp", base.mean().item())
            log_metric("self_reward/per_token", ((sft - base) / counts).mean().item())
        return ratio.tolist()
