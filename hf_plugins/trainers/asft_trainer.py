"""`ASFTTrainer`: Anchored SFT (arXiv 2509.23753), DFT plus a full-vocabulary KL anchor to the starting model.

Each step runs the frozen reference to its last hidden state (no logits, no gradient), then the policy's fused head
computes, one chunk of supervised rows at a time, DFT's term and `kl_coef * KL(reference || policy)` with both
models' logits for that chunk only (`hf_plugins.losses.ASFTMethod`).

Where the reference comes from:
    (a) PEFT policy, no `ref_model`: the same network with its adapters disabled (no second copy in memory);
    (b) `ref_model` given (a path or a model): loaded and prepared like TRL's reference models;
    (c) neither: a frozen copy of the starting model, made before training.
"""

from __future__ import annotations

import textwrap
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl.trainer.utils import get_config_model_id

from ..modeling import forward_hidden_states, gather_lm_head
from ..utils import get_logger
from .asft_config import ASFTConfig
from .frozen_models import (
    initial_copy,
    load_frozen_model,
    parameter_bytes,
    place_frozen_model,
    tokenizer_differs,
    vocab_rows,
)
from .fused_sft_trainer import FusedSFTTrainer


logger = get_logger(__name__)


class ASFTTrainer(FusedSFTTrainer):
    """
    Trainer for Anchored Supervised Fine-Tuning (ASFT), a drop-in replacement for `trl.SFTTrainer`.

    At every supervised token the loss is DFT's probability-weighted NLL plus `args.kl_coef` times
    KL(reference || policy) over the full vocabulary; with `kl_coef=0` it is exactly DFT. Neither model's logits are
    ever built for more than a chunk of tokens. Logged metrics (besides TRL's): `kl` (mean KL(reference || policy) per
    supervised token, the drift from the starting model), `dft_weight` (mean p(label)) and `mean_token_accuracy`.

    It takes every argument of `SFTTrainer` (`model`, `args`, ...) as there, with an [`ASFTConfig`] as `args`, and:

    Args:
        ref_model (`str` or [`~transformers.PreTrainedModel`], *optional*, keyword only):
            The frozen reference. Defaults to `args.ref_model`; if both are `None`, the starting model itself (with
            PEFT: the same model with its adapters disabled; otherwise a frozen copy, which doubles the weights in
            memory). A path is loaded with `args.ref_model_init_kwargs`. It must score the policy's vocabulary.

    Example:
        ```python
        from hf_plugins import ASFTConfig, ASFTTrainer

        trainer = ASFTTrainer(
            model="Qwen/Qwen2.5-0.5B",
            args=ASFTConfig(output_dir="out", kl_coef=0.05),
            train_dataset=dataset,
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        )
        trainer.train()
        ```
    """

    _tag_names = ["trl", "sft", "hf-plugins", "asft"]
    config_class = ASFTConfig
    command = "asft"
    description = "Anchored SFT: DFT plus a KL anchor to a frozen reference model"
    _name = "ASFT"
    _paper = {
        "title": "Anchored Supervised Fine-Tuning",
        "id": "2509.23753",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{zhu2025anchored,
                title        = {{Anchored Supervised Fine-Tuning}},
                author       = {He Zhu and Junyou Su and Peng Lai and Ren Ma and Wenjia Zhang and Linyi Yang and
                                Guanhua Chen},
                year         = 2025,
                eprint       = {arXiv:2509.23753},
            }"""),
    }

    def __init__(self, model, args: ASFTConfig | None = None, *positional, ref_model=None, **kwargs):
        # ref_model is keyword-only so that `ASFTTrainer(model, args, ...)` keeps SFTTrainer's positional order
        args = self.coerce_args(model, args)
        if ref_model is not None and args.ref_model is not None and ref_model != args.ref_model:
            raise ValueError(
                f"Both the `ref_model` argument and `args.ref_model={args.ref_model!r}` name a reference model: pass "
                "only one."
            )
        ref_model = ref_model if ref_model is not None else args.ref_model
        if ref_model is not None and ref_model is model:
            raise ValueError(
                "`model` and `ref_model` are the same object, so the reference would be trained too. Omit `ref_model` "
                "to use a frozen copy of the starting model (or the adapters-off model with PEFT)."
            )
        if args.ref_model_init_kwargs is not None and not isinstance(ref_model, str):
            raise ValueError(
                "`ref_model_init_kwargs` is set, but no reference model is loaded from a path (`ref_model` is "
                f"{'a model object' if ref_model is not None else 'None'}): remove it, or pass `ref_model` as a path."
            )
        if ref_model is not None and not isinstance(ref_model, (str, torch.nn.Module)):
            raise ValueError(f"`ref_model` must be a path or a model, got {type(ref_model).__name__}.")

        super().__init__(model, args, *positional, **kwargs)

        if ref_model is None and is_peft_model(self.model):
            self.ref_model = None  # (a) the adapters-off model: nothing to load or keep
        else:
            if ref_model is None:
                reference = self._initial_model_copy()  # (c)
            else:
                if is_peft_model(self.model):
                    logger.warning(
                        "ASFT: `ref_model` is given with a PEFT policy. It is used as the reference, although the "
                        "policy with its adapters disabled would have served as the starting model at no memory "
                        "cost; drop `ref_model` to use it."
                    )
                reference = self._load_reference(ref_model)  # (b)
            self.ref_model = self._prepare_reference(reference)

    # ------------------------------------------------------------------ the reference model
    def _load_reference(self, ref_model):
        """(b): load a path like TRL loads reference models, or take the given model; check it scores our vocab."""
        if isinstance(ref_model, str):
            init_kwargs = dict(self.args.ref_model_init_kwargs or {})
            init_kwargs.setdefault("dtype", self.model.dtype)  # like the policy, as TRL's DPOTrainer does
            trust_remote_code = init_kwargs.get("trust_remote_code", self.args.trust_remote_code)
            self._check_reference_tokenizer(ref_model, trust_remote_code)
            return self._from_pretrained(ref_model, init_kwargs)
        return ref_model

    def _from_pretrained(self, path: str, init_kwargs: dict[str, Any]):
        return load_frozen_model(path, self.args, init_kwargs)

    def _initial_model_copy(self):
        """(c): a frozen copy of the starting model. Made here, before any step, so it holds the initial weights."""
        if is_deepspeed_zero3_enabled():
            # ZeRO-3 parameters are partitioned and cannot be deep-copied: load the starting checkpoint again
            init_kwargs = dict(self.args.model_init_kwargs or {})
            init_kwargs.setdefault("dtype", self.model.dtype)
            reference = self._from_pretrained(get_config_model_id(self.model.config), init_kwargs)
        else:
            reference = initial_copy(self.model)
        logger.info(
            "ASFT: no `ref_model` and no PEFT, so the reference is a frozen copy of the starting model: %.1f MiB more "
            "memory per process (%d parameters). Train with PEFT to use the adapters-off model at no memory cost.",
            parameter_bytes(reference) / 2**20,
            sum(p.numel() for p in reference.parameters()),
        )
        return reference

    def _check_reference_tokenizer(self, path: str, trust_remote_code: bool) -> None:
        """A reference loaded from a path that ships a tokenizer must tokenize like the policy's."""
        if tokenizer_differs(path, self.processing_class, trust_remote_code):
            raise ValueError(
                f"The reference model at {path!r} has a different tokenizer from the policy's: ASFT compares both "
                "models' next-token distributions over one vocabulary. Use a reference that shares the policy's "
                "tokenizer."
            )

    def _prepare_reference(self, reference):
        """Freeze, check and patch the reference, then place it like TRL places reference models."""
        policy_vocab, ref_vocab = vocab_rows(self.model), vocab_rows(reference)
        if policy_vocab != ref_vocab:
            raise ValueError(
                f"The reference model scores {ref_vocab} tokens but the policy scores {policy_vocab}: ASFT's KL is "
                "taken over one shared vocabulary. Use a reference with the policy's vocabulary (and tokenizer)."
            )
        return place_frozen_model(reference, self)

    @torch.no_grad()
    def reference_forward(self, model, inputs: dict[str, Any]):
        """The reference's last hidden state, lm_head and logit transform for a batch (no gradient, no logits)."""
        if self.ref_model is None:
            # (a) Through the wrapped model (DDP/FSDP hooks fire as for the policy), with the adapters of the
            # unwrapped PEFT model disabled; a `modules_to_save` lm_head falls back to its original copy too
            with self.accelerator.unwrap_model(model).disable_adapter():
                reference = forward_hidden_states(model, inputs)
        else:
            reference = forward_hidden_states(self.ref_model, inputs)
        weight, bias = reference.weight, reference.bias
        if is_deepspeed_zero3_enabled():
            # The head is partitioned outside its module's forward: keep a gathered copy for the loss
            with gather_lm_head(weight, bias):
                weight = weight.detach().clone()
                bias = bias.detach().clone() if bias is not None else None
        return reference.hidden_states, weight, bias, reference.logit_transform

    # ------------------------------------------------------------------ hooks of FusedSFTTrainer
    def loss_method(self) -> str:
        return "asft"

    def loss_method_inputs(self, model, inputs: dict[str, Any], extra_columns) -> dict[str, dict[str, Any]]:
        ref_hidden, ref_weight, ref_bias, ref_transform = self.reference_forward(model, inputs)
        return {
            "hidden_inputs": {"ref_hidden": ref_hidden},
            "other_inputs": {
                "ref_weight": ref_weight, "ref_bias": ref_bias, "kl_coef": self.args.kl_coef,
                "ref_logit_transform": ref_transform,
            },
        }  # fmt: skip
