"""Model surgery for RoSTE, done before any optimizer exists: RMSNorm fusion, the R1 rotation folded into the
weights (tied embeddings untied), and the fake-quantised modules with their online R2/R3/R4 rotations.

Each step works on its own; `prepare_model_for_roste` (`hf_plugins.quantization.prepare`) runs them in order, with
the rotation search in between.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .hadamard import HadamardTransform, random_sign_hadamard_matrix
from .modules import QuantConfig, QuantLinear, convert_attention


#: `config.model_type` values whose block structure RoSTE's surgery knows
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
SITES = ("R2", "R3", "R4")


def _is_bnb_quantized(model) -> bool:
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        return True
    if getattr(model.config, "quantization_config", None) is not None:
        return True
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())


def check_supported_model(model) -> None:
    """Raise a `ValueError` unless `model` is a Llama- or Qwen2-style causal LM in floating point."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"RoSTE does not support the architecture {model_type!r}: its model surgery (norm fusion, rotations, "
            f"quantised attention) is written for {', '.join(repr(t) for t in SUPPORTED_MODEL_TYPES)} causal LMs "
            "(`LlamaForCausalLM`, `Qwen2ForCausalLM` and models with their block structure)."
        )
    if _is_bnb_quantized(model):
        raise ValueError(
            "The model is already quantised (bitsandbytes or another `quantization_config`): RoSTE trains all "
            "weights in full precision with fake quantisation. Load the model without `quantization_config`."
        )
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise ValueError("RoSTE expects a causal LM with `model.model.layers` (Llama/Qwen2 layout).")


def decoder_layers(model):
    """The decoder blocks of a Llama/Qwen2-style causal LM (`model.model.layers`)."""
    return model.model.layers


def _head_dim(model) -> int:
    attention = decoder_layers(model)[0].self_attn
    return attention.head_dim


# ------------------------------------------------------------------------------------------------- norm fusion


@torch.no_grad()
def _scale_input_columns(linear: nn.Linear, scale: torch.Tensor) -> None:
    w = linear.weight
    w.copy_((w.to(torch.float64) * scale.to(torch.float64)).to(w.dtype))


@torch.no_grad()
def fuse_norms(model) -> None:
    """Fold every RMSNorm scale into the linears that read its output (q/k/v after the input norm, gate/up after the
    post-attention norm, the lm_head after the final norm) and set the scales to 1 (frozen). Exact in float."""
    for layer in decoder_layers(model):
        norm = layer.input_layernorm
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            _scale_input_columns(linear, norm.weight)
        norm.weight.fill_(1.0)
        norm = layer.post_attention_layernorm
        for linear in (layer.mlp.gate_proj, layer.mlp.up_proj):
            _scale_input_columns(linear, norm.weight)
        norm.weight.fill_(1.0)
    untie_embeddings(model)
    _scale_input_columns(model.lm_head, model.model.norm.weight)
    model.model.norm.weight.fill_(1.0)
    freeze_norms(model)


def freeze_norms(model) -> None:
    for layer in decoder_layers(model):
        layer.input_layernorm.weight.requires_grad_(False)
        layer.post_attention_layernorm.weight.requires_grad_(False)
    model.model.norm.weight.requires_grad_(False)


def untie_embeddings(model) -> bool:
    """Give the lm_head its own copy of a tied embedding matrix (R1 then rotates both sides independently);
    `config.tie_word_embeddings` becomes False. Returns whether they were tied."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return tied


# ----------------------------------------------------------------------------------------------------------- R1


@torch.no_grad()
def rotate_r1(model, seed: int = 42) -> None:
    """Fold the residual-stream rotation `R1 = diag(s) H` (random signs `s`, normalised Hadamard `H` of order
    hidden_size) into the weights: `E -> E R1` (embeddings), `W -> W R1` for the linears reading the residual stream
    (q/k/v/gate/up, lm_head), `W -> R1ᵀ W`, `b -> b R1` for those writing it (o/down). Computed in float64. Needs the
    norm scales fused first (`fuse_norms`): RMSNorm commutes with an orthogonal map only without its scale."""
    norms = [model.model.norm]
    for layer in decoder_layers(model):
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    for norm in norms:
        if not torch.all(norm.weight == 1):
            raise ValueError("rotate_r1 needs unit RMSNorm scales: call fuse_norms(model) first.")
    embed = model.get_input_embeddings().weight
    r1 = random_sign_hadamard_matrix(embed.shape[1], seed=seed).to(embed.device)

    def right(t: torch.Tensor) -> None:  # t -> t R1
        t.copy_((t.to(torch.float64) @ r1).to(t.dtype))

    def left(t: torch.Tensor) -> None:  # W -> R1ᵀ W
        t.copy_((r1.t() @ t.to(torch.float64)).to(t.dtype))

    untie_embeddings(model)
    right(embed)
    right(model.lm_head.weight)
    for layer in decoder_layers(model):
        attention, mlp = layer.self_attn, layer.mlp
        for linear in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj):
            right(linear.weight)
        for linear in (attention.o_proj, mlp.down_proj):
            left(linear.weight)
            if linear.bias is not None:
                right(linear.bias)


# ------------------------------------------------------------------------------------------- quantised modules


def _switch_to_supported_attention(model, quant: QuantConfig) -> None:
    implementation = model.config._attn_implementation
    if implementation in (None, "eager", "sdpa"):
        return
    warnings.warn(
        f"RoSTE fake-quantises the K/V cache and rotates Q/K inside the attention module, which it has tested with "
        f"the 'eager' and 'sdpa' attention implementations only; the model uses {implementation!r}: switching it to "
        "'eager'. Load the model with `attn_implementation='eager'` (or 'sdpa') to silence this warning.",
        stacklevel=3,
    )
    model.set_attn_implementation("eager")


def patch_model(model, quant: QuantConfig) -> None:
    """Swap every block linear for a `QuantLinear` and every attention for RoSTE's (all rotation switches off)."""
    config = model.config
    head_dim = _head_dim(model)
    r2r3 = HadamardTransform(head_dim)
    r4 = HadamardTransform(config.intermediate_size)
    _switch_to_supported_attention(model, quant)
    for layer in decoder_layers(model):
        attention, mlp = layer.self_attn, layer.mlp
        QuantLinear.convert(attention.q_proj, "q", quant)
        QuantLinear.convert(attention.k_proj, "k", quant)
        QuantLinear.convert(attention.v_proj, "v", quant, head_dim=head_dim, rotation=r2r3)
        QuantLinear.convert(attention.o_proj, "o", quant, head_dim=head_dim, rotation=r2r3)
        QuantLinear.convert(mlp.gate_proj, "gate", quant)
        QuantLinear.convert(mlp.up_proj, "up", quant)
        QuantLinear.convert(mlp.down_proj, "down", quant, rotation=r4)
        convert_attention(attention, quant.kv, r2r3)


def set_rotations(model, in_block: dict) -> None:
    """Set the per-layer switches: `in_block[str(layer)] = {"is_rotate_R2": bool, "is_rotate_R3": ..., ...}` (a
    missing layer or site is off), and record them in `model.config.rotation_config` when there is one."""
    for index, layer in enumerate(decoder_layers(model)):
        flags = in_block.get(str(index), {})
        r2, r3, r4 = (bool(flags.get(f"is_rotate_{site}", False)) for site in SITES)
        layer.self_attn.v_proj.rotate = r2
        layer.self_attn.o_proj.rotate = r2
        layer.self_attn.rotate_r3 = r3
        layer.mlp.down_proj.rotate = r4
    saved = getattr(model.config, "rotation_config", None)
    if saved:
        model.config.rotation_config = {**saved, "in_block_rotation": current_rotations(model)}


def current_rotations(model) -> dict:
    """The per-layer switches as the modules hold them (the `in_block_rotation` format)."""
    return {
        str(index): {
            "is_rotate_R2": bool(layer.self_attn.o_proj.rotate),
            "is_rotate_R3": bool(layer.self_attn.rotate_r3),
            "is_rotate_R4": bool(layer.mlp.down_proj.rotate),
        }
        for index, layer in enumerate(decoder_layers(model))
    }


def uniform_rotations(model, on: bool) -> dict:
    return {str(i): {f"is_rotate_{site}": on for site in SITES} for i in range(len(decoder_layers(model)))}


def clear_weight_caches(model) -> None:
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.clear_cache()


def is_prepared(model) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())
