"""RoSTE's preparation of a model, in place and before any optimizer exists: the surgery steps of
`hf_plugins.quantization.surgery` in order, with the rotation search (`hf_plugins.quantization.search`) in between.

`prepare_model_for_roste(model, quant, rotations=..., calibration=...)` records what it did in
`model.config.rotation_config` and `model.config.roste_quantization`. A model saved afterwards (`save_pretrained`,
a Trainer checkpoint) is an ordinary float checkpoint of the rotated model, whose plain forward equals the original
model's; passing it to `prepare_model_for_roste` again re-applies the saved rotation config instead of rotating twice.
"""

from __future__ import annotations

from ..utils import get_logger
from .modules import QuantConfig
from .search import search_rotations
from .surgery import (
    check_supported_model,
    freeze_norms,
    fuse_norms,
    is_prepared,
    patch_model,
    rotate_r1,
    set_rotations,
    uniform_rotations,
)


logger = get_logger(__name__)

#: Values of `rotations` (and of `RoSTEConfig.rotations`)
ROTATION_MODES = ("adaptive", "all", "none")


def prepare_model_for_roste(
    model,
    quant: QuantConfig,
    rotations: str = "adaptive",
    calibration=None,
    seed: int = 42,
) -> dict:
    """RoSTE's surgery, in place, before the optimizer exists. Returns the rotation config (also saved as
    `model.config.rotation_config`; the quantisers as `model.config.roste_quantization`).

    Args:
        model: a Llama- or Qwen2-style causal LM in floating point.
        quant (`QuantConfig`): the weight, activation and K/V quantisers.
        rotations (`str`): `"adaptive"` (R1, then R2/R3/R4 per layer where the search on `calibration` finds they
            lower the quantisation error), `"all"` (R1 and R2/R3/R4 everywhere) or `"none"` (no rotation at all:
            plain quantisation-aware training with STE).
        calibration: for `"adaptive"`, an iterable of `input_ids` tensors (`[T]` or `[1, T]`).
        seed (`int`): seed of R1's random signs.

    A model whose config already has a `rotation_config` (saved after this function) is not rotated again: its saved
    switches are applied.
    """
    if rotations not in ROTATION_MODES:
        raise ValueError(f"`rotations={rotations!r}` must be one of {', '.join(map(repr, ROTATION_MODES))}.")
    check_supported_model(model)
    if is_prepared(model):
        raise ValueError("The model already has RoSTE's quantised modules: prepare it only once.")
    saved = getattr(model.config, "rotation_config", None)
    if saved:
        logger.info("RoSTE: the model config has a rotation_config: re-applying it, not rotating again.")
        _reapply_saved_rotations(model, quant, saved)
        return saved

    rotate_residual = rotations != "none"
    if rotate_residual:
        fuse_norms(model)
        rotate_r1(model, seed=seed)
    patch_model(model, quant)
    if rotations == "adaptive":
        if calibration is None:
            raise ValueError("`rotations='adaptive'` needs calibration sequences for the rotation search.")
        in_block = search_rotations(model, calibration)
    else:
        in_block = uniform_rotations(model, rotations == "all")
    set_rotations(model, in_block)
    rotation_config = {
        "is_rotate_R1": rotate_residual,
        "r1_seed": seed,
        "mode": rotations,
        "in_block_rotation": in_block,
    }
    model.config.rotation_config = rotation_config
    model.config.roste_quantization = quant.to_dict()
    return rotation_config


def _reapply_saved_rotations(model, quant: QuantConfig, rotation_config: dict) -> None:
    """Put RoSTE's modules back into a model saved after `prepare_model_for_roste`, whose weights already hold R1
    (and the fused norms): swap in the quantised modules and set the saved R2/R3/R4 switches, rotating nothing."""
    patch_model(model, quant)
    if rotation_config.get("is_rotate_R1"):
        freeze_norms(model)
    set_rotations(model, rotation_config.get("in_block_rotation", {}))
    model.config.roste_quantization = quant.to_dict()
