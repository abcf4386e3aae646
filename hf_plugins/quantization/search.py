"""RoSTE's adaptive rotation search: for each layer and each online rotation site (R2, R3, R4), keep the rotation
only where it lowers the measured quantisation error.

Two no-grad forward passes over the calibration sequences, with the quantisers of the prepared model (R1 already
folded in): A with every R2/R3/R4 off, B with all of them on. At each site the error is the sum, over the quantisers
whose input that rotation changes, of the mean squared quantisation error `mean((Q(t) - t)^2)` of the tensor `t` fed
to the quantiser:

- R2 (layer ℓ): the value projection's weight, the V cache, the output projection's weight and its input;
- R3: the K cache;
- R4: the down projection's weight and its input.

The rotation is on iff `E_B < E_A` (a tie is off). Each sequence runs alone (no padding enters the statistics).
"""

from __future__ import annotations

import torch

from .modules import recording_quantization_errors
from .surgery import SITES, decoder_layers, set_rotations, uniform_rotations


def _site_errors(model) -> dict[str, dict[str, float]]:
    errors = {}
    for index, layer in enumerate(decoder_layers(model)):
        attention, mlp = layer.self_attn, layer.mlp
        v, o, down = attention.v_proj.record, attention.o_proj.record, mlp.down_proj.record
        errors[str(index)] = {
            "R2": v["weight"].mean + attention.record["v"].mean + o["weight"].mean + o["input"].mean,
            "R3": attention.record["k"].mean,
            "R4": down["weight"].mean + down["input"].mean,
        }
    return errors


@torch.no_grad()
def measure_site_errors(model, calibration, in_block: dict) -> dict[str, dict[str, float]]:
    """Per layer and site, the quantisation error (see the module docstring) over `calibration` (an iterable of
    `input_ids` tensors) with the rotation switches `in_block`."""
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    set_rotations(model, in_block)
    try:
        with recording_quantization_errors(model):
            seen = 0
            for input_ids in calibration:
                input_ids = torch.as_tensor(input_ids).reshape(1, -1).to(device)
                if input_ids.shape[1] == 0:
                    continue
                model.model(input_ids=input_ids, use_cache=False)
                seen += 1
            if seen == 0:
                raise ValueError("The rotation search got no calibration sequence.")
            return _site_errors(model)
    finally:
        model.train(was_training)


def search_rotations(model, calibration, return_errors: bool = False):
    """Decide R2/R3/R4 per layer on `calibration` (a list of `input_ids` tensors). Returns the `in_block_rotation`
    dict (`{"0": {"is_rotate_R2": bool, ...}, ...}`), and with `return_errors=True` also the errors of both runs."""
    calibration = list(calibration)
    errors_off = measure_site_errors(model, calibration, uniform_rotations(model, False))
    errors_on = measure_site_errors(model, calibration, uniform_rotations(model, True))
    decision = {
        layer: {f"is_rotate_{site}": bool(errors_on[layer][site] < errors_off[layer][site]) for site in SITES}
        for layer in errors_off
    }
    set_rotations(model, decision)
    if return_errors:
        return decision, {"off": errors_off, "on": errors_on}
    return decision
