"""`LfUTrainer`: Learning-from-the-Undesirable (arXiv 2511.13052) as a drop-in `SFTTrainer`.

Each training micro-batch B_A (the official trainer `Lfu_consistency_asc_rep`, in this order):
    1. the clean forward on B_A, through the fused head: `L_SFT` and the hidden states of `lfu_layers`;
    2. an ascent minibatch B_B from a second, independently shuffled stream over the training set; the gradient
       `g = grad L_SFT(theta; B_B)` over the trainable parameters (under DDP averaged over the processes, weighted by
       their supervised tokens, so every process perturbs alike);
    3. the trainable parameters moved in place to `theta + lfu_alpha * g / ||g||`;
    4. the forward on B_A under the perturbed model, to its hidden states (no logits), and the gradient of
       `lfu_lambda * L_cons`, the mean over the layers of the mean squared distance to the clean states (detached)
       at the response positions (`labels != -100`), taken there, at the perturbed point;
    5. the parameters restored bit for bit from a copy;
    6. the loss `L_SFT + lfu_lambda * L_cons` returned to the Trainer, whose one backward adds step 4's gradient to
       the parameters (`_AddToGradients`), so DDP reduces it with the SFT gradient as one gradient.
B_B's gradient (step 2) and step 4's are taken with `torch.autograd.grad`: neither touches `.grad`, so nothing of B_B
reaches the update, under gradient accumulation too, and no DDP reduction hook fires outside the Trainer's backward.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

import datasets
import numpy as np
import torch
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from ..modeling import HiddenStateHead, LossHead, forward_with_head
from ..ops.method import IGNORE_INDEX
from ..utils import get_logger
from .fused_sft_trainer import FusedSFTTrainer
from .lfu_config import LfUConfig


logger = get_logger(__name__)

#: Name of the file, inside a checkpoint folder, that holds the B_B stream's position (one per process when
#: distributed)
LFU_STATE_NAME = "lfu_state"
#: Mixed with the seed into the B_B stream's own seed ("LfU" in ASCII)
_STREAM_KEY = 0x4C6655


class SecondBatchStream:
    """The B_B stream: an endless sequence of the training set's indices, one seeded permutation per pass, cut into
    global batches of `batch_size * world_size` indices of which each process takes its own `batch_size` (as a
    sharded data loader deals batches). Its state is the number of batches drawn: the permutations are replayed from
    the seed, so a restored stream continues exactly where the saved one stood."""

    def __init__(self, size: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0):
        if size < 1:
            raise ValueError("LfU draws its ascent minibatches from the training set, which is empty.")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.world_size, self.rank = world_size, rank
        self.draws = 0
        self._epoch, self._order, self._generator = -1, None, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch < self._epoch or self._generator is None:
            # Not `seed` itself: the Trainer's sampler shuffles with a generator seeded with it, and the same seed would
            # make B_B the training batch itself
            stream_seed = int(np.random.SeedSequence([self.seed, _STREAM_KEY]).generate_state(1)[0])
            self._generator, self._epoch = torch.Generator().manual_seed(stream_seed), -1
        while self._epoch < epoch:
            self._order = torch.randperm(self.size, generator=self._generator)
            self._epoch += 1
        return self._order

    def next_indices(self) -> list[int]:
        """The indices of this process's next minibatch."""
        start = (self.draws * self.world_size + self.rank) * self.batch_size
        self.draws += 1
        indices = []
        for position in range(start, start + self.batch_size):
            epoch, offset = divmod(position, self.size)
            indices.append(int(self._permutation(epoch)[offset]))
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"draws": self.draws, "seed": self.seed, "size": self.size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["size"]) != self.size or int(state["seed"]) != self.seed:
            logger.warning(
                f"The checkpoint's LfU B_B stream was drawn from {state['size']} examples with seed {state['seed']}; "
                f"this run has {self.size} with seed {self.seed}: its ascent minibatches differ from the saved run's."
            )
        self.draws = int(state["draws"])


class _AddToGradients(torch.autograd.Function):
    """Zero in value; in the backward, `grads` (times the incoming gradient) go to `params`. It carries the
    consistency term's gradient, taken at the perturbed point, into the Trainer's one backward of the loss."""

    @staticmethod
    def forward(ctx, grads, *params):
        ctx.grads = grads
        return torch.zeros((), dtype=torch.float32, device=params[0].device)

    @staticmethod
    def backward(ctx, upstream):
        return (None, *(grad * upstream.to(grad.dtype) for grad in ctx.grads))


class LfUTrainer(FusedSFTTrainer):
    """
    Trainer for Learning-from-the-Undesirable (LfU), a drop-in replacement for `trl.SFTTrainer`.

    The loss is `L_SFT + lfu_lambda * L_cons`: the SFT loss of the batch (through the fused head) plus the mean squared
    distance between the batch's hidden states under the model perturbed by one normalised gradient-ascent step,
    `theta + lfu_alpha * g / ||g||` with `g` the SFT gradient of an independent minibatch of the same training set,
    and its clean (detached) hidden states, at the response positions and over `lfu_layers`. The parameters are
    restored exactly before the optimizer step; a step costs about three forwards and two backwards of SFT's one.
    With `lfu_lambda=0` it is [`FusedSFTTrainer`]. Trains LoRA adapters (the official runs) or every weight, on one
    process or DDP; FSDP and DeepSpeed ZeRO-3 are refused (the perturbation needs whole parameters).

    It takes exactly the arguments of `SFTTrainer`; pass an [`LfUConfig`] as `args`. Logged metrics (besides TRL's):
    `consistency_loss` (the mean `L_cons` per micro-batch, unweighted) and `ascent_grad_norm` (`||g||`).

    Example:
        ```python
        from hf_plugins import LfUConfig, LfUTrainer

        trainer = LfUTrainer(
            model="Qwen/Qwen2.5-0.5B",
            args=LfUConfig(output_dir="out", lfu_alpha=0.1, lfu_lambda=5.0),
            train_dataset=dataset,
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        )
        trainer.train()
        ```
    """

    _tag_names = ["trl", "sft", "hf-plugins", "lfu"]
    config_class = LfUConfig
    command = "lfu"
    description = "LfU: SFT plus hidden-state consistency under a gradient-ascent perturbation"
    _name = "LfU"
    _paper = {
        "title": "Learning from the Undesirable: Robust Adaptation of Language Models without Forgetting",
        "id": "2511.13052",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{lfu2026,
                title        = {{Learning from the Undesirable: Robust Adaptation of Language Models without
                                Forgetting}},
                year         = 2026,
                booktitle    = {AAAI},
                eprint       = {arXiv:2511.13052},
            }"""),
    }

    def __init__(self, model, args: LfUConfig | None = None, *positional, **kwargs):
        args = self.coerce_args(model, args)
        self._check_lfu_arguments(args, kwargs.get("train_dataset", positional[1] if len(positional) > 1 else None))
        super().__init__(model, args, *positional, **kwargs)
        self._check_lfu_engine()
        self.lfu_layers = self._resolve_layers(args.lfu_layers)
        self.second_batches = None
        if self.train_dataset is not None:
            self.second_batches = SecondBatchStream(
                len(self.train_dataset),
                args.per_device_train_batch_size,
                args.lfu_seed if args.lfu_seed is not None else args.seed,
                world_size=self.accelerator.num_processes,
                rank=self.accelerator.process_index,
            )
        self._second_dataset = None

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_lfu_arguments(args: LfUConfig, train_dataset) -> None:
        if args.gradient_checkpointing and (args.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
            raise ValueError(
                "`gradient_checkpointing_kwargs={'use_reentrant': True}` cannot be used with LfUTrainer: LfU takes the "
                "perturbed model's gradient with `torch.autograd.grad`, which reentrant checkpointing does not support. "
                "Set `use_reentrant` to False (the default) or turn gradient checkpointing off."
            )
        if isinstance(train_dataset, (datasets.IterableDataset, torch.utils.data.IterableDataset)):
            raise ValueError(
                "LfUTrainer needs a map-style `train_dataset` (a `datasets.Dataset`): it draws its ascent minibatches "
                "from a second, independently shuffled pass over it. Load the dataset without `streaming=True`."
            )

    def _check_lfu_engine(self) -> None:
        if self.is_fsdp_enabled or is_deepspeed_zero3_enabled():
            engine = "FSDP" if self.is_fsdp_enabled else "DeepSpeed ZeRO-3"
            raise ValueError(
                f"LfUTrainer cannot train under {engine}: LfU perturbs the trainable parameters in place, which needs "
                "every parameter whole on every process. Train with DDP or DeepSpeed ZeRO-1/2, with LoRA if the model "
                "does not fit."
            )
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None and (
            getattr(parallelism, "cp_enabled", False) or getattr(parallelism, "tp_enabled", False)
        ):
            raise ValueError(
                "LfUTrainer does not support context or tensor parallelism (`cp_size > 1`, `tp_size > 1`): its "
                "perturbation and hidden-state comparison need whole parameters and whole sequences. Use DDP."
            )

    def _resolve_layers(self, layers: list[int] | None) -> list[int]:
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        num_states = config.num_hidden_layers + 1
        if layers is None:
            return list(range(num_states))
        unknown = [layer for layer in layers if layer >= num_states]
        if unknown:
            raise ValueError(
                f"`lfu_layers={layers}` names hidden state(s) {unknown} that the model does not have: it has "
                f"{num_states} (0, the embedding output, to {num_states - 1}, the final state). Use indices in that "
                "range, or None for all of them."
            )
        return sorted(layers)

    # ------------------------------------------------------------------ the LfU step
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self.args.lfu_lambda or not (self.model.training and torch.is_grad_enabled()):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        global_count = num_items_in_batch is not None
        # 1. the clean forward: L_SFT and the hidden states to stay close to
        sft_loss, clean_states = self._compute_head_loss(
            model, inputs, False, num_items_in_batch, global_count, layer_hidden_states=self.lfu_layers
        )
        # The ascent and perturbed forwards run on the unwrapped model: outside DDP's forward, so that its reduction
        # follows the one backward of the Trainer, prepared by the clean forward above
        module = self.accelerator.unwrap_model(model)
        params = [p for p in module.parameters() if p.requires_grad]
        mask = inputs["labels"] != IGNORE_INDEX
        # 2. the ascent direction, from B_B
        direction, norm, responses = self._ascent_direction(module, params, mask.sum())
        width = next(state for state in clean_states if state is not None).shape[-1]
        scale = self._consistency_scale(mask.sum(), responses, width, num_items_in_batch)
        # 3.-5. the consistency term and its gradient, taken at the perturbed point
        sse, cons_grads = self._consistency_gradient(module, params, direction, inputs, clean_states, mask, scale)
        used = [(p, g) for p, g in zip(params, cons_grads) if g is not None]
        loss = sft_loss + (self.args.lfu_lambda * scale * sse).to(sft_loss.dtype)
        if used:
            loss = loss + _AddToGradients.apply(tuple(g for _, g in used), *(p for p, _ in used)).to(sft_loss.dtype)
        self._log_lfu_metrics(sse, responses, width, norm)
        return loss

    def _consistency_scale(self, local_responses, responses, width: int, num_items_in_batch) -> torch.Tensor:
        """The factor that turns the summed squared distances into this micro-batch's `L_cons` term: the official
        per-micro-batch mean (over the layers, response positions and features) divided by the accumulation steps
        when the loss is (as the Trainer then divides nothing); under DDP with `average_tokens_across_devices`, the
        mean over every process's response positions (times the process count that DDP's averaging divides by)."""
        processes = self.accelerator.num_processes
        if processes > 1 and self.args.average_tokens_across_devices:
            count, factor = responses, processes
        else:
            count, factor = local_responses, 1
        # In float64: a float32 reciprocal of the count would round the loss scale (the counts are integer tensors)
        scale = factor / (count.clamp_min(1).to(torch.float64) * width * len(self.lfu_layers))
        scaled_for_accumulation = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled_for_accumulation is None:
            scaled_for_accumulation = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        if scaled_for_accumulation:
            # (set by the training loop; a direct `training_step` call, as in the benchmarks, has the configured count)
            steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            scale = scale / steps
        return scale

    def _log_lfu_metrics(self, sse, responses, width: int, norm) -> None:
        if self.accelerator.num_processes > 1:
            sse = self.accelerator.reduce(sse.detach(), reduction="sum")
        consistency = sse / (responses.clamp_min(1).to(torch.float64) * width * len(self.lfu_layers))
        self._metrics["train"]["consistency_loss"].append(consistency.detach())  # device values, read at `log`
        self._metrics["train"]["ascent_grad_norm"].append(norm.detach())

    def _second_batch(self) -> dict[str, Any]:
        """The next B_B minibatch of this process, collated like the training batches and on the device."""
        if self.second_batches is None:
            raise ValueError("LfUTrainer needs a `train_dataset` to draw its ascent minibatches from.")
        if self._second_dataset is None:
            dataset = self.train_dataset
            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="training")
            self._second_dataset = dataset
        rows = [self._second_dataset[i] for i in self.second_batches.next_indices()]
        return self._prepare_inputs(self.data_collator(rows))

    def _ascent_direction(self, module, params, response_count):
        """`alpha * g / ||g||` for each trainable tensor, `||g||`, and the batch's response positions (summed over the
        processes under DDP, where `g` is the token-weighted mean of the processes' gradients)."""
        batch = dict(self._second_batch())
        batch["use_cache"] = False
        head = LossHead(
            method=self.loss_method(),
            backend=self.args.loss_backend,
            chunk_size=self.args.loss_chunk_size,
            **self.loss_method_inputs(module, batch, {}),
        )
        loss = forward_with_head(module, batch, head).loss  # the mean over B_B's supervised tokens
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        else:  # no supervised token in B_B
            grads = (None,) * len(params)
        grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
        dtype = torch.promote_types(params[0].dtype, torch.float32)
        if self.accelerator.num_processes > 1:
            tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().to(dtype)
            flat = [*(g.reshape(-1).to(dtype) * tokens for g in grads), tokens[None], response_count.to(dtype)[None]]
            flat = torch.cat(flat)
            flat = self.accelerator.reduce(flat, reduction="sum")
            total_tokens, response_count = flat[-2].clamp_min(1), flat[-1].round().long()
            grads, offset = [], 0
            for p in params:
                grads.append((flat[offset : offset + p.numel()] / total_tokens).view_as(p))
                offset += p.numel()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.to(dtype)) for g in grads]))
        # No supervised token anywhere gives g = 0 and no perturbation (the official code divides by zero)
        scale = self.args.lfu_alpha / norm.clamp_min(torch.finfo(dtype).tiny)
        return [(g.to(dtype) * scale).to(p.dtype) for p, g in zip(params, grads)], norm, response_count

    def _consistency_gradient(self, module, params, direction, inputs, clean_states, mask, scale):
        """The sum of squared hidden-state differences (over the layers, response positions and features) under the
        perturbed parameters, and the gradient of `lfu_lambda * scale * sse` w.r.t. `params` there."""
        originals = [p.detach().clone() for p in params]
        batch = dict(inputs)
        batch["use_cache"] = False
        try:
            with torch.no_grad():
                # Through `.data`: the clean forward's graph holds these parameters and must find them unchanged
                # (restored) at the Trainer's backward, not flagged as modified in place
                for p, delta in zip(params, direction):
                    p.data.add_(delta)
            torch.clear_autocast_cache()  # casts of the clean weights cached by an enclosing autocast are stale now
            perturbed = forward_with_head(module, batch, HiddenStateHead(layer_hidden_states=self.lfu_layers))
            sse = _squared_distance(perturbed.layer_hidden_states, clean_states, self.lfu_layers, mask)
            if sse.requires_grad:
                grads = torch.autograd.grad(self.args.lfu_lambda * scale * sse, params, allow_unused=True)
            else:
                grads = (None,) * len(params)
        finally:
            with torch.no_grad():
                for p, original in zip(params, originals):
                    p.data.copy_(original)
            torch.clear_autocast_cache()
        return sse.detach(), grads

    # ------------------------------------------------------------------ the B_B stream in checkpoints
    def _lfu_state_file(self, folder: str) -> str:
        suffix = "" if self.args.world_size <= 1 else f"_{self.args.process_index}"
        return os.path.join(folder, f"{LFU_STATE_NAME}{suffix}.pt")

    def _save_rng_state(self, output_dir: str) -> None:
        # Trainer saves its RNG states here, per process, in every full checkpoint: the B_B stream travels with them
        super()._save_rng_state(output_dir)
        if self.second_batches is not None:
            os.makedirs(output_dir, exist_ok=True)
            torch.save(self.second_batches.state_dict(), self._lfu_state_file(output_dir))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # Called when resuming, after the batches already trained on are skipped and before the first new forward
        super()._load_rng_state(checkpoint)
        if checkpoint is None or self.second_batches is None:
            return
        path = self._lfu_state_file(checkpoint)
        if not os.path.isfile(path):
            logger.warning(
                f"No LfU state in {checkpoint} ({os.path.basename(path)}): the resumed run draws its ascent "
                "minibatches from the start of the B_B stream, not where the interrupted run left it."
            )
            return
        self.second_batches.load_state_dict(torch.load(path, weights_only=True))


def _squared_distance(perturbed, clean, layers: list[int], mask: torch.Tensor) -> torch.Tensor:
    """The sum over `layers`, the positions of `mask` and the features of `(perturbed - clean.detach())^2`, in at
    least float32 (the official loss is the mean of the per-layer means: the caller divides)."""
    total = None
    for layer in layers:
        difference = perturbed[layer][mask] - clean[layer][mask].detach()
        squares = difference.to(torch.promote_types(difference.dtype, torch.float32)).pow(2).sum()
        total = squares if total is None else total + squares
    return total
