"""The LM-head plumbing below the trainers: the hidden-state forward that feeds the fused loss head, lm_head access
and the MoE / prompt-learning alignment it needs. Used by the trainers, the data scorers and the callbacks.

`add_loss_head_forward(model)` patches a causal LM (the base model under PEFT, like TRL patches it) so that
`model(**inputs, loss_head=head)` runs the backbone only, aligns hidden states with next-token labels and hands them
with the lm_head to `head`, all *inside* the model's forward. Running the head inside the forward is what keeps DDP,
FSDP and DeepSpeed ZeRO-3 correct: their hooks fire around the forward, and the lm_head weight is gathered while it
is used. Without `loss_head`, the forward is the previous one, so generation and TRL's own paths are unchanged.

Prompt-learning PEFT: `PeftModelForCausalLM.forward` runs before the patched forward. Prompt tuning and p-tuning
prepend `num_virtual_tokens` virtual-token embeddings (and -100 labels) to the caller's sequence; prefix tuning passes
its prefix as `past_key_values` and changes no position. The heads are told the caller's sequence length
(`forward_with_head`), so every head sees positions aligned with the caller's `input_ids`: a second model's hidden
states line up with the policy's whatever adapters either has. The one prediction the virtual tokens add, the
caller's first token from the last virtual token, is kept, as the model's own loss keeps it.

Models that transform their logits after the lm_head (Gemma 2/3's soft-cap, Cohere's `logit_scale`, Granite's
`logits_scaling`, ...) get the same transform in every head: `logit_transform(model)` reads it from the config the way
TRL's fused head does, and the patched forward hands it to the head with the lm_head.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers.utils import ModelOutput
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .ops import fused_linear_loss
from .ops.method import PLAIN_LOGITS, LogitTransform, LossMethod


#: Config attributes that scale the logits, in the order TRL's fused head reads them: the first one set wins
#: (Cohere's `logit_scale`; `output_multiplier`; Falcon-H1's `lm_head_multiplier`; `logits_scaling`, which Granite and
#: MiniCPM3 divide by and HyperCLOVA X multiplies by)
LOGIT_SCALE_ATTRIBUTES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
#: Model types whose `logits_scaling` multiplies the logits (the others divide by it)
_MULTIPLYING_LOGITS_SCALING = ("hyperclovax",)


def logit_transform(model) -> LogitTransform:
    """What `model` does to its lm_head's output before the softmax, read from its (text) config as TRL 1.16's fused
    head reads it: the scale (`logit_scale`, else `output_multiplier`, else `lm_head_multiplier`, else
    `1 / logits_scaling`, or `logits_scaling` itself for HyperCLOVA X; 1 when none is set), then the soft-cap
    `final_logit_softcapping`. A `ValueError` names the field when its value cannot be a transform."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale, source = 1.0, None
    for name in LOGIT_SCALE_ATTRIBUTES:
        if getattr(config, name, None) is not None:
            scale, source = getattr(config, name), name
            break
    softcap = getattr(config, "final_logit_softcapping", None)
    try:
        LogitTransform(scale=scale)
    except ValueError as error:
        raise ValueError(f"The model's config sets `{source}={scale!r}`: {error}") from None
    if source == "logits_scaling" and getattr(config, "model_type", None) not in _MULTIPLYING_LOGITS_SCALING:
        if scale == 0:
            raise ValueError("The model's config sets `logits_scaling=0`, which divides its logits: set it > 0.")
        scale = 1.0 / scale
    try:
        return LogitTransform(scale=scale, softcap=softcap)
    except ValueError as error:
        raise ValueError(f"The model's config sets `final_logit_softcapping={softcap!r}`: {error}") from None


def lm_head_parameters(lm_head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias the lm_head actually applies, unwrapping PEFT's `modules_to_save` copy and FSDP2 shards."""
    module = lm_head
    # PEFT `modules_to_save=["lm_head"]` wraps the head: the trained copy is the active adapter's, unless disabled
    if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
        active = [name for name in module.active_adapters if name in module.modules_to_save]
        module = (
            module.modules_to_save[active[0]] if active and not module.disable_adapters else module.original_module
        )
    if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
        raise ValueError(
            "A LoRA adapter on the lm_head is not supported: the fused head reads `lm_head.weight` directly, so the "
            "adapter would be ignored. Remove 'lm_head' from `target_modules`, or train the whole head with "
            "`modules_to_save=['lm_head']`."
        )
    weight, bias = module.weight, module.bias
    # FSDP2 keeps parameters as DTensor shards while the backbone returns plain tensors
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    return weight, bias


def gather_lm_head(weight, bias):
    """Under DeepSpeed ZeRO-3 the head is sharded and only gathered by its own forward hook, which the fused head
    never calls: gather it for the duration of the loss (TRL's helper, reused)."""
    return maybe_gather_lm_head_ctx(weight, bias)


def next_token_aligned(tensor: torch.Tensor, pre_shifted: bool, is_hidden: bool = False) -> torch.Tensor:
    """Align a per-position tensor with next-token labels: position t of the hidden states predicts label t + 1.
    Pre-shifted inputs (`shift_labels`, as context parallelism passes them) are used as they are."""
    if pre_shifted:
        return tensor
    return tensor[:, :-1] if is_hidden else tensor[:, 1:]


# The arguments the MoE causal LMs of transformers pass to their `load_balancing_loss_func`
_LOAD_BALANCING_PARAMETERS = ("gate_logits", "num_experts", "top_k", "attention_mask")


def router_load_balancing_loss(model, router_logits, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The MoE router load-balancing loss of `model`, unweighted, as its own causal-LM forward computes it from the
    backbone's router logits: with its family's `load_balancing_loss_func` (Switch Transformer's loss, which the MoE
    families of transformers share), or Mixtral's, the one TRL uses, where the family has none with the usual
    arguments. Padding is left out through `attention_mask`; padding-free batches have none, so every token counts,
    as in the model's forward."""
    loss_func = None
    for cls in type(model).__mro__:  # the model's own module first, then its bases' (a user subclass)
        candidate = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
        if candidate is not None:
            loss_func = candidate
            break
    if loss_func is None or list(inspect.signature(loss_func).parameters)[:4] != list(_LOAD_BALANCING_PARAMETERS):
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as loss_func
    config = model.config.get_text_config()
    # The causal LM keeps both counts as attributes; vision-language wrappers read them from the text config
    num_experts = getattr(model, "num_experts", None) or config.num_experts
    top_k = getattr(model, "num_experts_per_tok", None) or config.num_experts_per_tok
    return loss_func(router_logits, num_experts, top_k, attention_mask)


#: PEFT types whose forward prepends `num_virtual_tokens` positions to the caller's sequence (prefix tuning and
#: cartridges pass theirs as a KV cache instead, CPT computes its own loss)
PREPENDING_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")


def caller_sequence_length(inputs: dict[str, Any]) -> int | None:
    """The length of the sequences the caller passes (`input_ids` or `inputs_embeds`), before any PEFT prefix."""
    for key in ("input_ids", "inputs_embeds"):
        value = inputs.get(key)
        if value is not None:
            return value.shape[1]
    return None


def virtual_prefix_length(hidden_states: torch.Tensor, sequence_length: int | None) -> int:
    """How many leading positions of the backbone's `hidden_states` the caller did not pass: the virtual tokens that
    PEFT's prompt tuning and p-tuning prepend (0 otherwise, and when the caller's length is unknown)."""
    if sequence_length is None:
        return 0
    extra = hidden_states.shape[1] - sequence_length
    if extra < 0:
        raise ValueError(
            f"The backbone returned {hidden_states.shape[1]} positions for inputs of length {sequence_length}: the "
            "model's forward drops positions, which the fused head cannot align with the labels."
        )
    return extra


def _mask_name(hidden_input: str) -> str:
    """The name of the coverage mask of a hidden input: `ref_hidden` -> `ref_mask`."""
    return hidden_input.removesuffix("_hidden") + "_mask"


@dataclass
class FusedHeadOutput(ModelOutput):
    """What a forward with `loss_head=` returns: the loss, the head's metrics still on the device (`metric_sums`, as
    `fused_linear_loss(..., return_metrics="sums")` gives them: `num_tokens`, the sum of each token mean over the
    supervised tokens, a `(sum, count)` pair for each metric with its own count), and on an MoE model asked for its
    router logits the unweighted router load-balancing loss (`aux_loss`), which the caller weights and adds like
    TRL's SFTTrainer does (it is not in `loss`). With a head's `layer_hidden_states` set, the backbone's hidden
    states of those layers (`layer_hidden_states`, see `HiddenStateHead`)."""

    loss: torch.Tensor | None = None
    metric_sums: dict[str, Any] | None = None
    aux_loss: torch.Tensor | None = None
    layer_hidden_states: tuple[torch.Tensor | None, ...] | None = None


@dataclass
class LossHead:
    """A call of the fused head, built by the trainer and run inside the model's forward.

    Attributes:
        method: a method name of `hf_plugins.ops.fused_linear_loss` or a `LossMethod`.
        backend, chunk_size: passed to `fused_linear_loss`.
        num_items_in_batch: the global count of supervised tokens that the summed loss is divided by.
        token_inputs: method inputs with one entry per input position ([B, T], aligned with `input_ids`); they are
            shifted like the labels.
        hidden_inputs: method inputs shaped like the backbone's hidden states ([B, T, D], e.g. a reference model's
            hidden states, aligned with `input_ids`); they are shifted like the hidden states. When the policy's
            forward prepends virtual tokens (prompt tuning, p-tuning), the policy predicts the caller's first token
            from its last virtual token, which a hidden input has no state for: the method then also gets a `[B, T]`
            bool mask, named after the input (`ref_hidden` -> `ref_mask`), False where the input has no state.
        other_inputs: the other method inputs (per-sequence tensors, scalars, reference weights), passed as they are.
        sequence_length: the caller's sequence length (set by `forward_with_head`); the leading positions beyond it
            are virtual tokens.
        layer_hidden_states: indices of the backbone's hidden states (`output_hidden_states`: 0 is the embedding
            output, `num_hidden_layers` the last, normalised, state) to return with the loss, at the caller's positions
            (`[B, T, D]` each, not shifted; None for the indices not asked for); None: none.

    Called with `aux_loss` (an MoE model's router load-balancing loss), it returns it as it is in its output; the
    model's `logit_transform` (soft-cap, scale) applies to the logits of the loss.
    """

    method: str | LossMethod
    backend: str = "auto"
    chunk_size: int | None = None
    num_items_in_batch: Any = None
    token_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    other_inputs: dict[str, Any] = field(default_factory=dict)
    sequence_length: int | None = None
    layer_hidden_states: list[int] | None = None

    #: The head returns the MoE load-balancing loss when the model computes one (see `add_loss_head_forward`)
    uses_router_logits: ClassVar[bool] = True

    def __call__(
        self,
        hidden_states,
        labels,
        lm_head,
        pre_shifted: bool,
        aux_loss=None,
        logit_transform=PLAIN_LOGITS,
        all_hidden_states=None,
    ) -> FusedHeadOutput:
        weight, bias = lm_head_parameters(lm_head)
        virtual = virtual_prefix_length(hidden_states, self.sequence_length)
        layers = _caller_positions(all_hidden_states, virtual)
        if virtual:
            hidden, labels, token_inputs = self._past_virtual_tokens(hidden_states, labels, virtual, pre_shifted)
        else:
            hidden = next_token_aligned(hidden_states, pre_shifted, is_hidden=True)
            labels = next_token_aligned(labels, pre_shifted)
            token_inputs = {name: next_token_aligned(value, pre_shifted) for name, value in self.token_inputs.items()}
            for name, value in self.hidden_inputs.items():
                token_inputs[name] = next_token_aligned(value, pre_shifted, is_hidden=True)
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        token_inputs = {name: value.to(weight.device) for name, value in token_inputs.items()}
        with gather_lm_head(weight, bias):
            loss, metrics = fused_linear_loss(
                hidden,
                weight,
                labels,
                self.method,
                bias=bias,
                backend=self.backend,
                chunk_size=self.chunk_size,
                num_items_in_batch=self.num_items_in_batch,
                return_metrics="sums",
                logit_transform=logit_transform,
                **token_inputs,
                **self.other_inputs,
            )
        return FusedHeadOutput(loss=loss, metric_sums=metrics, aux_loss=aux_loss, layer_hidden_states=layers)

    def _past_virtual_tokens(self, hidden_states, labels, virtual: int, pre_shifted: bool):
        """Hidden states, labels and method inputs, one row per caller position t, for a forward that prepended
        `virtual` virtual tokens: the state at position `virtual - 1 + t` predicts the caller's token t (the last
        virtual token predicts the first one). The virtual positions themselves carry label -100 and are dropped."""
        if pre_shifted:
            raise ValueError(
                "Pre-shifted labels (`shift_labels`, as context parallelism passes them) cannot be aligned with the "
                "virtual tokens of prompt-learning PEFT (prompt tuning, p-tuning): train without context parallelism, "
                "or use prefix tuning or LoRA."
            )
        length = hidden_states.shape[1] - virtual
        # PEFT prepends -100 labels for the virtual tokens; labels of the caller's length are used as they are
        if labels.shape[1] == hidden_states.shape[1]:
            labels = labels[:, virtual:]
        if labels.shape[1] != length:
            raise ValueError(
                f"The labels have {labels.shape[1]} positions for {length} input positions (and {virtual} virtual "
                "tokens): pass one label per input token."
            )
        hidden = hidden_states[:, virtual - 1 : -1]
        token_inputs = dict(self.token_inputs)  # one entry per caller position: already aligned with these labels
        for name, value in self.hidden_inputs.items():
            # Position t of a second model's states predicts token t + 1: token 0 has no state there
            token_inputs[name] = torch.cat([torch.zeros_like(value[:, :1]), value[:, :-1]], dim=1)
            mask = torch.ones(value.shape[:2], dtype=torch.bool, device=value.device)
            mask[:, 0] = False
            token_inputs[_mask_name(name)] = mask
        return hidden, labels, token_inputs


def add_loss_head_forward(model) -> None:
    """Patch `model.forward` so that `model(..., labels=..., loss_head=head)` returns `head`'s output computed from
    the backbone's last hidden state, without ever applying the lm_head to all positions. Idempotent.

    On a Mixture-of-Experts model, router logits are recorded when the call or the config asks for them, as in the
    model's own forward (`output_router_logits`), and the head gets the router load-balancing loss as `aux_loss`;
    heads that compute no loss (`uses_router_logits = False`) never make the backbone record them. Every head gets
    the model's `logit_transform` (read from the config at each call; checked here, before any training). A head with
    `layer_hidden_states` set makes the backbone keep those hidden states (`output_hidden_states`) and gets them too."""
    logit_transform(model)
    if getattr(model, "_hf_plugins_loss_head", False):
        return
    previous_forward = model.forward

    # Keep the class signature: `generate` validates its model kwargs against it
    @functools.wraps(type(model).forward)
    def forward(self, *args, loss_head=None, labels=None, shift_labels=None, **kwargs):
        if loss_head is None:
            if labels is not None:
                kwargs["labels"] = labels
            if shift_labels is not None:
                kwargs["shift_labels"] = shift_labels
            return previous_forward(*args, **kwargs)
        kwargs.pop("num_items_in_batch", None)  # the head carries it; the backbone does not take it
        kwargs["use_cache"] = False
        text_config = self.config.get_text_config()
        router_logits = False
        if hasattr(text_config, "output_router_logits"):
            router_logits = kwargs.get("output_router_logits")
            router_logits = text_config.output_router_logits if router_logits is None else router_logits
            router_logits = bool(router_logits) and getattr(loss_head, "uses_router_logits", False)
            kwargs["output_router_logits"] = router_logits
        layers = getattr(loss_head, "layer_hidden_states", None)
        if layers is not None:
            # Only the asked-for states are kept (transformers' `output_hidden_states` takes a list of indices)
            kwargs["output_hidden_states"] = list(layers)
        # Looked up on each call: PEFT, FSDP and DeepSpeed replace modules after the patch
        backbone_outputs = self.base_model(*args, **kwargs)
        pre_shifted = shift_labels is not None
        head_kwargs = {"logit_transform": logit_transform(self)}
        if layers is not None:
            head_kwargs["all_hidden_states"] = backbone_outputs.hidden_states
        if router_logits:
            head_kwargs["aux_loss"] = router_load_balancing_loss(
                self, backbone_outputs.router_logits, kwargs.get("attention_mask")
            )
        return loss_head(
            backbone_outputs.last_hidden_state,
            shift_labels if pre_shifted else labels,
            self.get_output_embeddings(),
            pre_shifted,
            **head_kwargs,
        )

    model.forward = types.MethodType(forward, model)
    model._hf_plugins_loss_head = True


@dataclass
class HiddenStateOutput(ModelOutput):
    """What a forward with `loss_head=HiddenStateHead()` returns: the backbone's last hidden state (not shifted),
    the lm_head's weight and bias and the model's logit transform (its logits are
    `logit_transform(hidden_states @ weight.T + bias)`), for a second model's side of a loss (e.g. a frozen
    reference)."""

    hidden_states: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    logit_transform: LogitTransform | None = None
    layer_hidden_states: tuple[torch.Tensor | None, ...] | None = None


@dataclass
class HiddenStateHead:
    """A `loss_head` that computes no loss: it returns the hidden states at the caller's positions (the virtual
    tokens of prompt tuning and p-tuning removed) and the lm_head parameters; with `layer_hidden_states` (indices as
    for `LossHead`), those layers' hidden states too."""

    sequence_length: int | None = None
    layer_hidden_states: list[int] | None = None

    #: No loss, so no MoE load-balancing loss: an MoE backbone records no router logits for it
    uses_router_logits = False

    def __call__(
        self, hidden_states, labels, lm_head, pre_shifted: bool, logit_transform=PLAIN_LOGITS, all_hidden_states=None
    ) -> HiddenStateOutput:
        weight, bias = lm_head_parameters(lm_head)
        virtual = virtual_prefix_length(hidden_states, self.sequence_length)
        return HiddenStateOutput(
            hidden_states=hidden_states[:, virtual:],
            weight=weight,
            bias=bias,
            logit_transform=logit_transform,
            layer_hidden_states=_caller_positions(all_hidden_states, virtual),
        )


def _caller_positions(all_hidden_states, virtual: int):
    """The backbone's per-layer hidden states without the `virtual` leading positions PEFT prepended (None stays)."""
    if all_hidden_states is None:
        return None
    return tuple(None if h is None else h[:, virtual:] for h in all_hidden_states)


def forward_with_head(model, inputs: dict[str, Any], head):
    """`model(**inputs, loss_head=head)` for a model patched with `add_loss_head_forward` (possibly wrapped by PEFT,
    DDP, FSDP or DeepSpeed), with the head told the caller's sequence length so that it aligns its outputs with the
    caller's positions when PEFT prepends virtual tokens."""
    head.sequence_length = caller_sequence_length(inputs)
    return model(**inputs, loss_head=head)


def forward_hidden_states(model, inputs: dict[str, Any]) -> HiddenStateOutput:
    """Run a model patched with `add_loss_head_forward` to its last hidden state (`[B, T, D]`, aligned with
    `input_ids`, also under prompt tuning and p-tuning) without building logits; returns it with the lm_head weight
    and bias and the model's logit transform. Call under `torch.no_grad()` for a frozen reference (with PEFT, inside
    `model.disable_adapter()` to get the base model)."""
    return forward_with_head(model, inputs, HiddenStateHead())
