"""A method's own random generator as part of the training state: seeded per process, saved in every checkpoint next
to Trainer's RNG states and restored on resume, so that a resumed run draws exactly what the uninterrupted run would
have drawn (OTR's token samples, MFT's masked positions).

A trainer mixes `MethodGeneratorMixin` in before its trainer base, sets `generator_state_name` (the checkpoint file's
stem) and calls `_make_method_generator(seed)` once in `__init__`; the mixin hooks Trainer's `_save_rng_state` and
`_load_rng_state`, which run per process in every full checkpoint and, when resuming, after the skipped batches and
before the first new forward.
"""

from __future__ import annotations

import os

import torch

from ..utils import get_logger


logger = get_logger(__name__)


class MethodGeneratorMixin:
    #: The generator's file in a checkpoint folder: `<name>.pth`, or `<name>_<rank>.pth` under several processes
    generator_state_name: str
    #: The generator, on the training device
    method_generator: torch.Generator

    def _make_method_generator(self, seed: int | None) -> torch.Generator:
        """The method's generator on the training device, seeded with `seed` (None: the config's `seed`) plus the
        process index: data-parallel ranks see different data but would draw the same numbers from one seed."""
        base = self.args.seed if seed is None else seed
        self.method_generator = torch.Generator(device=self.accelerator.device)
        self.method_generator.manual_seed(base + self.args.process_index)
        return self.method_generator

    def _method_generator_file(self, folder: str) -> str:
        suffix = "" if self.args.world_size <= 1 else f"_{self.args.process_index}"
        return os.path.join(folder, f"{self.generator_state_name}{suffix}.pth")

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        torch.save({"generator": self.method_generator.get_state()}, self._method_generator_file(output_dir))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = self._method_generator_file(checkpoint)
        if not os.path.isfile(path):
            logger.warning(
                f"No {type(self).__name__} generator state in {checkpoint} ({os.path.basename(path)}): the resumed run "
                "draws other random numbers than the uninterrupted run would have."
            )
            return
        state = torch.load(path, weights_only=True, map_location="cpu")
        self.method_generator.set_state(state["generator"])
