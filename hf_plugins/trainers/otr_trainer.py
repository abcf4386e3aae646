"""`OTRTrainer`: One-Token Rollout (arXiv 2509.26313) as a drop-in `SFTTrainer`.

The loss is the `"otr"` method of the fused head (see `hf_plugins.losses.otr`). What this module adds is the
sampling generator and its life cycle: one `torch.Generator` per process, seeded from the config, drawn from once per
micro-batch, saved in every checkpoint and restored on resume, so that a resumed run draws exactly the samples the
uninterrupted run would have drawn.
"""

from __future__ import annotations

from typing import Any

from .fused_sft_trainer import FusedSFTTrainer
from .generator_state import MethodGeneratorMixin
from .otr_config import OTRConfig


#: Name of the file, inside a checkpoint folder, that holds the OTR generator state (one per process when distributed)
OTR_RNG_STATE_NAME = "otr_rng_state"


class OTRTrainer(MethodGeneratorMixin, FusedSFTTrainer):
    """
    Trainer for One-Token Rollout: TRL's `SFTTrainer` whose loss samples `num_samples` tokens per supervised position
    from the tempered policy and applies the REINFORCE surrogate (reward 1 for the label, `negative_reward` else).

    It takes exactly the arguments of `SFTTrainer`; pass an [`OTRConfig`] as `args` for the OTR hyperparameters (a
    plain `SFTConfig` gets OTR's defaults).

    Sampling: the generator `self.otr_generator` lives on the training device, seeded with `otr_seed` (or `seed`)
    plus the process index; its state is written to `otr_rng_state.pth` in every checkpoint and restored with the
    other RNG states when training resumes. Evaluation never draws from it: the evaluation loss is the exact
    expectation over the tempered policy (the mean of the training loss over all possible samples, without noise),
    so evaluating neither perturbs the training stream nor depends on luck.
    """

    _tag_names = ["trl", "sft", "hf-plugins", "otr"]
    generator_state_name = OTR_RNG_STATE_NAME
    config_class = OTRConfig
    command = "otr"
    description = "One-Token Rollout: a one-step policy gradient at every token"
    _name = "OTR"
    _paper = {
        "title": "One-Token Rollout: Guiding Supervised Fine-Tuning of LLMs with Policy Gradient",
        "id": "2509.26313",
    }

    def __init__(self, model, args: OTRConfig | None = None, *positional, **kwargs):
        super().__init__(model, args, *positional, **kwargs)
        # seeded per process, saved in every checkpoint and restored on resume (`MethodGeneratorMixin`)
        self.otr_generator = self._make_method_generator(self.args.otr_seed)

    # ------------------------------------------------------------------ loss hooks
    def loss_method(self) -> str:
        return "otr"

    def loss_method_inputs(self, model, inputs: dict[str, Any], extra_columns) -> dict[str, dict[str, Any]]:
        settings = {"temperature": self.args.temperature, "negative_reward": self.args.negative_reward}
        if not self.model.training:
            return {"other_inputs": {**settings, "num_samples": None}}
        # The head draws its uniforms once per forward, in `prepare`, and reuses them for every tile. Under gradient
        # checkpointing only the decoder layers are recomputed: the head runs outside the checkpointed backbone, so no
        # recomputation re-enters it and the generator advances exactly once per micro-batch either way.
        return {"other_inputs": {**settings, "num_samples": self.args.num_samples, "generator": self.otr_generator}}
