"""`TLGRPOTrainer`: TL-Training's reinforcement-learning stage (arXiv 2412.15495) on `FusedGRPOTrainer`.

The paper optimises its rule-based tool-call reward (IRM) with PPO after the SFT stage (`TLTrainer`); here the same
reward drives GRPO on the fused head. The trainer adds two things to `FusedGRPOTrainer`, and nothing else:

- the reward: `hf_plugins.rewards.tool_call_reward` (built by `make_tool_call_reward` from the config's
  `gold_call_column` and `strict_tool_parsing`) is the first of `reward_funcs`, so `hf-plugins tl-grpo` needs no
  `--reward_funcs`; any given are added after it;
- the prompts: each row of a `messages` + `tools` dataset (TLTrainer's) becomes a text prompt, its conversation up
  to the first assistant turn rendered with the row's own tools (`hf_plugins.data.render_tool_prompt`), because
  GRPOTrainer renders conversational prompts with one trainer-wide `tools` list, which it also executes.

Generation, the loss, the logging (`tool_call/<category>` besides TRL's metrics) and checkpoints are
FusedGRPOTrainer's and TRL's.
"""

from __future__ import annotations

from itertools import islice

from datasets import Dataset, IterableDataset
from trl.data_utils import get_dataset_column_names
from trl.trainer.utils import global_then_local_main_first

from ..data import render_tool_prompt
from ..rewards import classify_tool_call, make_tool_call_reward
from .grpo_trainer import FusedGRPOTrainer
from .tl_grpo_config import TLGRPOConfig
from .tl_trainer import TLTrainer


#: Rows of a dataset whose gold calls and tools are parsed before training (all of them for smaller datasets)
CHECKED_ROWS = 1000


class TLGRPOTrainer(FusedGRPOTrainer):
    """
    Trainer for TL-Training's reinforcement-learning stage (arXiv 2412.15495): GRPO with the tool-call
    error-category reward, on the fused head. A drop-in replacement for `trl.GRPOTrainer` that needs no reward
    function and takes TLTrainer's dataset as it is.

    It takes the arguments of `GRPOTrainer` with a [`TLGRPOConfig`] as `args`. `reward_funcs`, if given, are added
    after the tool-call reward (`reward_weights` then list the tool-call reward first). The dataset has a `tools`
    column (JSON schemas, a list or a JSON string), the gold call (`args.gold_call_column`) and the prompts: a
    `messages` column (the conversation, cut before its first assistant turn), a conversational `prompt` column, or
    text prompts already rendered with the tools. Conversations are rendered as text with each row's own tools by
    the tokenizer's chat template (`hf_plugins.data.render_tool_prompt`, which swaps in the shipped training template
    for an original that drops the tools, e.g. SmolLM2's).

    Logged (besides TRL's and FusedGRPOTrainer's): `tool_call/<category>`, the mean number of a reward call's
    completions in each category, and the reward as `rewards/tool_call_reward/mean`.

    Start from the SFT model (`TLTrainer`): a model that never writes a call gets -2 for every completion, so every
    group has zero reward spread and GRPO nothing to learn from (`frac_reward_zero_std` 1).

    Refused before training, with the reason (besides FusedGRPOTrainer's refusals): a dataset without `tools`, without
    the gold-call column or without prompts, an unparsable gold call, malformed `tools`, and `tools` given to the
    trainer (the declared tools of each row are the dataset's, and are not executed).
    """

    command = "tl-grpo"
    description = "TL-Training's RL stage: GRPO with the tool-call category reward, on the fused head"
    #: The trainer brings its reward: `hf-plugins tl-grpo` needs no `--reward_funcs`
    builds_own_reward = True

    _tag_names = ["trl", "grpo", "tl-training", "hf-plugins"]
    _name = "TL-Training (RL stage)"
    _paper = TLTrainer._paper

    config_class = TLGRPOConfig

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: TLGRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        *positional,
        **kwargs,
    ):
        args = self.coerce_args(model, args)
        if kwargs.get("tools") or kwargs.get("environment_factory"):
            raise ValueError(
                "TLGRPOTrainer does not take `tools` or `environment_factory`: each row declares its own tools in the "
                "dataset's `tools` column, which the reward checks the call against (nothing is executed). Use "
                "FusedGRPOTrainer to run tools."
            )
        if train_dataset is None:
            raise ValueError("TLGRPOTrainer needs a `train_dataset` of tool-calling prompts (`messages` + `tools`).")
        self.check_dataset(train_dataset, args, "train")
        for split, dataset in _splits(eval_dataset).items():
            self.check_dataset(dataset, args, split)
        reward = make_tool_call_reward(args.gold_call_column, strict=args.strict_tool_parsing)
        super().__init__(
            model, [reward, *self.reward_list(reward_funcs)], args, train_dataset, eval_dataset, *positional, **kwargs
        )
        # Rendered with the processing class GRPOTrainer generates with (the one passed, or the model's own)
        self.train_dataset = self._rendered(self.train_dataset)
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {name: self._rendered(dataset) for name, dataset in self.eval_dataset.items()}
        elif self.eval_dataset is not None:
            self.eval_dataset = self._rendered(self.eval_dataset)

    @classmethod
    def check_dataset(cls, dataset, args: TLGRPOConfig, split: str = "train") -> None:
        """Refuse, with a one-line `ValueError`, a dataset TL-Training's RL stage cannot read: no prompts, no `tools`
        or no gold-call column; an unparsable gold call or malformed `tools` (in the first `CHECKED_ROWS` rows).
        The command line runs it before any model loads."""
        columns = get_dataset_column_names(dataset)
        listed = ", ".join(f"`{column}`" for column in columns) or "none"
        gold = args.gold_call_column
        missing = [column for column in ("tools", gold) if column not in columns]
        if missing:
            what = " and ".join(f"`{column}`" for column in missing)
            raise ValueError(
                f"The {split} dataset has the columns {listed} but no {what}: TL-Training's reward compares each "
                f"completion's call with the row's gold call (`{gold}`, e.g. \"get_weather(city='Paris')\"; set "
                "`gold_call_column` for another name) and its declared tools (`tools`, JSON schemas)."
            )
        if "prompt" not in columns and "messages" not in columns:
            raise ValueError(
                f"The {split} dataset has the columns {listed} but no prompts: give a `messages` column (the "
                "conversation; the prompt is cut before its first assistant turn) or a `prompt` column."
            )
        for index, row in enumerate(islice(iter(dataset), CHECKED_ROWS)):
            try:
                classify_tool_call("", row[gold], row["tools"])  # parses the gold call and the tools
            except ValueError as error:
                raise ValueError(f"The {split} dataset's row {index}: {str(error).splitlines()[0]}") from None

    def _rendered(self, dataset):
        """Text prompts with each row's own tools; a dataset whose `prompt` is text already is used as it is."""
        first = next(iter(dataset))
        if isinstance(first.get("prompt"), str):
            return dataset
        columns = get_dataset_column_names(dataset)
        with global_then_local_main_first():
            return dataset.map(
                render_tool_prompt,
                fn_kwargs={"tokenizer": self._tokenizer},
                remove_columns=[column for column in ("messages",) if column in columns],
            )


def _splits(eval_dataset) -> dict:
    """The evaluation datasets by name (`eval` for a single one)."""
    if eval_dataset is None:
        return {}
    if isinstance(eval_dataset, (Dataset, IterableDataset)):
        return {"eval": eval_dataset}
    return dict(eval_dataset)
