"""`FusedGRPOTrainer`: TRL's `GRPOTrainer` with its policy loss computed by this library's fused loss head.

Only `_compute_loss` changes, where TRL's own GRPO variants change it (GMPO): generation (transformers, vLLM or a
`rollout_func`), rewards and advantages, the no-grad old and reference log-prob passes (TRL's fused head, so both
trainers see the same old and reference log-probs), the vLLM weight sync, buffering across `steps_per_generation`
and `num_iterations`, checkpoints and logging stay TRL's. The loss is the `"grpo"` method of the fused head
(`hf_plugins.losses.GRPOMethod`): it computes the gradient with respect to the logits in the forward pass (three
lm_head matmuls per micro-step, two with a frozen head under LoRA, against TRL's four and three), never builds the
`[tokens, vocab]` logits, and returns TRL's loss value. The head runs inside the model's forward
(`hf_plugins.modeling.add_loss_head_forward`), so DDP, FSDP and DeepSpeed hooks fire as for any forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import ProcessorMixin
from trl import GRPOTrainer

from ..losses.grpo import STATISTICS_METRIC, GRPOMethod
from ..modeling import PREPENDING_PEFT_TYPES, LossHead, add_loss_head_forward, forward_with_head, logit_transform
from ..utils import destroy_process_group_at_exit, triton_usable
from .args_coercion import coerce_args
from .grpo_config import FusedGRPOConfig
from .model_card import ModelCardMixin


#: Batch entries of vision-language models: their forward is not the text backbone the fused head reads
MULTIMODAL_INPUTS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
    "num_images",
    "num_tiles",
)


@dataclass
class Float32LossHead(LossHead):
    """The loss head of `cast_lm_head_to_fp32=True`: as TRL's head then does, the hidden states are cast to float32
    and the head runs outside autocast (the lm_head weight is float32 already)."""

    def __call__(self, hidden_states, labels, lm_head, pre_shifted: bool, **kwargs):
        with torch.autocast(hidden_states.device.type, enabled=False):
            return super().__call__(hidden_states.float(), labels, lm_head, pre_shifted, **kwargs)


class FusedGRPOTrainer(ModelCardMixin, GRPOTrainer):
    """
    Drop-in replacement for `trl.GRPOTrainer` whose policy loss is computed by the fused loss head.

    It takes exactly the arguments of `GRPOTrainer` (pass a [`FusedGRPOConfig`] as `args` to choose the loss
    backend) and gives TRL's loss, gradients and logged metrics (`kl`, `entropy`, `clip_ratio/*`,
    `cispo_clip_ratio`, `vespo/phi_seq_mean`, `policy_loss`, `entropy_coef`, `aux_loss`) for every `loss_type` and
    loss option, step for step, without the `[tokens, vocab]` logits.

    Refused before training, with the reason: `top_entropy_quantile < 1` and `loss_backend="liger"` (by the
    config), `loss_backend="triton"` without a CUDA device, vision-language models and multimodal batches,
    prompt-learning PEFT (prompt tuning, p-tuning, prefix tuning), and models that transform their logits after the
    lm_head (soft-capping, scaling).
    """

    #: `hf-plugins grpo` trains with this trainer (the registry `hf_plugins.trainers.TRAINERS`)
    command = "grpo"
    description = "GRPO, every TRL loss_type, with the fused policy-loss head"
    #: prompt datasets are checked by the GRPO side of the command line; no SFT-format needs
    dataset_needs: dict = {}
    full_fine_tuning: str | None = None
    #: whether the trainer builds its reward from its config, so that the command line needs no `--reward_funcs`
    builds_own_reward = False
    #: config fields that name a callable by import path (`my_module.my_judge`), each with the keyword argument of
    #: `__init__` that takes the callable: the command line imports them as it imports `--reward_funcs`
    callable_fields: dict[str, str] = {}

    _tag_names = ["trl", "grpo", "hf-plugins"]
    _name = "Fused GRPO"

    #: The config class of this trainer; `args` of another class are converted to it
    config_class = FusedGRPOConfig

    @staticmethod
    def reward_list(reward_funcs) -> list:
        """`reward_funcs` as GRPOTrainer accepts it (None, one reward, or a list) made a list, for trainers that put
        their own reward first (`builds_own_reward`)."""
        if reward_funcs is None:
            return []
        return list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]

    @classmethod
    def coerce_args(cls, model, args):
        """`args` as an instance of `config_class`: a default one named after the model when None; another config
        (a plain `GRPOConfig`, `TrainingArguments`) keeps its values and the fields it lacks take their defaults."""
        # `GRPOConfig.__post_init__` sets both `steps_per_generation` and `generation_batch_size`; the steps give the
        # same generation batch, and a config with both set is refused
        drop = ("generation_batch_size",) if getattr(args, "steps_per_generation", None) is not None else ()
        return coerce_args(
            cls.config_class,
            cls.__name__,
            model,
            args,
            "The positional order is GRPOTrainer's: (model, reward_funcs, args, ...).",
            drop=drop,
        )

    def __init__(self, model, reward_funcs=None, args: FusedGRPOConfig | None = None, *positional, **kwargs):
        args = self.coerce_args(model, args)
        peft_config = kwargs.get("peft_config")
        if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
            self._refuse_prompt_learning(getattr(peft_config.peft_type, "value", peft_config.peft_type))
        if args.loss_backend == "triton" and not triton_usable(args.device):
            raise ValueError(
                f"`loss_backend='triton'` needs a CUDA device with triton (the trainer runs on {args.device.type}): "
                "set `loss_backend='auto'` (it picks the fastest backend the device has) or 'chunked'."
            )
        if isinstance(kwargs.get("processing_class"), ProcessorMixin):
            self._refuse_vision_language()
        if not isinstance(model, str):
            self._refuse_transformed_logits(model)  # before TRL sets anything up
        super().__init__(model, reward_funcs, args, *positional, **kwargs)
        self._refuse_transformed_logits(self.model)
        destroy_process_group_at_exit()

        if self._is_vlm:  # the processor TRL loaded for a model given by name
            self._refuse_vision_language()
        active = getattr(self.model, "active_peft_config", None)
        if active is not None and getattr(active, "is_prompt_learning", False):
            self._refuse_prompt_learning(getattr(active.peft_type, "value", active.peft_type))
        # After TRL's `add_fused_lm_head`: without `loss_head` the forward is TRL's (generation, old/ref passes)
        add_loss_head_forward(self.model.get_base_model() if is_peft_model(self.model) else self.model)

    @staticmethod
    def _refuse_transformed_logits(model) -> None:
        """Models that scale or soft-cap their logits: the fused head computes them, but this trainer is not yet
        checked against stock GRPOTrainer on them."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        transform = logit_transform(base)
        if not transform.is_identity:
            fields = "final_logit_softcapping" if transform.softcap is not None else "its logit scale"
            raise ValueError(
                f"FusedGRPOTrainer does not train models whose logits are transformed after the lm_head yet (the "
                f"model's config sets {fields}: {transform}): use TRL's GRPOTrainer for this model."
            )

    def _refuse_vision_language(self) -> None:
        raise ValueError(
            f"{type(self).__name__} does not support vision-language models yet: their forward is not the text "
            "backbone the fused head reads. Use TRL's GRPOTrainer for them."
        )

    def _refuse_prompt_learning(self, peft_type) -> None:
        kind = "prompt-learning PEFT" + (f" ({peft_type})" if peft_type else "")
        why = (
            "its virtual tokens shift the positions the head aligns the old and reference log-probs with"
            if peft_type in PREPENDING_PEFT_TYPES
            else "the fused GRPO head is not verified with it"
        )
        raise ValueError(
            f"{type(self).__name__} does not support {kind}: {why}. Use LoRA (or another adapter that changes no "
            "positions), or TRL's GRPOTrainer."
        )

    # ------------------------------------------------------------------------------------------------ the loss
    def loss_options(self, mode: str) -> dict[str, Any]:
        """The options of `GRPOMethod` for one call, read from the trainer as TRL's `_compute_loss` reads them."""
        args = self.args
        if not self._entropy_bonus_enabled:
            entropy_coef = 0.0
        elif self.use_adaptive_entropy:  # the coefficient of the previous optimizer step's window
            entropy_coef = self.entropy_coef if self._last_world_entropy <= args.entropy_target else 0.0
        else:
            entropy_coef = self.entropy_coef
        return {
            "loss_type": self.loss_type,
            "importance_sampling_level": self.importance_sampling_level,
            "beta": self.beta,
            "use_bias_correction_kl": args.use_bias_correction_kl,
            "epsilon": self.epsilon_low,
            "epsilon_high": self.epsilon_high,
            "delta": args.delta,
            "sapo_temperature_pos": args.sapo_temperature_pos,
            "sapo_temperature_neg": args.sapo_temperature_neg,
            "vespo_k_pos": args.vespo_k_pos,
            "vespo_lambda_pos": args.vespo_lambda_pos,
            "vespo_k_neg": args.vespo_k_neg,
            "vespo_lambda_neg": args.vespo_lambda_neg,
            "off_policy_mask_threshold": self.off_policy_mask_threshold,
            "temperature": self.temperature,
            "max_completion_length": self.max_completion_length,
            "steps_per_generation": args.steps_per_generation,
            "entropy_coef": float(entropy_coef),
            "gradient_accumulation_steps": self.current_gradient_accumulation_steps if mode == "train" else 1,
            "num_processes": self.accelerator.num_processes,
            "training": mode == "train",
        }

    def _compute_loss(self, model, inputs):
        multimodal = sorted(name for name in MULTIMODAL_INPUTS if inputs.get(name) is not None)
        if multimodal:
            raise ValueError(
                f"{type(self).__name__} does not support multimodal batches (got {', '.join(multimodal)}): use TRL's "
                "GRPOTrainer for vision-language training."
            )
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        prompt_length = prompt_ids.size(1)

        def on_inputs(completion_values: torch.Tensor, prompt_value: float = 0.0) -> torch.Tensor:
            """A `[B, C]` per-completion-token tensor as `[B, P + C]`, aligned with `input_ids` as the head wants."""
            out = completion_values.new_full(input_ids.shape, prompt_value)
            out[:, prompt_length:] = completion_values
            return out

        # The loss tokens, TRL's mask; every other position is ignored (prompt, padding, tool output)
        labels = on_inputs(completion_ids.masked_fill(mask == 0, -100), -100)
        token_inputs, other_inputs = {}, {}
        advantages = inputs["advantages"]
        if advantages.dim() == 2:  # per-token advantages (subclasses)
            token_inputs["advantages"] = on_inputs(advantages)
        else:
            other_inputs["advantages"] = advantages
        if inputs.get("old_per_token_logps") is not None:
            token_inputs["old_log_probs"] = on_inputs(inputs["old_per_token_logps"])
        if self.beta != 0.0:
            token_inputs["ref_log_probs"] = on_inputs(inputs["ref_per_token_logps"])
        if self.off_policy_mask_threshold is not None and inputs.get("sampling_per_token_logps") is not None:
            token_inputs["sampling_log_probs"] = on_inputs(inputs["sampling_per_token_logps"])
        if self.use_vllm and self.vllm_importance_sampling_correction:
            ratio = inputs["importance_sampling_ratio"]
            if ratio.shape == completion_ids.shape:  # token modes: 1 over the prompt leaves VESPO's sum unchanged
                token_inputs["importance_sampling_ratio"] = on_inputs(ratio, 1.0)
            else:  # sequence modes: one ratio per completion
                other_inputs["importance_sampling_ratio"] = ratio
        options = self.loss_options(mode)
        head_class = Float32LossHead if self.args.cast_lm_head_to_fp32 else LossHead
        head = head_class(
            method=GRPOMethod(),
            backend=self.args.loss_backend,
            chunk_size=self.args.loss_chunk_size,
            num_items_in_batch=inputs["num_items_in_batch"],
            token_inputs=token_inputs,
            other_inputs={**other_inputs, **options},
        )
        forward_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.aux_loss_enabled:
            forward_inputs["output_router_logits"] = True  # the MoE load-balancing loss, as TRL asks for it
        with self.accelerator.autocast():
            outputs = forward_with_head(model, forward_inputs, head)
        loss = outputs.loss
        statistics = outputs.metric_sums[STATISTICS_METRIC]

        if self._entropy_bonus_enabled:
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(statistics.policy_loss).nanmean().item())
            if self.use_adaptive_entropy and mode == "train":
                self._update_entropy_coef(statistics.entropy_window)
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        if self.aux_loss_enabled:
            accumulation = options["gradient_accumulation_steps"]
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        logged = statistics.metrics(
            reduce_sum=lambda t: self.accelerator.reduce(t, reduction="sum"), gather=self.accelerator.gather
        )
        for name, value in logged.items():
            self._metrics[mode][name].append(value)
        return loss

    def _update_entropy_coef(self, window: torch.Tensor) -> None:
        """Adaptive entropy control, as TRL's: the micro-steps' entropy sums and token counts add up over the
        accumulation window; at its end their global mean moves the coefficient by `entropy_coef_delta`, up when
        the entropy is at most `entropy_target`, down otherwise, within `[entropy_coef_min, entropy_coef_max]`, for
        the next optimizer step."""
        previous = self._entropy_window_stats
        self._entropy_window_stats = window if previous is None else previous + window
        if not self.accelerator.sync_gradients:
            return
        totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
        world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
        args = self.args
        if world_entropy <= args.entropy_target:
            self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
        self._last_world_entropy = world_entropy
        self._entropy_window_stats = None
