"""`LiNeSCallback`: at the end of training, write a LiNeS-scaled copy of the final model next to it (the math:
`hf_plugins.merging.lines`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from transformers import TrainerCallback

from ..merging import DEFAULT_LAYER_PATTERN, MergeError, lines_scale
from ..utils import get_logger, is_real


logger = get_logger(__name__)


def _base_of(model) -> str | None:
    """The folder the trained model (or its adapter) was loaded from."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        adapter = getattr(model, "active_adapter", None) or next(iter(peft_config))
        return peft_config[adapter].base_model_name_or_path
    return getattr(getattr(model, "config", None), "_name_or_path", None)


class LiNeSCallback(TrainerCallback):
    """Write a LiNeS-edited copy of the model when training ends: the update of block l scaled by
    alpha + beta * l / (L - 1), so shallow layers move back toward the base (less forgetting).

    Works for full fine-tunes and LoRA adapters (the copy is then an adapter), in one process or under DDP (the main
    process writes it). The model folders saved by the trainer are left as they are.

    Parameters:
        alpha (`float`):
            Factor of the first block, in [0, 1].
        beta (`float`, *optional*):
            Increase of the factor to the last block; defaults to `1 - alpha`.
        outside (`"alpha"` or `float`, *optional*, defaults to `"alpha"`):
            Factor of the parameters outside the blocks (see [`~hf_plugins.merging.lines_scale`]).
        base_model (`str`, *optional*):
            Local folder of the pretrained model; defaults to the folder the model (or its adapter's base) was loaded
            from.
        output_dir (`str`, *optional*):
            Folder of the copy; defaults to `<output_dir>/lines-alpha<alpha>`.
        layer_pattern (`str`, *optional*):
            Regex whose first group is a parameter's block index.
    """

    def __init__(
        self,
        alpha: float,
        beta: float | None = None,
        outside: str | float = "alpha",
        base_model: str | None = None,
        output_dir: str | None = None,
        layer_pattern: str = DEFAULT_LAYER_PATTERN,
    ):
        if not is_real(alpha) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"LiNeSCallback: alpha={alpha!r} must be a number in [0, 1]")
        self.alpha, self.beta, self.outside = alpha, beta, outside
        self.base_model, self.output_dir, self.layer_pattern = base_model, output_dir, layer_pattern
        self.written: Path | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # a base that cannot be read would only show once training is over: refuse it now
        base = self.base_model or _base_of(model)
        if not base or not Path(base).is_dir():
            raise ValueError(
                f"LiNeSCallback: the base model {base!r} is not a local folder; pass base_model= (the folder of the "
                "pretrained model the run started from)"
            )
        self.base_model = base

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero:
            return
        output = self.output_dir or os.path.join(args.output_dir, f"lines-alpha{self.alpha:g}")
        os.makedirs(args.output_dir, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".lines-final-", dir=args.output_dir) as final:
            model.save_pretrained(final)
            if processing_class is not None:
                processing_class.save_pretrained(final)
            try:
                self.written = lines_scale(
                    self.base_model,
                    final,
                    self.alpha,
                    self.beta,
                    self.outside,
                    output_dir=output,
                    layer_pattern=self.layer_pattern,
                    overwrite=True,
                    progress=False,
                )
            except MergeError as error:
                raise ValueError(f"LiNeSCallback: {error}") from None
        logger.info(f"LiNeS copy (alpha={self.alpha:g}) written to {self.written}")
