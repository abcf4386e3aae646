"""`HFTConfig`: the fields of HFT (Half Fine-Tuning), mixed into any trainer config (`with_hft(ConfigClass)`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..callbacks.hft import BALANCES, REDRAWS, check_hft_settings, check_redraw_possible


@dataclass
class HFTConfig:
    r"""
    The fields of HFT (Half Fine-Tuning, arXiv 2404.18466). A mixin: combine it with a trainer config through
    `with_hft(FusedSFTConfig)`, `with_hft(SFTConfig)`, `with_hft(DPOConfig)`, `with_hft(GRPOConfig)`, ... (or
    `with_hft(TrainerClass).config_class`), which adds these fields to every field of that config.

    Before training, HFT freezes `hft_ratio` of each decoder layer's attention projections, feed-forward projections
    and norms (2 of {Q, K, V, O}, 2 of {gate, up, down} in half the layers and 1 in the others, 1 of 2 norms at 0.5);
    the embeddings, the final norm and the lm_head stay trainable. With LoRA, half of the adapter modules are frozen
    by the same rule.

    Parameters:
        > Parameters that control HFT

        hft_ratio (`float`, *optional*, defaults to `0.5`):
            Fraction of each category frozen, in (0, 1); the paper's value is 0.5.
        hft_seed (`int` or `None`, *optional*, defaults to `None`):
            Seed of the selection (the same on every process); `None` uses `seed`. The paper draws a new selection
            per training stage: give each stage its own seed.
        hft_balance (`str`, *optional*, defaults to `"count"`):
            `"count"`: the paper's rule, uniform among the subsets of each category's count. `"params"`: the same
            counts, among the subsets closest to the count's share of the parameters (with grouped-query attention,
            one of Q/O and one of K/V, half of the attention parameters).
        hft_redraw (`str`, *optional*, defaults to `"stage"`):
            `"stage"`: one selection for the whole run (the paper). `"epoch"`: a new selection at the start of every
            epoch after the first, the optimizer state of the tensors that change status dropped; one process, no
            FSDP or DeepSpeed.
    """

    hft_ratio: float = field(
        default=0.5, metadata={"help": "Fraction of each category (attention, feed-forward, norms) frozen, in (0, 1)."}
    )
    hft_seed: int | None = field(
        default=None, metadata={"help": "Seed of the selection (a new one per training stage); None: seed."}
    )
    hft_balance: str = field(
        default="count",
        metadata={
            "help": "'count' (the paper's rule) or 'params' (the same counts, closest to half of the parameters).",
            "choices": list(BALANCES),
        },
    )
    hft_redraw: str = field(
        default="stage",
        metadata={
            "help": "'stage' (one selection per run, the paper) or 'epoch' (a new one every epoch; one process).",
            "choices": list(REDRAWS),
        },
    )

    def __post_init__(self):
        # before the base config's checks, which may need the engine installed (DeepSpeed) or a GPU (bf16)
        check_hft_settings(self.hft_ratio, self.hft_balance, self.hft_redraw, prefix="hft_")
        check_redraw_possible(self, self.hft_redraw, count_processes=False)
        super().__post_init__()
