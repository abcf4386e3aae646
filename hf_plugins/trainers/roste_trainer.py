"""`RoSTETrainer`: RoSTE (arXiv 2502.09003), rotated quantisation-aware SFT, as a drop-in `SFTTrainer`.

Everything RoSTE changes happens to the model, once, in `__init__`, after TRL has loaded the model and prepared the
datasets and before the optimizer exists (the Trainer builds it in `train()`): RMSNorm scales are fused into the
linears, the residual-stream rotation R1 is folded into the weights (tied embeddings are untied), every block linear
becomes a weight + activation fake-quantised `QuantLinear`, the attention fake-quantises K/V, and the online R2/R3/R4
rotations are switched on per layer by the adaptive search on calibration sequences from the training data. The loss
is then plain SFT through the fused head of `FusedSFTTrainer` (the embeddings and the lm_head are not quantised).
"""

from __future__ import annotations

import json
import os
import random

import torch
from transformers import PreTrainedModel

from ..quantization.export import export_roste
from ..quantization.prepare import prepare_model_for_roste
from ..quantization.surgery import check_supported_model, set_rotations
from ..utils import get_logger
from .fused_sft_trainer import FusedSFTTrainer
from .roste_config import RoSTEConfig


logger = get_logger(__name__)


class RoSTETrainer(FusedSFTTrainer):
    """
    Trainer for RoSTE's quantisation-aware full fine-tuning of Llama- and Qwen2-style models, a drop-in replacement for
    `trl.SFTTrainer`: it takes exactly the arguments of `SFTTrainer`; pass a [`RoSTEConfig`] as `args` to set the
    quantisers and rotations.

    After `train()`, `export_quantized(path)` writes the merged, round-to-nearest quantised model
    (`hf_plugins.quantization.load_roste_model` reloads it with the training-time forward); with
    `RoSTEConfig(export_quantized=path)` (`hf-plugins roste --export_quantized path`) `train()` does it itself.
    `save_model` and the checkpoints save the rotated float model with its `rotation_config`, which
    `from_pretrained` loads as an ordinary model and which this trainer continues from without rotating again.

    Not supported: PEFT adapters (RoSTE trains all weights), already-quantised models (bitsandbytes), an optimizer
    passed in `optimizers=` (the surgery replaces parameters before the optimizer may exist).

    Example:
        ```python
        from hf_plugins import RoSTEConfig, RoSTETrainer

        trainer = RoSTETrainer(
            model="Qwen/Qwen2.5-0.5B-Instruct",
            args=RoSTEConfig(output_dir="out", w_bits=4, a_bits=4, kv_bits=4, rotations="adaptive"),
            train_dataset=dataset,
        )
        trainer.train()
        trainer.export_quantized("out/w4a4kv4")
        ```
    """

    _tag_names = ["trl", "sft", "hf-plugins", "roste", "quantization"]
    config_class = RoSTEConfig
    command = "roste"
    description = "RoSTE: rotated quantisation-aware SFT (W4A4KV4 fake quantisation)"
    full_fine_tuning = "RoSTE fine-tunes every weight with fake quantisation (full fine-tuning)"
    _name = "RoSTE"
    _paper = {
        "title": "RoSTE: An Efficient Quantization-Aware Supervised Fine-Tuning Approach for Large Language Models",
        "id": "2502.09003",
    }

    def __init__(self, model, args: RoSTEConfig | None = None, *positional, **kwargs):
        if kwargs.get("peft_config") is not None:
            raise ValueError(
                "`peft_config` cannot be used with RoSTETrainer: RoSTE trains every weight of the model with fake "
                "quantisation (full fine-tuning). Drop `peft_config`."
            )
        optimizers = kwargs.get("optimizers")
        if optimizers is not None and optimizers[0] is not None:
            raise ValueError(
                "RoSTETrainer rotates and replaces parameters before training, so an optimizer built beforehand "
                "would hold stale tensors: pass `optimizer_cls_and_kwargs=` (or the config's `optim`) instead of "
                "`optimizers=`."
            )
        if isinstance(model, PreTrainedModel):
            check_supported_model(model)
        super().__init__(model, args, *positional, **kwargs)
        if hasattr(self.model, "peft_config"):
            raise ValueError("RoSTETrainer does not train PEFT models: pass the base model (full fine-tuning).")
        check_supported_model(self.model)
        calibration = self._calibration_sequences() if self._needs_search() else None
        self.rotation_config = prepare_model_for_roste(
            self.model,
            self.args.quant_config(),
            rotations=self.args.rotations,
            calibration=calibration,
            seed=self.args.rotation_seed,
        )
        logger.info("RoSTE rotation config: %s", json.dumps(self.rotation_config))

    def _needs_search(self) -> bool:
        return self.args.rotations == "adaptive" and not getattr(self.model.config, "rotation_config", None)

    def _calibration_sequences(self) -> list[torch.Tensor]:
        """`rotation_search_samples` tokenised training sequences (seeded by `args.seed`), truncated."""
        dataset = self.train_dataset
        if dataset is None:
            raise ValueError(
                "`rotations='adaptive'` searches the rotations on calibration sequences from the training dataset: "
                "pass `train_dataset`, or set `rotations='all'` or 'none'."
            )
        n, max_length = self.args.rotation_search_samples, self.args.rotation_search_max_length
        if hasattr(dataset, "__len__"):
            indices = list(range(len(dataset)))
            random.Random(self.args.seed).shuffle(indices)
            rows = [dataset[i] for i in indices[:n]]
        else:
            rows = [row for _, row in zip(range(n), dataset)]
        sequences = [torch.as_tensor(row["input_ids"])[:max_length] for row in rows if len(row["input_ids"]) > 0]
        if not sequences:
            raise ValueError("The training dataset has no tokenised sequence for the rotation search.")
        return sequences

    # ------------------------------------------------------------------ checkpoints and export
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """The checkpoint's weights are in the basis of its rotation config: apply its switches first."""
        config_file = os.path.join(resume_from_checkpoint, "config.json")
        if os.path.isfile(config_file):
            with open(config_file) as f:
                saved = json.load(f).get("rotation_config")
            if saved:
                current = self.model.config.rotation_config
                if bool(saved.get("is_rotate_R1")) != bool(current.get("is_rotate_R1")) or (
                    saved.get("is_rotate_R1") and saved.get("r1_seed") != current.get("r1_seed")
                ):
                    raise ValueError(
                        f"The checkpoint {resume_from_checkpoint!r} was trained with another R1 rotation "
                        f"({saved.get('is_rotate_R1')}, seed {saved.get('r1_seed')}) than this trainer's "
                        f"({current.get('is_rotate_R1')}, seed {current.get('r1_seed')}): use the same `rotations` and "
                        "`rotation_seed`."
                    )
                set_rotations(self.model, saved.get("in_block_rotation", {}))
                self.model.config.rotation_config = saved
                self.rotation_config = saved
        return super()._load_from_checkpoint(resume_from_checkpoint, model=model)

    def train(self, *args, **kwargs):
        """`Trainer.train`, then the quantised export to `args.export_quantized` when it is set."""
        output = super().train(*args, **kwargs)
        if self.args.export_quantized:
            self.export_quantized(self.args.export_quantized)
            logger.info("RoSTE: quantised model exported to %s", self.args.export_quantized)
        return output

    def export_quantized(self, path: str | os.PathLike) -> str:
        """Merge R2/R4, quantise the weights to the trained grid and save to `path` with the tokenizer (see
        `hf_plugins.quantization.export_roste`); only on the main process."""
        self.accelerator.wait_for_everyone()
        model = self.accelerator.unwrap_model(self.model)
        if self.args.should_save:
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            export_roste(model, path, tokenizer=tokenizer)
        self.accelerator.wait_for_everyone()
        return os.fspath(path)
