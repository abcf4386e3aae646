"""Configuration of `RoSTETrainer` (rotated quantisation-aware SFT)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..quantization.modules import QuantConfig
from ..quantization.prepare import ROTATION_MODES
from ..quantization.spec import QuantSpec, check_bits, check_clip_ratio
from ..utils import is_integer
from .fused_sft_config import FusedSFTConfig


@dataclass
class RoSTEConfig(FusedSFTConfig):
    r"""
    Configuration class for [`RoSTETrainer`]: every argument of [`FusedSFTConfig`] (and so of TRL's `SFTConfig`), plus
    the quantisers and rotations of RoSTE ([arXiv 2502.09003](https://arxiv.org/abs/2502.09003)). Every linear in the
    transformer blocks trains with its weight (per output channel) and its input (per token) fake-quantised, and the
    K/V cache fake-quantised per token and head; gradients pass the quantisers straight through (STE).

    Parameters:
        > Parameters that control the quantisers

        w_bits (`int`, *optional*, defaults to `4`):
            Bits of the weight quantiser, 2 to 16 (16 turns it off).
        a_bits (`int`, *optional*, defaults to `4`):
            Bits of the activation (linear input) quantiser, 2 to 16 (16 = off).
        kv_bits (`int`, *optional*, defaults to `4`):
            Bits of the K/V cache quantiser, 2 to 16 (16 = off).
        w_sym (`bool`, *optional*, defaults to `True`):
            Symmetric weight quantisation (asymmetric with a zero point when False).
        a_sym (`bool`, *optional*, defaults to `True`):
            Symmetric activation quantisation.
        kv_sym (`bool`, *optional*, defaults to `True`):
            Symmetric K/V quantisation.
        w_clip_ratio (`float`, *optional*, defaults to `1.0`):
            Fraction of each row's range the weight grid covers, in (0, 1].
        a_clip_ratio (`float`, *optional*, defaults to `1.0`):
            Clip ratio of the activation quantiser.
        kv_clip_ratio (`float`, *optional*, defaults to `1.0`):
            Clip ratio of the K/V quantiser.

        > Parameters that control the rotations

        rotations (`str`, *optional*, defaults to `"adaptive"`):
            `"adaptive"`: R1 folded into the weights, and R2/R3/R4 switched on per layer where the search on
            calibration sequences finds they lower the quantisation error; `"all"`: R1 and every R2/R3/R4;
            `"none"`: no rotation at all (plain quantisation-aware SFT with STE).
        rotation_search_samples (`int`, *optional*, defaults to `128`):
            Calibration sequences for the adaptive search, drawn (seeded by `seed`) from the training dataset.
        rotation_search_max_length (`int`, *optional*, defaults to `512`):
            Calibration sequences are truncated to this many tokens.
        rotation_seed (`int`, *optional*, defaults to `42`):
            Seed of R1's random signs.

        > Parameters that control the export

        export_quantized (`str` or `None`, *optional*, defaults to `None`):
            A folder where `train()` writes, once training ends, the quantised model (`RoSTETrainer.export_quantized`:
            int8 codes and float32 scales per quantised linear, reloaded by
            `hf_plugins.quantization.load_roste_model`). It must differ from `output_dir`, which receives the float
            model and the checkpoints.

    The search settings of the reference code are W4A4KV4, symmetric, clip 1.0, which are the defaults here; its
    training-time symmetry and clip ratios were not published, so tune them per model.
    """

    w_bits: int = field(default=4, metadata={"help": "Bits of the weight quantiser, 2..16 (16 = off)."})
    a_bits: int = field(
        default=4, metadata={"help": "Bits of the activation (linear input) quantiser, 2..16 (16 = off)."}
    )
    kv_bits: int = field(default=4, metadata={"help": "Bits of the K/V cache quantiser, 2..16 (16 = off)."})
    w_sym: bool = field(default=True, metadata={"help": "Symmetric weight quantisation (else asymmetric)."})
    a_sym: bool = field(default=True, metadata={"help": "Symmetric activation quantisation (else asymmetric)."})
    kv_sym: bool = field(default=True, metadata={"help": "Symmetric K/V quantisation (else asymmetric)."})
    w_clip_ratio: float = field(default=1.0, metadata={"help": "Clip ratio of the weight quantiser, in (0, 1]."})
    a_clip_ratio: float = field(default=1.0, metadata={"help": "Clip ratio of the activation quantiser, in (0, 1]."})
    kv_clip_ratio: float = field(default=1.0, metadata={"help": "Clip ratio of the K/V quantiser, in (0, 1]."})
    rotations: str = field(
        default="adaptive",
        metadata={
            "help": "'adaptive' (R1, then R2/R3/R4 per layer where they lower the measured quantisation error), "
            "'all' (every rotation) or 'none' (no rotation: plain QAT with STE).",
            "choices": list(ROTATION_MODES),
        },
    )
    rotation_search_samples: int = field(
        default=128, metadata={"help": "Calibration sequences from the training data for the adaptive search."}
    )
    rotation_search_max_length: int = field(
        default=512, metadata={"help": "Calibration sequences are truncated to this many tokens."}
    )
    rotation_seed: int = field(default=42, metadata={"help": "Seed of R1's random signs."})
    export_quantized: str | None = field(
        default=None,
        metadata={
            "help": "Folder where train() writes the quantised model (int8 codes + scales; reload it with "
            "hf_plugins.quantization.load_roste_model) once training ends. Not output_dir, which holds the float model."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("w_bits", "a_bits", "kv_bits"):
            check_bits(getattr(self, name), name)
        for name in ("w_clip_ratio", "a_clip_ratio", "kv_clip_ratio"):
            setattr(self, name, check_clip_ratio(getattr(self, name), name))
        for name in ("w_sym", "a_sym", "kv_sym"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}={getattr(self, name)!r}` must be True or False.")
        if self.rotations not in ROTATION_MODES:
            raise ValueError(
                f"`rotations={self.rotations!r}` is not a rotation mode: choose one of "
                f"{', '.join(map(repr, ROTATION_MODES))}."
            )
        for name in ("rotation_search_samples", "rotation_search_max_length"):
            value = getattr(self, name)
            if not is_integer(value) or value <= 0:
                raise ValueError(f"`{name}={value!r}` must be a positive integer.")
        if self.export_quantized is not None:
            self.export_quantized = os.fspath(self.export_quantized)
            export, output = Path(self.export_quantized).resolve(), Path(self.output_dir or ".").resolve()
            if export == output or output in export.parents:
                raise ValueError(
                    f"`export_quantized={self.export_quantized!r}` is (inside) `output_dir`, where the float model and "
                    "the checkpoints are saved, which would overwrite the export: choose another folder."
                )

    def quant_config(self) -> QuantConfig:
        """The three quantisers as a `hf_plugins.quantization.QuantConfig`."""
        return QuantConfig(
            weight=QuantSpec(self.w_bits, self.w_sym, self.w_clip_ratio),
            activation=QuantSpec(self.a_bits, self.a_sym, self.a_clip_ratio),
            kv=QuantSpec(self.kv_bits, self.kv_sym, self.kv_clip_ratio),
        )
