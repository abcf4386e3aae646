"""`hf-plugins compare`: several methods trained from the same starting model, data, seed and budget, side by side.

    hf-plugins compare --methods sft,dft,asft --config run.yaml [--eval_dataset DATA] [--general_eval_dataset DATA]
        [--output_dir compare] [--no_plots] [--any_config_field value] [--asft.kl_coef 0.1]

Each method runs as `hf-plugins <method> --config run.yaml` would (`hf_plugins.training_script`: the same parsing,
checks and trainer), with every option given to all of them, except the `--<method>.<field>` options, given to that
method only. `sft` is the `sft` command with `loss_type nll`, `dft` the same with `loss_type dft`, `uds` the `sft`
command with UDS online batch selection (`--uds`, so the same optimizer steps on fewer tokens), `hft` the `sft`
command with Half Fine-Tuning (`--hft`); the other names are
the SFT-side commands of `hf_plugins.trainers.TRAINERS`. Every run is evaluated on the same tokens
(`hf_plugins.comparison.evaluation`), before its first step, every `eval_steps` steps (default: ten times) and after
its last step.

Bad input (an unknown method, a field no method takes, a dataset a method cannot train on, a held-out set in no SFT
format) ends with one line, exit status 2, before any training.

Written to `--output_dir`: `<method>/` (each run: the trained model, its `trainer_state.json` and
`compare_run.json`, the record whose presence marks the run finished: a rerun reuses it instead of training again),
`held_out/` (the tokenized held-out sets, reused by a rerun), `results.json`, `results.md` (the table) and, when
matplotlib is installed (the `bench` extra), `train_loss.png`, `eval_loss.png` and `drift.png`.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..cli_checks import UsageError


#: The names that are not commands of the registry: (command, the options that make the method)
SFT_VARIANTS = {
    "sft": ("sft", ["--loss_type", "nll"]),
    "dft": ("sft", ["--loss_type", "dft"]),
    "uds": ("sft", ["--uds", "--loss_type", "nll"]),
    "hft": ("sft", ["--hft", "--loss_type", "nll"]),
}


def method_names() -> list[str]:
    """The methods `compare` runs: the SFT variants and every SFT-side command of the registry."""
    from trl import GRPOTrainer

    from ..trainers import TRAINERS

    commands = [name for name, trainer in TRAINERS.items() if not issubclass(trainer, GRPOTrainer) and name != "sft"]
    return [*SFT_VARIANTS, *commands]


def _parse_methods(methods) -> list[str]:
    if isinstance(methods, str):
        methods = [name.strip() for name in methods.split(",") if name.strip()]
    methods = list(methods or ())
    if not methods:
        raise UsageError("--methods: name at least one method, e.g. --methods sft,dft,asft")
    known = method_names()
    for name in methods:
        if name not in known:
            raise UsageError(
                f"--methods: unknown method {name!r}; choose from {', '.join(known)} (GRPO-side methods need rewards "
                "and prompts: train them with their own command)"
            )
    repeated = sorted({name for name in methods if methods.count(name) > 1})
    if repeated:
        raise UsageError(f"--methods: {', '.join(repeated)} listed more than once")
    return methods


def _as_flags(options, what: str) -> list[str]:
    """Options as command-line flags: a list of flags as they are, or a mapping field -> value."""
    if options is None:
        return []
    if isinstance(options, dict):
        flags = []
        for name, value in options.items():
            if isinstance(value, (list, tuple)):  # a list field takes its items as separate values, as on the CLI
                flags += [f"--{name}", *map(str, value)]
            else:
                flags += [f"--{name}", json.dumps(value) if isinstance(value, dict) else str(value)]
        return flags
    if isinstance(options, str) or not isinstance(options, Sequence):
        raise UsageError(f"{what}: pass a list of flags (['--max_steps', '60']) or a mapping {{'max_steps': 60}}")
    return [str(option) for option in options]


def split_method_options(argv: list[str], methods: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """`--<method>.<field> value` (or `--<method>.<field>=value`) options apart from the others: (the options for
    every method, method -> its own options)."""
    common, own = [], {method: [] for method in methods}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." in name:
            method, field = name.split(".", 1)
            if method not in own:
                raise UsageError(f"--{name}: {method!r} is not one of the compared methods ({', '.join(methods)})")
            if "=" in arg:
                own[method] += [f"--{field}", arg.split("=", 1)[1]]
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                own[method] += [f"--{field}", argv[i + 1]]
                i += 1
            else:
                own[method].append(f"--{field}")
        else:
            common.append(arg)
        i += 1
    return common, own


def _fingerprint(data) -> str:
    """A short digest of `data` (JSON-serialisable, or a dataset: its fingerprint)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _dataset_identity(dataset) -> Any:
    return getattr(dataset, "_fingerprint", None) or repr(dataset)


def _load_held_out(source, flag: str, setup):
    """A held-out set: a `Dataset`, or a name the training data could be (Hub id, local file or folder, `save_to_disk`
    folder), of which the `test` split is used (or the only split)."""
    from datasets import Dataset, DatasetDict

    from ..training_script import load_training_data

    if isinstance(source, Dataset):
        return source
    if isinstance(source, DatasetDict):
        data = source
    else:
        if not isinstance(source, str) or not source:
            raise UsageError(f"{flag}: pass a dataset name or path, or a `datasets.Dataset`")
        from trl import DatasetMixtureConfig, ScriptArguments

        data = load_training_data(ScriptArguments(dataset_name=source), DatasetMixtureConfig())
    if isinstance(data, Dataset):
        return data
    if len(data) == 1:
        return next(iter(data.values()))
    split = setup.script_args.dataset_test_split
    if split not in data:
        raise UsageError(f"{flag} {source}: it has the splits {', '.join(data)} but no {split!r} split to evaluate on")
    return data[split]


def _check_held_out(dataset, flag: str, args) -> None:
    """A held-out set is tokenized as SFT data: it needs an SFT format (and assistant turns with assistant-only
    loss)."""
    from ..cli_checks import check_assistant_turns, check_dataset_format

    if len(dataset) == 0:
        raise UsageError(f"{flag}: the held-out set has no rows")
    found = check_dataset_format(dataset, "compare", flag, args.dataset_text_field)
    check_assistant_turns(dataset, found, flag, bool(args.assistant_only_loss), True, True)


class _Run:
    """One method of the comparison: its name, its options, its folder and its checked setup."""

    def __init__(self, method: str, argv: list[str], folder: Path, settings: dict):
        from ..training_script import prepare_training

        self.method, self.folder, self.settings = method, folder, settings
        self.command, _ = SFT_VARIANTS.get(method, (method, []))
        self.setup = prepare_training(self.command, argv)

    @property
    def record_path(self) -> Path:
        return self.folder / _report().RECORD

    def finished_record(self) -> dict | None:
        """The record of a finished run with these settings; a `UsageError` for one made with other settings."""
        if not self.record_path.is_file():
            return None
        record = json.loads(self.record_path.read_text())
        if record.get("settings") != self.settings:
            raise UsageError(
                f"{self.record_path} is the record of a finished {self.method} run with other settings: pass another "
                "--output_dir, or delete that folder to train it again"
            )
        return record


def _method_argv(config, common: list[str], method: str, own: list[str], folder: Path) -> list[str]:
    _, variant = SFT_VARIANTS.get(method, (method, []))
    argv = ["--config", str(config)] if config else []
    argv += [*common, *variant, *own, "--output_dir", str(folder), "--eval_strategy", "no"]
    given = any(arg == "--logging_steps" or arg.startswith("--logging_steps=") for arg in argv)
    if not given:
        from ..trainers.hub_config import read_config_yaml, resolve_config_file

        if not (config and "logging_steps" in read_config_yaml(resolve_config_file(str(config)))):
            argv += ["--logging_steps", "1"]  # the training loss of every step, for the plot
    return argv


def compare(
    methods: str | Sequence[str],
    config: str | Path | None = None,
    *,
    args: Sequence[str] | dict | None = None,
    method_args: dict[str, Sequence[str] | dict] | None = None,
    eval_dataset=None,
    general_eval_dataset=None,
    output_dir: str | Path = "compare",
    plots: bool | None = None,
    save_models: bool = True,
    extra_metrics: Callable[[str, Any], dict] | None = None,
) -> dict[str, Any]:
    """Train each of `methods` from the same starting model, data, seed and budget and evaluate every run on the same
    held-out sets; write `results.json`, `results.md` and the plots to `output_dir` and return the results.

    Args:
        methods (`str` or list of `str`): method names, e.g. `"sft,dft,asft"` (see `method_names()`).
        config (`str` or `Path`, *optional*): the YAML every method reads, as `hf-plugins <method> --config`.
        args (list of flags or `dict`, *optional*): options for every method, e.g. `{"max_steps": 60}`.
        method_args (`dict`, *optional*): method -> options for that method only, e.g.
            `{"asft": {"kl_coef": 0.1}}`.
        eval_dataset (*optional*): the task's held-out set (a `Dataset`, or a name or path, whose `test` split or only
            split is used); default: the `test` split (`dataset_test_split`) of the training data.
        general_eval_dataset (*optional*): a general held-out set the drift is measured on (its loss is reported
            too); default: the drift is measured on `eval_dataset`.
        output_dir (`str` or `Path`): where the runs and the results go. A method whose run there is finished (its
            `compare_run.json`) is not trained again; one with other settings is refused.
        plots (`bool`, *optional*): write the PNG plots; None: when matplotlib is installed (the `bench` extra).
        save_models (`bool`): save each trained model in its run's folder, as `hf-plugins <method>` does.
        extra_metrics (callable, *optional*): `extra_metrics(method, trainer) -> dict`, called after each method
            trains, for metrics of its own (e.g. generation accuracy); stored in the run's `extra`.

    Returns:
        The content of `results.json`: `methods`, `runs` (method -> its record: `train_loss` per step,
        `evaluations` per evaluation step, `train_runtime_s`, `extra`), `held_out` (the sets and their token
        counts), `drift_on`, `plots` (the files written).

    Raises:
        ValueError: bad input, before any training.
    """
    try:
        runs, held_out_sources, plots = _prepare(
            methods, config, args, method_args, eval_dataset, general_eval_dataset, Path(output_dir), plots
        )
    except UsageError as error:
        raise ValueError(str(error)) from None
    return _run_all(runs, held_out_sources, Path(output_dir), plots, save_models, extra_metrics)


def _prepare(methods, config, args, method_args, eval_dataset, general_eval_dataset, output_dir: Path, plots):
    """Every check, before any model loads: the methods, their options and data, the held-out sets, the records."""
    from ..trainers.hub_config import read_config_yaml, resolve_config_file

    methods = _parse_methods(methods)
    common = _as_flags(args, "args")
    if any(arg == "--output_dir" or arg.startswith("--output_dir=") for arg in common):
        raise UsageError("--output_dir names the comparison's folder; each method trains in <output_dir>/<method>")
    common, own = split_method_options(common, methods)
    for method, options in (method_args or {}).items():
        if method not in own:
            raise UsageError(f"method_args: {method!r} is not one of the compared methods ({', '.join(methods)})")
        own[method] += _as_flags(options, f"method_args[{method!r}]")
    if plots and not _report().matplotlib_available():
        raise UsageError("the plots need matplotlib, which is not installed: pip install 'hf-plugins[bench]'")
    yaml = read_config_yaml(resolve_config_file(str(config))) if config else {}
    runs = []
    for method in methods:
        folder = output_dir / method
        argv = _method_argv(config, common, method, own[method], folder)
        settings = {"argv": argv[2:] if config else argv, "config": yaml}
        runs.append(_Run(method, argv, folder, settings))
    # Every method's held-out tokens are those plain SFT would train on, with the settings every method shares
    sft_argv = _method_argv(config, common, "sft", [], output_dir / "sft")
    sft_args = next((run.setup.training_args for run in runs if run.method == "sft"), None)
    if sft_args is None:
        sft_args = _Run("sft", sft_argv, output_dir, {}).setup.training_args
    first = runs[0].setup
    sources = {"eval": eval_dataset}
    if eval_dataset is None:
        split = first.script_args.dataset_test_split
        if split not in first.data:
            raise UsageError(
                f"no held-out set: pass --eval_dataset, or give the training data a {split!r} split "
                "(--dataset_test_split)"
            )
        sources["eval"] = first.data[split]
    else:
        sources["eval"] = _load_held_out(eval_dataset, "--eval_dataset", first)
    if general_eval_dataset is not None:
        sources["general"] = _load_held_out(general_eval_dataset, "--general_eval_dataset", first)
    for name, dataset in sources.items():
        _check_held_out(dataset, "--eval_dataset" if name == "eval" else "--general_eval_dataset", sft_args)
    identity = {name: _dataset_identity(dataset) for name, dataset in sources.items()}
    for run in runs:
        run.settings["held_out"] = identity
        run.finished_record()  # a finished run with other settings is refused here
    if plots is None:
        plots = _report().matplotlib_available()
        if not plots:
            print("compare: matplotlib is not installed (pip install 'hf-plugins[bench]'): no plots will be written")
    # the tokenized held-out sets are reused only for the same sets tokenized with the same settings
    stamp = {"held_out": identity, "tokenized_with": {"argv": sft_argv, "config": yaml}}
    return runs, {"sources": sources, "args": sft_args, "stamp": stamp}, plots


def _report():
    from . import report

    return report


def _held_out_sets(trainer, held_out_sources: dict, output_dir: Path) -> dict:
    """The tokenized held-out sets: from `output_dir/held_out` when a previous run wrote them for these sets, else
    tokenized with `trainer` (`evaluation.tokenize_held_out`) and written there."""
    from datasets import load_from_disk

    from .evaluation import tokenize_held_out

    folder = output_dir / "held_out"
    stamp = folder / "sources.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(held_out_sources["stamp"])):
        return {name: load_from_disk(str(folder / name)) for name in held_out_sources["sources"]}
    sets = {}
    for name, dataset in held_out_sources["sources"].items():
        sets[name] = tokenize_held_out(trainer, dataset, held_out_sources["args"], f"held-out {name}")
        if len(sets[name]) == 0:
            flag = "--eval_dataset" if name == "eval" else "--general_eval_dataset"
            raise ValueError(
                f"{flag}: no row keeps a supervised token once tokenized (max_length, assistant-only or "
                "completion-only masks): pass a longer --max_length or other held-out rows"
            )
        sets[name].save_to_disk(str(folder / name))
    _report().write_json(stamp, held_out_sources["stamp"])
    return sets


def _pad_token_id(trainer) -> int:
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _train(run: _Run, held_out_sources, output_dir: Path, save_models: bool, extra_metrics, sets: dict | None):
    """Build the run's trainer, train it with the held-out evaluations and write its record; returns it and the
    tokenized held-out sets."""
    from transformers.trainer_utils import get_last_checkpoint

    from ..training_script import trainer_from
    from .evaluation import HeldOutEvaluation

    trainer = trainer_from(run.setup)
    if sets is None:
        sets = _held_out_sets(trainer, held_out_sources, output_dir)
    drift_on = "general" if "general" in sets else "eval"
    trainer.add_callback(HeldOutEvaluation(trainer, sets, drift_on, _pad_token_id(trainer)))
    resume = trainer.args.resume_from_checkpoint
    if resume is None and run.folder.is_dir():
        resume = get_last_checkpoint(str(run.folder))  # an interrupted run with checkpoints continues
    trainer.train(resume_from_checkpoint=resume)
    if save_models:
        trainer.save_model(str(run.folder))
        trainer.save_state()
    extra = extra_metrics(run.method, trainer) if extra_metrics is not None else None
    record = _report().run_record(run.method, trainer.state.log_history, run.settings, extra)
    _report().write_json(run.record_path, record)
    del trainer
    gc.collect()
    return record, sets


def _run_all(runs: list[_Run], held_out_sources, output_dir: Path, plots: bool, save_models: bool, extra_metrics):
    report = _report()
    output_dir.mkdir(parents=True, exist_ok=True)
    records, sets = {}, None
    for index, run in enumerate(runs, 1):
        record = run.finished_record()
        if record is not None:
            print(f"compare [{index}/{len(runs)}] {run.method}: finished in {run.folder}, not trained again")
        else:
            print(f"compare [{index}/{len(runs)}] {run.method}: training in {run.folder}")
            record, sets = _train(run, held_out_sources, output_dir, save_models, extra_metrics, sets)
        records[run.method] = record
    drift_on = "general" if "general" in held_out_sources["sources"] else "eval"
    tokens = {}
    for record in records.values():
        for name in held_out_sources["sources"]:
            if record["evaluations"]:
                tokens[name] = record["evaluations"][0].get(f"{name}_tokens")
    results = {
        "methods": [run.method for run in runs],
        "runs": records,
        "held_out": {name: {"tokens": tokens.get(name)} for name in held_out_sources["sources"]},
        "drift_on": drift_on,
        "plots": [],
    }
    if plots:
        results["plots"] = report.write_plots(results, output_dir)
    report.write_json(output_dir / "results.json", results)
    (output_dir / "results.md").write_text(report.markdown_table(results))
    print(report.markdown_table(results))
    print(f"compare: results in {output_dir / 'results.json'} and {output_dir / 'results.md'}")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-plugins compare",
        description="Train several methods from the same model, data, seed and budget, and compare them on the same "
        "held-out sets. Any other option (a field of the methods' configs) goes to every method; "
        "--<method>.<field> to one.",
    )
    parser.add_argument("--methods", required=True, help="comma-separated methods, e.g. sft,dft,asft")
    parser.add_argument("--config", default=None, help="the YAML every method reads (as `hf-plugins <method>`)")
    parser.add_argument("--eval_dataset", default=None, help="held-out set; default: the training data's test split")
    parser.add_argument("--general_eval_dataset", default=None, help="general held-out set the drift is measured on")
    parser.add_argument("--output_dir", default="compare", help="where the runs and the results go")
    parser.add_argument("--no_plots", action="store_true", help="write no PNG plots")
    parser.add_argument("--no_save_models", action="store_true", help="do not save the trained models")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`hf-plugins compare ...`: exit status 2 and one line on bad input, before any training."""
    from ..training_script import _HeldBackUntilBuilt

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        parser.print_help()
        return 0

    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError(message)

    held = _HeldBackUntilBuilt()
    with held:
        try:
            quiet = _Parser(prog=parser.prog, parents=[parser], add_help=False)
            options, rest = quiet.parse_known_args(argv)
            runs, sources, plots = _prepare(
                options.methods, options.config, rest, None, options.eval_dataset, options.general_eval_dataset,
                Path(options.output_dir), None if not options.no_plots else False,
            )  # fmt: skip
        except (UsageError, ValueError, FileNotFoundError) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            print(f"hf-plugins compare: error: {message}", file=sys.stderr)
            return 2
    held.show()
    _run_all(runs, sources, Path(options.output_dir), plots, not options.no_save_models, None)
    return 0


__all__ = ["compare", "main", "method_names"]
