"""Export of a RoSTE-trained model, and its reload with exactly the training-time forward.

`export_roste(model, path)`:

1. merges the weight rotations into the weights: R2 into the value projection (output side, per head, bias too) and
   the output projection (input side), R4 into the down projection (`W H`);
2. round-to-nearest quantises every block linear's (merged) weight with the trained quantiser (per output channel),
   which is exactly the weight the training forward used;
3. saves `model.safetensors` with, per quantised linear, `<name>.weight` (the integer codes as int8, one per byte),
   `<name>.weight_scale` (float32, `[out, 1]`) and, asymmetric only, `<name>.weight_zero`; every other tensor
   (embeddings, lm_head, norms, biases) in the model's dtype; and `config.json` with `rotation_config` (switches and
   `"weights_merged": true`) and `roste_quantization` (bits, symmetry, clip ratios).

`load_roste_model(path)` rebuilds the model from the config, dequantises the codes (`scale * (code - zero)`, the
training-time arithmetic), and patches in the quantised modules with the weights marked as merged and already on
the grid: what remains online is what a deployment would run at inference, namely the R3 (Q/K) and R4 (down-proj
input) Hadamard transforms, per-token activation fake quantisation and per-token-per-head K/V fake quantisation.
"""

from __future__ import annotations

import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .modules import QuantConfig, QuantLinear
from .quantizer import dequantize, quantize_to_grid
from .surgery import current_rotations, freeze_norms, patch_model, set_rotations


SAFETENSORS_NAME = "model.safetensors"


def _require_prepared(model) -> None:
    if getattr(model.config, "rotation_config", None) is None or not any(
        isinstance(m, QuantLinear) for m in model.modules()
    ):
        raise ValueError(
            "export_roste needs a model prepared by `prepare_model_for_roste` (or trained by RoSTETrainer)."
        )


@torch.no_grad()
def export_roste(model, path: str | os.PathLike, tokenizer=None) -> str:
    """Write the merged, RTN-quantised model to `path` (see the module docstring); returns `path`."""
    _require_prepared(model)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        module = quantized.get(module_name)
        if module is None:
            tensors[name] = tensor.detach().contiguous().cpu()
            continue
        if leaf == "bias":
            bias = module.effective_bias()
            tensors[name] = bias.detach().contiguous().cpu()
            continue
        w_eff = module.weight.detach() if module.weights_merged else module.rotate_weight(module.weight.detach())
        if module.weight_spec.enabled and not module.weights_merged:
            codes, scale, zero = quantize_to_grid(w_eff, module.weight_spec)
            tensors[name] = codes.to(torch.int8).contiguous().cpu()
            tensors[f"{name}_scale"] = scale.to(torch.float32).contiguous().cpu()
            if zero is not None:
                tensors[f"{name}_zero"] = zero.to(torch.float32).contiguous().cpu()
        else:
            tensors[name] = w_eff.contiguous().cpu()
    save_file(tensors, os.path.join(path, SAFETENSORS_NAME), metadata={"format": "pt", "roste": "1"})

    config = model.config.__class__.from_dict(model.config.to_dict())
    config.rotation_config = {
        **model.config.rotation_config,
        "in_block_rotation": current_rotations(model),
        "weights_merged": True,
    }
    config.roste_quantization = {**model.config.roste_quantization, "weight_format": "int8_codes"}
    config.tie_word_embeddings = False
    config.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@torch.no_grad()
def load_roste_model(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device=None, attn_implementation: str | None = None
):
    """Load a model written by `export_roste`: the same forward as the model had when it was exported."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.fspath(path)
    config = AutoConfig.from_pretrained(path)
    rotation_config = getattr(config, "rotation_config", None)
    quant_dict = getattr(config, "roste_quantization", None)
    if not rotation_config or not quant_dict or not rotation_config.get("weights_merged"):
        raise ValueError(f"{path!r} is not a RoSTE export (no merged `rotation_config` / `roste_quantization`).")
    quant = QuantConfig.from_dict(quant_dict)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    with safe_open(os.path.join(path, SAFETENSORS_NAME), framework="pt") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}
    target_dtype = dtype or next(t.dtype for k, t in stored.items() if t.is_floating_point() and "_scale" not in k)
    state = {}
    for key, tensor in stored.items():
        if key.endswith("_scale") or key.endswith("_zero"):
            continue
        if f"{key}_scale" in stored:
            tensor = dequantize(tensor, stored[f"{key}_scale"], stored.get(f"{key}_zero"), dtype=target_dtype)
        state[key] = tensor.to(target_dtype)
    model.to(target_dtype)
    model.load_state_dict(state, strict=True)
    patch_model(model, quant)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.weights_merged = True
    if rotation_config.get("is_rotate_R1"):
        freeze_norms(model)
    set_rotations(model, rotation_config.get("in_block_rotation", {}))
    model.eval()
    return model.to(device) if device is not None else model
