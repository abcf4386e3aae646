"""Configuration of `TLTrainer` (TL-Training: tool-use SFT with key-token weights and erroneous-call masking)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.tool_calls import check_error_patterns, check_max_weight
from .fused_sft_config import FusedSFTConfig


WEIGHT_NORMALIZATIONS = ("sample", "token")


@dataclass
class TLConfig(FusedSFTConfig):
    r"""
    Configuration class for [`TLTrainer`]: every argument of [`FusedSFTConfig`] (and so of TRL's `SFTConfig`), plus
    the settings of TL-Training ([arXiv 2412.15495](https://huggingface.co/papers/2412.15495)) for tool-calling
    conversations in the `messages` + `tools` format.

    Parameters:
        > Parameters that control the token weights (computed during dataset preparation)

        pkt (`bool`, *optional*, defaults to `True`):
            Prioritise key tokens: in each trained assistant turn that calls tools, the first token of each called
            tool's name and each token where that name first diverges from another declared tool name sharing a token
            prefix weigh `clip(n_other / n_key, 1, max_weight)`; every other token weighs 1.
        max_weight (`float`, *optional*, defaults to `9.0`):
            Upper clip of the key-token weight, >= 1 (the paper's value is 9).
        mae (`bool`, *optional*, defaults to `True`):
            Mitigate adverse effects: an assistant turn is trained only if it is the last message or if the tool
            responses right after it contain no error pattern. Erroneous calls (and assistant turns followed by a user
            message) stay in the context of later turns but are not targets. `False` trains every assistant turn.
        error_patterns (`list[str]` or `None`, *optional*, defaults to `None`):
            MAE's error patterns; `None` uses the official list (`hf_plugins.data.DEFAULT_ERROR_PATTERNS`). A tool
            response is erroneous if it contains a pattern once both are lowercased and stripped of every character
            that is not a letter or a digit.

        > Parameters that control the loss

        weight_normalization (`str`, *optional*, defaults to `"sample"`):
            `"sample"`: each sequence's loss is `sum_t w_t l_t / sum_t w_t` over its trained tokens, and the batch loss
            is the mean over sequences (the official code's normalisation; exact under gradient accumulation and data
            parallelism). `"token"`: `sum_t w_t l_t / N` with `N` the number of trained tokens in the batch (TRL's
            token-level normalisation, so longer sequences count more).

    TL-Training trains assistant turns only, located by the `{% generation %}` markers of the chat template, whatever
    `assistant_only_loss` says. It defaults to `True` here so that a training template with those markers is swapped in
    for the models TRL or `hf_plugins.chat_templates` knows; set it to `False` for an already tokenized dataset (with
    `labels` and `token_weights`), which TRL refuses with `assistant_only_loss=True`. `loss_type` must keep its
    default.
    """

    pkt: bool = field(
        default=True,
        metadata={"help": "Weigh the key tokens of each tool call (tool-name decision tokens) by PKT's rule."},
    )
    max_weight: float = field(
        default=9.0,
        metadata={"help": "Upper clip of the key-token weight clip(n_other / n_key, 1, max_weight); >= 1."},
    )
    mae: bool = field(
        default=True,
        metadata={
            "help": "Train only assistant turns that are the last message or whose tool responses hold no error "
            "pattern (MAE); erroneous calls stay in the context."
        },
    )
    error_patterns: list[str] | None = field(
        default=None,
        metadata={"help": "MAE's error patterns (None: the official list); matched lowercased, alphanumerics only."},
    )
    weight_normalization: str = field(
        default="sample",
        metadata={
            "help": "'sample': per-sequence sum(w l) / sum(w), averaged over sequences (official). 'token': "
            "sum(w l) / number of trained tokens.",
            "choices": list(WEIGHT_NORMALIZATIONS),
        },
    )
    assistant_only_loss: bool = field(
        default=True,
        metadata={
            "help": "Swaps in a chat template with generation markers for the models TRL or hf-plugins knows. "
            "TL-Training trains assistant turns only either way; set False for an already tokenized dataset."
        },
    )

    _loss_types = ("nll",)
    _loss_type_replaced_by = (
        "TL-Training's loss is the weighted NLL of its token weights. Leave `loss_type` at its default."
    )

    def __post_init__(self):
        self.max_weight = check_max_weight(self.max_weight)
        if self.weight_normalization not in WEIGHT_NORMALIZATIONS:
            raise ValueError(
                f"`weight_normalization={self.weight_normalization!r}` is not supported: choose 'sample' "
                "(per-sequence sum(w l) / sum(w), the official code's) or 'token' (sum(w l) / number of trained "
                "tokens)."
            )
        if self.error_patterns is not None:
            self.error_patterns = list(check_error_patterns(self.error_patterns))
        for name in ("pkt", "mae"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        super().__post_init__()
