"""`UDSConfig`: the fields of UDS online batch selection, mixed into any trainer config (`with_uds(ConfigClass)`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..callbacks.uds import MODES, check_uds_settings, settings_from_config


@dataclass
class UDSConfig:
    r"""
    The fields of UDS (Utility-Diversity Sampling, arXiv 2510.16882) online batch selection. A mixin: combine it with
    a trainer config through `with_uds(FusedSFTConfig)`, `with_uds(ASFTConfig)`, `with_uds(SFTConfig)`, ... (or
    `with_uds(TrainerClass).config_class`), which adds these fields to every field of that config.

    Each micro-batch of `per_device_train_batch_size` (B) examples is a set of candidates; UDS trains on the
    `uds_keep` (K) with the largest `||logits||_* + uds_alpha * mean distance(sketch, memory)`.

    Parameters:
        > Parameters that control UDS selection

        uds_keep (`int`, *optional*, defaults to `1`):
            K, examples kept from each candidate micro-batch; must be smaller than `per_device_train_batch_size`.
            The reference keeps 1 of 4 (25% of the examples seen are trained on).
        uds_alpha (`float`, *optional*, defaults to `1.5e-3`):
            Weight of the inter-sample diversity (mean L2 distance of the sketch to the memory) against the nuclear
            norm; the reference's script value (its trainer's default is 2.5e-3). Raw scales, no standardisation.
        uds_memory_size (`int`, *optional*, defaults to `1024`):
            Capacity of the FIFO memory of selected examples' sketches (per process).
        uds_sketch_rows (`int`, *optional*, defaults to `8`):
            r1, time frequencies of the sketch.
        uds_sketch_cols (`int`, *optional*, defaults to `128`):
            r2, vocabulary frequencies of the sketch; a sketch has r1 * r2 entries.
        uds_sketch_length (`int` or `None`, *optional*, defaults to `None`):
            T, the length every example's logits are zero-padded to before the sketch's time transform; must be at
            least the longest padded batch. `None`: `max_length` (512 if that is None). The reference uses its cutoff
            length, 512.
        uds_start_step (`int`, *optional*, defaults to `0`):
            Optimizer step from which UDS selects; before it every candidate is trained on.
        uds_mask_padding (`bool`, *optional*, defaults to `True`):
            Score each example on its own tokens only: padding rows are dropped and the rest moved to the front, so
            scores do not depend on what else is in the batch. `False` reproduces the reference, which scores every
            row of the padded batch (padding included).
        uds_mode (`str`, *optional*, defaults to `"uds"`):
            `"uds"` (select by score) or `"random"` (keep K at random, the baseline; no scoring pass).
        uds_seed (`int` or `None`, *optional*, defaults to `None`):
            Seed of the sketch constants (the same on every process) and of the random mode (plus the process index);
            `None` uses `seed`.
    """

    uds_keep: int = field(
        default=1,
        metadata={"help": "K, examples kept from each candidate micro-batch (per_device_train_batch_size, B); K < B."},
    )
    uds_alpha: float = field(
        default=1.5e-3,
        metadata={"help": "Weight of the inter-sample diversity (mean sketch distance to the memory); >= 0."},
    )
    uds_memory_size: int = field(
        default=1024, metadata={"help": "Capacity of the FIFO memory of selected examples' sketches (per process)."}
    )
    uds_sketch_rows: int = field(default=8, metadata={"help": "r1, time frequencies of the sketch."})
    uds_sketch_cols: int = field(default=128, metadata={"help": "r2, vocabulary frequencies of the sketch."})
    uds_sketch_length: int | None = field(
        default=None,
        metadata={"help": "T, length the logits are zero-padded to for the sketch; None: max_length (or 512)."},
    )
    uds_start_step: int = field(
        default=0,
        metadata={"help": "Optimizer step from which UDS selects; before it, every candidate is trained on."},
    )
    uds_mask_padding: bool = field(
        default=True,
        metadata={
            "help": "Score each example on its own tokens (drop padding rows). False reproduces the reference, which "
            "scores the padded rows too."
        },
    )
    uds_mode: str = field(
        default="uds",
        metadata={
            "help": "'uds' (select by score) or 'random' (keep K at random: the baseline).",
            "choices": list(MODES),
        },
    )
    uds_seed: int | None = field(
        default=None, metadata={"help": "Seed of the sketch constants and the random mode; None: seed."}
    )

    def __post_init__(self):
        super().__post_init__()
        check_uds_settings(settings_from_config(self), self.per_device_train_batch_size)
        for name in ("packing", "padding_free"):
            if getattr(self, name, False):
                raise ValueError(
                    f"UDS scores each example of a `[B, N]` batch separately, which `{name}=True` makes impossible "
                    f"(the examples are concatenated into one row): set `{name}=False`."
                )
