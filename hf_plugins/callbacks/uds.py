"""UDS (Utility-Diversity Sampling, arXiv 2510.16882): the state of online batch selection.

From each candidate micro-batch UDS keeps the examples with the largest utility + alpha * diversity, scored from the
final hidden states (the math, and its reference on materialised logits: `hf_plugins.losses.uds`). Only the kept
examples are trained on; their sketches enter a FIFO memory, against which later candidates' diversity is measured.

This module holds what UDS keeps between steps: the sketch memory, the random stream of the scoring forward and
`UDSCallback`, which owns all of UDS's state (with the sketch constants and the cached lm_head factors), selects the
examples and saves and restores that state with the checkpoints. The trainer hook that feeds it batches is
`hf_plugins.trainers.UDSMixin`.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, fields
from typing import Any

import torch
from transformers import TrainerCallback

from ..losses.uds import (
    HeadFactors,
    SketchConstants,
    head_factors,
    scores_from_hidden,
    scores_from_hidden_softcapped,
)
from ..ops.method import PLAIN_LOGITS, LogitTransform
from ..utils import get_logger, is_integer


logger = get_logger(__name__)

#: Name of the file, inside a checkpoint folder, that holds the UDS state (one per process when distributed)
UDS_STATE_NAME = "uds_state"

#: Default sketch length T when neither `uds_sketch_length` nor `max_length` is set (the reference's cutoff length)
DEFAULT_SKETCH_LENGTH = 512

#: Values of `uds_mode`
MODES = ("uds", "random")


# ------------------------------------------------------------------------------------------------------ the memory


class SketchMemory:
    """FIFO memory of the sketches of selected examples: a ring buffer of `capacity` rows written at `pointer`, which
    wraps around; the oldest rows are overwritten first once `count == capacity`."""

    def __init__(self, capacity: int, dim: int, device=None):
        self.buffer = torch.zeros(capacity, dim, dtype=torch.float32, device=device)
        self.pointer = 0
        self.count = 0

    @property
    def capacity(self) -> int:
        return self.buffer.shape[0]

    def contents(self) -> torch.Tensor:
        """The stored sketches, oldest first."""
        if self.count < self.capacity:
            return self.buffer[: self.count]
        return torch.cat([self.buffer[self.pointer :], self.buffer[: self.pointer]])

    def mean_distances(self, sketches: torch.Tensor) -> torch.Tensor:
        """Mean L2 distance `[B]` of each sketch to the stored ones; zeros while the memory is empty."""
        if self.count == 0:
            return torch.zeros(sketches.shape[0], dtype=torch.float64, device=sketches.device)
        stored = self.buffer[: self.count].to(device=sketches.device, dtype=torch.float64)
        distances = torch.cdist(sketches.to(torch.float64), stored, compute_mode="donot_use_mm_for_euclid_dist")
        return distances.mean(1)

    def push(self, sketches: torch.Tensor) -> None:
        """Write `sketches` [K, dim] after the newest row, wrapping around."""
        sketches = sketches.detach().to(device=self.buffer.device, dtype=self.buffer.dtype)[-self.capacity :]
        k = sketches.shape[0]
        index = (self.pointer + torch.arange(k, device=self.buffer.device)) % self.capacity
        self.buffer[index] = sketches
        self.pointer = (self.pointer + k) % self.capacity
        self.count = min(self.capacity, self.count + k)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.cpu(), "pointer": self.pointer, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["buffer"].shape) != tuple(self.buffer.shape):
            raise ValueError(
                f"The saved UDS memory holds {tuple(state['buffer'].shape)} sketches (memory size x sketch entries) "
                "but "
                f"this run's holds {tuple(self.buffer.shape)}: resume with the `uds_memory_size`, `uds_sketch_rows` "
                "and `uds_sketch_cols` the checkpoint was trained with."
            )
        self.buffer.copy_(state["buffer"])
        self.pointer, self.count = int(state["pointer"]), int(state["count"])


# ----------------------------------------------------------------------------------------- the scoring's random stream


class ScoringRandomStream:
    """The random stream the scoring forward draws its dropout from: a CPU state and one state per accelerator device
    the model runs on, swapped into torch's global generators around that forward (`active()`), which leaves the
    global generators exactly as they were.

    The reference scores in training mode, so a model with dropout scores with dropout masks; it draws them from the
    global stream, ahead of the training forward's. Here the scoring masks come from this stream instead: each mask is
    still an independent draw, so the scores and the training forward have the reference's distribution, but the
    training forward's masks no longer depend on whether a scoring pass ran before it. That is what makes resuming
    exact: transformers restores its saved RNG states only after the first window of a resumed run has been fetched
    (and scored), so scoring from the global stream would see other masks than the uninterrupted run, and the training
    forward would start from a state the scoring had not advanced. This stream is saved with the rest of UDS's state.

    Args:
        seed (`int`): seed of every state (a CPU and a device generator seeded alike are different streams).
        devices (`list[torch.device]`): the non-CPU devices whose global generators the model's dropout draws from
            (all of one device type).
    """

    def __init__(self, seed: int, devices=()):
        devices = [torch.device(d) for d in devices if torch.device(d).type not in ("cpu", "meta")]
        types = sorted({d.type for d in devices})
        if len(types) > 1:
            raise ValueError(f"The model runs on devices of several types ({types}); UDS scores on one type.")
        self.device_module = torch.get_device_module(types[0]) if types else None
        if hasattr(self.device_module, "current_device"):  # "cuda" and "cuda:0" are one generator
            devices = [d if d.index is not None else torch.device(d.type, self.device_module.current_device())
                       for d in devices]  # fmt: skip
        self.devices = sorted(set(devices), key=str)
        self.states = {"cpu": torch.Generator().manual_seed(seed).get_state()}
        for device in self.devices:
            self.states[str(device)] = torch.Generator(device=device).manual_seed(seed).get_state()

    @contextlib.contextmanager
    def active(self):
        """Run the block on this stream: its states in torch's global generators, the global states back after."""
        saved_cpu = torch.get_rng_state()
        saved_devices = [self.device_module.get_rng_state(d) for d in self.devices]
        torch.set_rng_state(self.states["cpu"])
        for device in self.devices:
            self.device_module.set_rng_state(self.states[str(device)], device)
        try:
            yield
        finally:
            self.states["cpu"] = torch.get_rng_state()
            for device in self.devices:
                self.states[str(device)] = self.device_module.get_rng_state(device)
            torch.set_rng_state(saved_cpu)
            for device, state in zip(self.devices, saved_devices):
                self.device_module.set_rng_state(state, device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.states) - set(state))
        if missing:
            logger.warning(
                f"The checkpoint's UDS scoring stream has no generator state for {', '.join(missing)} (it was saved "
                f"for {', '.join(sorted(state))}): the scoring forward's dropout on it restarts from its seed."
            )
        self.states.update({name: value.clone() for name, value in state.items() if name in self.states})


# ----------------------------------------------------------------------------------------------------- the callback


@dataclass
class UDSSettings:
    """The settings of a `UDSCallback` (the `uds_*` fields of `UDSConfig` without their prefix)."""

    keep: int = 1
    alpha: float = 1.5e-3
    memory_size: int = 1024
    sketch_rows: int = 8
    sketch_cols: int = 128
    sketch_length: int | None = None
    start_step: int = 0
    mask_padding: bool = True
    mode: str = "uds"
    seed: int | None = None


def check_uds_settings(settings: UDSSettings, batch_size: int | None = None) -> None:
    """Raise a `ValueError` naming the `uds_*` field and the fix for any invalid setting."""

    if not is_integer(settings.keep) or settings.keep < 1:
        raise ValueError(
            f"`uds_keep={settings.keep!r}` must be a positive number of examples to keep from each candidate "
            "micro-batch (the reference keeps 1 of 4)."
        )
    if batch_size is not None and settings.keep >= batch_size:
        raise ValueError(
            f"`uds_keep={settings.keep}` must be smaller than `per_device_train_batch_size={batch_size}`, the number "
            f"of candidates UDS selects from: with keep >= candidates nothing is selected. Raise "
            f"`per_device_train_batch_size` (e.g. to {4 * settings.keep} for 1 of 4) or lower `uds_keep`."
        )
    alpha = settings.alpha
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"`uds_alpha={settings.alpha!r}` must be a finite number >= 0 (the reference uses 1.5e-3).")
    for name in ("memory_size", "sketch_rows", "sketch_cols"):
        value = getattr(settings, name)
        if not is_integer(value) or value < 1:
            raise ValueError(f"`uds_{name}={value!r}` must be a positive integer.")
    if settings.sketch_length is not None and (not is_integer(settings.sketch_length) or settings.sketch_length < 1):
        raise ValueError(
            f"`uds_sketch_length={settings.sketch_length!r}` must be a positive number of tokens (at least the "
            "longest padded batch), or None for `max_length`."
        )
    if not is_integer(settings.start_step) or settings.start_step < 0:
        raise ValueError(f"`uds_start_step={settings.start_step!r}` must be an optimizer step >= 0.")
    if settings.mode not in MODES:
        choices = ", ".join(map(repr, MODES))
        raise ValueError(f"`uds_mode={settings.mode!r}` is not a UDS mode: choose one of {choices}.")
    if settings.seed is not None and not is_integer(settings.seed):
        raise ValueError(f"`uds_seed={settings.seed!r}` must be an integer or None (then `seed` is used).")


@dataclass
class Selection:
    """What `UDSCallback.select` decided for one candidate micro-batch."""

    indices: torch.Tensor  # [K] selected rows, ascending
    utility: torch.Tensor | None = None  # [B] float64, None when not scored
    diversity: torch.Tensor | None = None  # [B] float64
    scores: torch.Tensor | None = None  # [B] utility + alpha * diversity


class UDSCallback(TrainerCallback):
    """
    Owns the state of UDS online batch selection: the sketch constants, the FIFO memory of selected sketches (with its
    pointer and fill count), the generator of the `random` mode, the random stream of the scoring forward's dropout
    and the cached lm_head factors; selects the examples to keep from each candidate micro-batch; saves and restores
    all of it with the checkpoints.

    The trainer hook that feeds it the candidates is [`UDSMixin`] (`with_uds(TrainerClass)`), which creates the
    callback from the config's `uds_*` fields (a callback passed in `callbacks=` is used instead if its settings
    match the config's). A callback on a trainer without that hook refuses to start: a callback alone never sees
    the batches.

    Args:
        settings ([`UDSSettings`], *optional*): the selection settings; defaults to the reference's.
    """

    def __init__(self, settings: UDSSettings | None = None, **kwargs):
        self.settings = UDSSettings(**kwargs) if settings is None else settings
        if settings is not None and kwargs:
            raise ValueError("Pass either a `UDSSettings` or its fields as keyword arguments, not both.")
        check_uds_settings(self.settings)
        self.constants: SketchConstants | None = None
        self.memory: SketchMemory | None = None
        self.generator: torch.Generator | None = None
        self.scoring_stream: ScoringRandomStream | None = None
        self.trainer_attached = False
        self.factor_computations = 0  # how often the lm_head factors were (re)computed; for tests and profiling
        self._factors: HeadFactors | None = None
        self._factors_key = None
        self._vocab_transform: torch.Tensor | None = None

    @classmethod
    def from_config(cls, args) -> UDSCallback:
        """A callback with the `uds_*` settings of a [`UDSConfig`]."""
        return cls(settings_from_config(args))

    # ------------------------------------------------------------------ set-up
    def setup(
        self, vocab_size: int, sketch_length: int, device, process_index: int = 0, seed: int = 0, model_devices=()
    ) -> None:
        """Draw the sketch constants (the same on every process: they are seeded with `seed` only) and create the
        memory, the `random` mode's generator (seeded with `seed + process_index`, one stream per process) and the
        scoring forward's random stream (a [`ScoringRandomStream`] on the CPU, `device` and `model_devices`, seeded
        from a number drawn from `seed + process_index`: its dropout masks are not the training forward's, whose
        stream transformers seeds with `seed`)."""
        settings = self.settings
        generator = torch.Generator().manual_seed(seed)
        self.constants = SketchConstants.draw(
            sketch_length, vocab_size, settings.sketch_rows, settings.sketch_cols, generator
        ).to(device)
        self.memory = SketchMemory(settings.memory_size, settings.sketch_rows * settings.sketch_cols, device)
        self.generator = torch.Generator().manual_seed(seed + process_index)
        scoring_seed = int(torch.randint(2**62, (), generator=torch.Generator().manual_seed(seed + process_index)))
        self.scoring_stream = ScoringRandomStream(scoring_seed, [torch.device(device), *model_devices])
        self._factors = self._factors_key = self._vocab_transform = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.trainer_attached:
            raise ValueError(
                "UDSCallback selects examples from each batch, which a callback never sees: use it through a UDS "
                "trainer, `with_uds(TrainerClass)` (e.g. `with_uds(SFTTrainer)` or `with_uds(ASFTTrainer)`), which "
                "creates the callback from the config's `uds_*` fields."
            )

    # ------------------------------------------------------------------ scoring and selection
    def head_factors(self, weight: torch.Tensor, bias: torch.Tensor | None, step: int) -> HeadFactors:
        """The lm_head factors, recomputed only when the head can have changed: once per optimizer step while it is
        trained, once per run while it is frozen (or whenever its storage or version counter changes)."""
        trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        key = (
            step if trainable else None,
            weight.data_ptr(),
            weight._version,
            None if bias is None else (bias.data_ptr(), bias._version),
            tuple(weight.shape),
            dtype,
        )
        if self._factors is None or key != self._factors_key:
            # The cosines of the vocabulary side are fixed for the run ([V, r2]: 16 MB at V = 32000 in float32);
            # building them costs more than the matmuls on a CPU, so they are kept
            cached = self._vocab_transform
            if cached is None or cached.dtype != dtype or cached.device != weight.device:
                cached = self.constants.vocab_transform(0, self.constants.vocab_size, dtype, weight.device)
                self._vocab_transform = cached
            self._factors = head_factors(
                weight.detach(), None if bias is None else bias.detach(), self.constants, dtype, cached
            )
            self._factors_key = key
            self.factor_computations += 1
        return self._factors

    @torch.no_grad()
    def score(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        step: int,
        logit_transform: LogitTransform | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Utility `[B]`, diversity `[B]` (mean distance to the memory) and sketches `[B, r1 * r2]` of a batch whose
        logits are `logit_transform(hidden @ weight.T + bias)` (`hf_plugins.modeling.logit_transform(model)`)."""
        mask_padding = self.settings.mask_padding
        transform = PLAIN_LOGITS if logit_transform is None else logit_transform
        if transform.softcap is None:
            factors = self.head_factors(weight, bias, step)
            utility, sketch = scores_from_hidden(hidden, factors, self.constants, attention_mask, mask_padding)
            if transform.scale != 1.0:  # both scores of s * L: the nuclear norm is absolutely homogeneous
                utility, sketch = utility * abs(transform.scale), sketch * transform.scale
        else:
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            utility, sketch = scores_from_hidden_softcapped(
                hidden, weight.detach(), None if bias is None else bias.detach(), transform.softcap, self.constants,
                attention_mask, mask_padding, dtype, transform.scale,
            )  # fmt: skip
        return utility, self.memory.mean_distances(sketch), sketch

    def select_random(self, batch_size: int) -> Selection:
        keep = min(self.settings.keep, batch_size)
        indices = torch.randperm(batch_size, generator=self.generator)[:keep]
        return Selection(indices=indices.sort().values)

    def select_from_scores(self, utility: torch.Tensor, diversity: torch.Tensor, sketch: torch.Tensor) -> Selection:
        """Keep the top `keep` of `utility + alpha * diversity` and push their sketches into the memory."""
        scores = utility + self.settings.alpha * diversity
        keep = min(self.settings.keep, scores.shape[0])
        indices = torch.topk(scores, keep, largest=True, sorted=False).indices.sort().values
        self.memory.push(sketch[indices])
        return Selection(indices=indices, utility=utility, diversity=diversity, scores=scores)

    # ------------------------------------------------------------------ state in checkpoints
    def state_dict(self) -> dict[str, Any]:
        c = self.constants
        return {
            "version": 2,
            "d1": c.d1.cpu(), "d2": c.d2.cpu(), "idx1": c.idx1.cpu(), "idx2": c.idx2.cpu(),
            "memory": self.memory.state_dict(),
            "generator": self.generator.get_state(),
            "scoring_stream": self.scoring_stream.state_dict(),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = SketchConstants(state["d1"], state["d2"], state["idx1"], state["idx2"])
        mine = self.constants
        for name, label in (("length", "uds_sketch_length"), ("vocab_size", "the vocabulary size"),
                            ("rows", "uds_sketch_rows"), ("cols", "uds_sketch_cols")):  # fmt: skip
            if getattr(saved, name) != getattr(mine, name):
                raise ValueError(
                    f"The checkpoint's UDS sketch was drawn with {label} = {getattr(saved, name)}, this run's with "
                    f"{getattr(mine, name)}: resume with the settings the checkpoint was trained with."
                )
        device = mine.d1.device
        self.constants = saved.to(device)
        self.memory.load_state_dict(state["memory"])
        self.generator.set_state(state["generator"])
        if "scoring_stream" in state:  # version 1 checkpoints have none: the stream continues from its seed
            self.scoring_stream.load_state_dict(state["scoring_stream"])
        self._factors = self._factors_key = self._vocab_transform = None

    @staticmethod
    def state_file(folder: str, process_index: int = 0, world_size: int = 1) -> str:
        suffix = "" if world_size <= 1 else f"_{process_index}"
        return os.path.join(folder, f"{UDS_STATE_NAME}{suffix}.pt")

    def save(self, folder: str, process_index: int = 0, world_size: int = 1) -> None:
        os.makedirs(folder, exist_ok=True)
        torch.save(self.state_dict(), self.state_file(folder, process_index, world_size))

    def load(self, folder: str, process_index: int = 0, world_size: int = 1) -> bool:
        """Restore the state saved in checkpoint `folder`; warns and returns False if there is none."""
        path = self.state_file(folder, process_index, world_size)
        if not os.path.isfile(path):
            logger.warning(
                f"No UDS state in {folder} ({os.path.basename(path)}): the resumed run starts with an empty memory "
                "and selects other examples than the uninterrupted run would have."
            )
            return False
        self.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
        return True


def settings_from_config(args) -> UDSSettings:
    """The `UDSSettings` of a config with `uds_*` fields."""
    return UDSSettings(**{f.name: getattr(args, f"uds_{f.name}") for f in fields(UDSSettings)})
