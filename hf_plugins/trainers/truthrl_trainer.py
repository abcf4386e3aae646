"""`TruthRLTrainer`: `FusedGRPOTrainer` with TruthRL's truthfulness reward as its default reward (arXiv 2509.25760).

TruthRL is GRPO with a ternary outcome reward: +1 for a correct answer, 0 for an abstention (`\\boxed{I don't know}`),
-1 for a hallucination. The reward is `hf_plugins.rewards.make_truthrl_reward`, which works with TRL's stock
`GRPOTrainer` as it is; this trainer only builds it from the config's `truthrl_*` fields (so `hf-plugins truthrl`
needs no `--reward_funcs`) and checks the dataset's answers column before the model loads. The loss, generation and
logging are `FusedGRPOTrainer`'s.
"""

from __future__ import annotations

from ..rewards.truthrl import make_truthrl_reward
from .grpo_trainer import FusedGRPOTrainer
from .truthrl_config import TruthRLConfig


def _columns(dataset) -> list[str] | None:
    """The column names of a dataset, None when unknown until read (a streaming dataset without features)."""
    names = getattr(dataset, "column_names", None)
    if isinstance(names, dict):  # a DatasetDict: the columns every split has
        splits = list(names.values())
        return [name for name in splits[0] if all(name in split for split in splits)] if splits else []
    return list(names) if names is not None else None


class TruthRLTrainer(FusedGRPOTrainer):
    """
    GRPO on the fused policy-loss head with TruthRL's truthfulness reward.

    It takes the arguments of [`FusedGRPOTrainer`] (and so of `trl.GRPOTrainer`), with `reward_funcs` optional:
    `None` trains on the TruthRL reward built from `args` (a [`TruthRLConfig`]: scheme, answers column,
    out-of-knowledge column, abstention phrases, brace handling) and `judge`. Reward functions given without a
    TruthRL reward among them are added after it (weights as `reward_weights` says, in that order); a list that holds
    one (`make_truthrl_reward(...)`) is used as given, and the `truthrl_*` fields are then not read.

    Args:
        judge (`callable`, *optional*): a batched judge for answers that match no gold answer exactly, as
            `make_truthrl_reward` takes it (called once here on a probe, so that a failing judge is reported before
            training). `None`: exact match only.

    Refused before the model loads, with the fix: a training or evaluation dataset without the answers column (or,
    for the `*_ook` schemes, the out-of-knowledge column), `truthrl_judge` set in Python without `judge`, and every
    refusal of `FusedGRPOTrainer`.
    """

    #: `hf-plugins truthrl` trains with this trainer (the registry `hf_plugins.trainers.TRAINERS`)
    command = "truthrl"
    description = "TruthRL: GRPO with the ternary truthfulness reward (correct +1, abstain 0, wrong -1)"
    config_class = TruthRLConfig
    #: the command line gives it no `--reward_funcs` by default: the reward is built from the config
    builds_own_reward = True
    #: config fields that name a callable by import path, resolved by the command line into this keyword argument
    callable_fields = {"truthrl_judge": "judge"}

    _tag_names = ["trl", "grpo", "hf-plugins", "truthrl"]
    _name = "TruthRL"
    _paper = {"title": "TruthRL: Incentivizing Truthful LLMs via Reinforcement Learning", "id": "2509.25760"}

    def __init__(self, model, reward_funcs=None, args: TruthRLConfig | None = None, *positional, judge=None, **kwargs):
        args = self.coerce_args(model, args)
        given = self.reward_list(reward_funcs)
        preset = [func for func in given if hasattr(func, "truthrl_settings")]
        if preset:
            settings = preset[0].truthrl_settings
            answers_column, ook_column = settings["answers_column"], settings["ook_column"]
        else:
            if args.truthrl_judge is not None and judge is None:
                raise ValueError(
                    f"`truthrl_judge={args.truthrl_judge!r}` is an import path, which `hf-plugins truthrl` resolves; "
                    "in Python pass the judge itself: TruthRLTrainer(..., judge=my_judge)."
                )
            truthrl = make_truthrl_reward(
                answers_column=args.truthrl_answers_column,
                scheme=args.truthrl_scheme,
                ook_column=args.truthrl_ook_column,
                judge=judge,
                abstain_phrases=tuple(args.truthrl_abstain_phrases),
                balanced_braces=args.truthrl_balanced_braces,
            )
            answers_column, ook_column = args.truthrl_answers_column, truthrl.truthrl_settings["ook_column"]
            given = [truthrl, *given]
        names = ("train_dataset", "eval_dataset")
        datasets = {name: kwargs.get(name) for name in names}
        for name, value in zip(names, positional):  # GRPOTrainer's positional order after `args`
            datasets[name] = value
        for name, dataset in datasets.items():
            self._check_columns(dataset, name, answers_column, ook_column)
        super().__init__(model, given, args, *positional, **kwargs)

    @staticmethod
    def _check_columns(dataset, name: str, answers_column: str, ook_column: str | None) -> None:
        if dataset is None:
            return
        for split, part in dataset.items() if isinstance(dataset, dict) else [(None, dataset)]:
            columns = _columns(part)
            if columns is None:
                continue
            where = ("training" if name == "train_dataset" else "evaluation") + (f" ({split!r})" if split else "")
            for column, what, fix in (
                (answers_column, "the gold answers", "--truthrl_answers_column"),
                (ook_column, "the out-of-knowledge flags", "--truthrl_ook_column"),
            ):
                if column is not None and column not in columns:
                    raise ValueError(
                        f"the {where} dataset has no `{column}` column ({what} the TruthRL reward reads; it has "
                        f"{', '.join(f'`{c}`' for c in columns) or 'none'}): add it, or name yours with {fix}"
                    )
