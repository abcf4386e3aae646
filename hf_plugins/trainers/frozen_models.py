"""Frozen second models of a trainer (ASFT's reference, SRPPO's base and SFT models): loaded, checked and placed
like TRL places its reference models."""

from __future__ import annotations

import copy
from typing import Any

from accelerate.utils import is_peft_model
from transformers import AutoTokenizer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import create_model_from_path

from ..modeling import add_loss_head_forward, lm_head_parameters


def vocab_rows(model) -> int:
    """Rows of the lm_head the loss reads (the vocabulary the model scores); the full size under ZeRO-3 too."""
    weight, _ = lm_head_parameters(model.get_output_embeddings())
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def text_tokenizer(processing_class):
    """The tokenizer inside a processor (VLMs), or the tokenizer itself."""
    return getattr(processing_class, "tokenizer", processing_class)


def initial_copy(model):
    """A copy of `model` as it is now (before any step: its starting weights), without the fused-head forward patch
    (`add_loss_head_forward`) it inherits, which closes over `model`: `place_frozen_model` patches the copy itself."""
    duplicate = copy.deepcopy(model)
    duplicate.__dict__.pop("forward", None)
    duplicate.__dict__.pop("_hf_plugins_loss_head", None)
    return duplicate


def load_frozen_model(path: str, args, init_kwargs: dict[str, Any]):
    """A model from `path`, loaded as TRL loads reference models (`create_model_from_path`; no `device_map` under
    DDP and DeepSpeed, where "auto" would spread it over every rank's GPUs)."""
    init_kwargs = dict(init_kwargs)
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        init_kwargs["device_map"] = None
    init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(path, **init_kwargs)


def tokenizer_differs(path: str, processing_class, trust_remote_code: bool) -> bool:
    """Whether the tokenizer shipped at `path` has another vocabulary than the trainer's (False when `path` ships
    none: then only the vocabulary size can be checked)."""
    try:
        other = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError):
        return False
    own = text_tokenizer(processing_class)
    return own is not None and other.get_vocab() != own.get_vocab()


def place_frozen_model(model, trainer):
    """Freeze `model` (eval mode, no gradients), patch its forward for the fused heads, and place it as TRL places
    reference models (DeepSpeed, FSDP, or the accelerator's evaluation-mode preparation)."""
    model.eval()
    model.requires_grad_(False)
    add_loss_head_forward(model.get_base_model() if is_peft_model(model) else model)
    if trainer.is_deepspeed_enabled:
        return prepare_deepspeed(model, trainer.accelerator)
    if trainer.is_fsdp_enabled:
        return prepare_fsdp(model, trainer.accelerator)
    return trainer.accelerator.prepare_model(model, evaluation_mode=True)
