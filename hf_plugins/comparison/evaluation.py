"""The held-out metrics of `hf-plugins compare`, computed with the fused head: no `[tokens, vocab]` logits.

Every metric is a sum over the supervised tokens of a held-out set divided by their count once the whole set is seen,
so it does not depend on the evaluation batch size:

- `loss`: the mean negative log-likelihood per supervised token (the `sft` head with `num_items_in_batch=1`, which
  returns the sum);
- `token_accuracy`: the share of supervised tokens whose argmax is the label;
- `drift`: the mean KL(start || model) per supervised token, the divergence of the model's next-token distribution
  from the starting model's. It is the KL that ASFT anchors, computed by ASFT's head (`"asft"` with `kl_coef=0`
  reports `kl`, KL(reference || policy), per token) on the hidden states of both models, one chunk of rows at a time.
  The starting model is the policy with its adapters disabled under PEFT, else a frozen copy of the model made before
  the first step.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback

from ..modeling import forward_hidden_states
from ..ops import fused_linear_loss
from ..trainers.frozen_models import initial_copy, place_frozen_model


#: The columns of a tokenized held-out set that the evaluation reads
TOKEN_COLUMNS = ("input_ids", "labels")


def tokenize_held_out(trainer, dataset, args, name: str):
    """`dataset` prepared as TRL's `SFTTrainer` prepares SFT data with the arguments `args` (chat template, masks of
    completion-only or assistant-only loss, truncation to `max_length`, no packing): the tokens and labels plain SFT
    would train on. Every method is evaluated on these same tokens, whatever its own data preparation."""
    from trl import SFTTrainer

    args = copy.copy(args)
    args.packing = False
    prepared = SFTTrainer._prepare_dataset(trainer, dataset, trainer.processing_class, args, False, None, name)
    return prepared.select_columns(list(TOKEN_COLUMNS))


def batches(dataset, batch_size: int, pad_token_id: int):
    """The held-out set in order, `batch_size` rows at a time, padded on the right as TRL's SFT collator pads."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)
    for start in range(0, len(dataset), batch_size):
        rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
        yield collator([{column: row[column] for column in TOKEN_COLUMNS} for row in rows])


class StartModel:
    """The model a run starts from, for the drift: with PEFT, the policy itself with its adapters disabled (no copy);
    otherwise a frozen copy of the trainer's model, made here, before any step (for RoSTE: with its rotations and
    fake quantisation in place, as it starts training)."""

    def __init__(self, trainer):
        self._policy = trainer.model if is_peft_model(trainer.model) else None
        self._copy = None if self._policy is not None else place_frozen_model(initial_copy(trainer.model), trainer)

    @contextlib.contextmanager
    def __call__(self):
        if self._policy is not None:
            with self._policy.disable_adapter():
                yield self._policy
        else:
            yield self._copy


@torch.no_grad()
def held_out_metrics(
    model,
    dataset,
    batch_size: int,
    pad_token_id: int,
    start_model: StartModel | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    progress: str | None = None,
) -> dict[str, float]:
    """The metrics of the module docstring on a tokenized held-out set (`tokenize_held_out`), the drift only with
    `start_model`. `progress`: the label of a progress bar over the batches (None: no bar)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tokens, nll, correct, kl = 0, 0.0, 0.0, 0.0
    try:
        total = math.ceil(len(dataset) / batch_size)
        for batch in tqdm(
            batches(dataset, batch_size, pad_token_id), total=total, desc=progress, leave=False, disable=not progress
        ):
            batch: dict[str, Any] = {name: value.to(device) for name, value in batch.items()}
            policy = forward_hidden_states(model, batch)
            # position t predicts token t + 1
            hidden, labels = policy.hidden_states[:, :-1], batch["labels"][:, 1:]
            head = dict(bias=policy.bias, backend=backend, chunk_size=chunk_size, return_metrics="sums")
            head["logit_transform"] = policy.logit_transform
            loss_sum, sums = fused_linear_loss(hidden, policy.weight, labels, "sft", num_items_in_batch=1, **head)
            tokens += int(sums["num_tokens"])
            nll += float(loss_sum)
            correct += float(sums["token_accuracy"])
            if start_model is not None:
                with start_model() as start:
                    reference = forward_hidden_states(start, batch)
                _, drift_sums = fused_linear_loss(
                    hidden, policy.weight, labels, "asft", kl_coef=0.0,
                    ref_hidden=reference.hidden_states[:, :-1], ref_weight=reference.weight, ref_bias=reference.bias,
                    ref_logit_transform=reference.logit_transform, **head,
                )  # fmt: skip
                kl += float(drift_sums["kl"])
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("The held-out set has no supervised token: every label is -100 after tokenization.")
    metrics = {"loss": nll / tokens, "token_accuracy": correct / tokens, "tokens": tokens}
    if start_model is not None:
        metrics["drift"] = kl / tokens
    return metrics


#: The prefix of the evaluation entries in the trainer's `log_history`
LOG_PREFIX = "compare/"


def evaluation_steps(eval_steps, max_steps: int) -> int:
    """Steps between evaluations: `eval_steps` as `TrainingArguments` reads it (a ratio of the run below 1), else
    ten evaluations over the run."""
    if eval_steps:
        every = math.ceil(eval_steps * max_steps) if eval_steps < 1 else int(eval_steps)
    else:
        every = math.ceil(max_steps / 10)
    return max(1, every)


class HeldOutEvaluation(TrainerCallback):
    """Evaluates the trainer's model on the held-out sets before the first step, every `evaluation_steps` steps and
    after the last one, and appends the metrics to `state.log_history` (keys under `LOG_PREFIX`), so that a
    checkpoint holds the evaluations made before it and a resumed run keeps them.

    Args:
        trainer: the run's trainer (its model is evaluated; its arguments give the batch size and the head backend).
        held_out: name -> tokenized held-out set; the one named `drift_on` also gets the drift.
        drift_on: the set the drift is measured on.
        pad_token_id: the padding of the evaluation batches.
    """

    def __init__(self, trainer, held_out: dict, drift_on: str, pad_token_id: int):
        self.trainer = trainer
        self.held_out = held_out
        self.drift_on = drift_on
        self.pad_token_id = pad_token_id
        self.start_model = StartModel(trainer)
        self.every = 1

    def evaluate(self) -> dict[str, float]:
        args = self.trainer.args
        entry = {}
        for name, dataset in self.held_out.items():
            metrics = held_out_metrics(
                self.trainer.model,
                dataset,
                args.per_device_eval_batch_size,
                self.pad_token_id,
                start_model=self.start_model if name == self.drift_on else None,
                backend=args.loss_backend,
                chunk_size=args.loss_chunk_size,
                progress=None if args.disable_tqdm else f"held-out {name}",
            )
            entry.update({f"{LOG_PREFIX}{name}_{key}": value for key, value in metrics.items()})
        return entry

    def _record(self, state) -> None:
        if any(LOG_PREFIX + "step" in entry and entry["step"] == state.global_step for entry in state.log_history):
            return  # evaluated before the checkpoint this run resumed from
        started = time.perf_counter()
        metrics = self.evaluate()
        # the evaluations run inside `train()`: their time is taken out of the training time reported
        metrics[LOG_PREFIX + "seconds"] = time.perf_counter() - started
        state.log_history.append({"step": state.global_step, LOG_PREFIX + "step": state.global_step, **metrics})

    def on_train_begin(self, args, state, control, **kwargs):
        self.every = evaluation_steps(args.eval_steps, state.max_steps)
        if state.global_step == 0:
            self._record(state)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            self._record(state)
