"""`hf-plugins <method>`: TRL's `sft` script for our trainers.

The arguments are TRL's own dataclasses (`ScriptArguments`, `ModelConfig`, `DatasetMixtureConfig`) plus the method's
config, parsed by TRL's `TrlParser`, so a YAML written for `trl sft` runs unchanged after changing the command:

    hf-plugins asft --config run.yaml --kl_coef 0.05
    hf-plugins sft --config run.yaml --uds --uds_keep 2        # UDS online batch selection on any method
    accelerate launch --config_file examples/accelerate/multi_gpu.yaml examples/train.py asft --config run.yaml

`--config` takes a YAML file, a folder written by `<Config>.save_pretrained`, or a Hub repo id holding one. Datasets
can be Hub ids, local data files or folders, or folders written by `datasets.save_to_disk`. Bad input (an unknown
field, a field of another method's config, no dataset) ends with a one-line error and exit status 2, before any model
is loaded where possible.
"""

from __future__ import annotations

import sys
from pathlib import Path

_DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


def _classes(method: str, uds: bool):
    """The method's (config class, trainer class); their UDS versions (`with_uds`) with `uds=True`."""
    import hf_plugins

    from . import cli

    config_name, trainer_name, _ = cli.TRAIN_COMMANDS[method]
    config_class, trainer_class = getattr(hf_plugins, config_name), getattr(hf_plugins, trainer_name)
    if uds:
        config_class, trainer_class = hf_plugins.with_uds(config_class), hf_plugins.with_uds(trainer_class)
    return config_class, trainer_class


def _wants_uds(argv: list[str]) -> tuple[bool, list[str]]:
    """`--uds` (or any `--uds_*` field) turns on UDS online batch selection; the flag itself is ours, not a field."""
    uds = "--uds" in argv or any(arg.startswith("--uds_") for arg in argv)
    return uds, [arg for arg in argv if arg != "--uds"]


def _parser(method: str, uds: bool = False):
    import argparse

    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    config_class, _ = _classes(method, uds)

    class Parser(TrlParser):
        # argparse prints the whole usage (hundreds of options) before an error: one line is enough
        def error(self, message):
            raise UsageError(message)

    parser = Parser(
        (ScriptArguments, config_class, ModelConfig, DatasetMixtureConfig),
        prog=f"hf-plugins {method}",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    return parser


def _resolve_config(argv: list[str]) -> list[str]:
    """Replace `--config NAME` by a local YAML path (NAME may be a saved folder or a Hub repo id), read safely."""
    from .trainers.hub_config import read_config_yaml, resolve_config_file

    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            if arg == "--config":
                if i + 1 >= len(argv):
                    raise UsageError("--config needs a YAML file, a saved config folder or a Hub repo id")
                name, rest = argv[i + 1], argv[i + 2 :]
            else:
                name, rest = arg.split("=", 1)[1], argv[i + 1 :]
            path = resolve_config_file(name)
            read_config_yaml(path)  # unsafe tags and non-mappings fail here, with the file's name
            return [*argv[:i], "--config", str(path), *rest]
    return argv


def load_training_data(script_args, dataset_args):
    """The dataset dict named by the script arguments (Hub id, local files or folder, or a `save_to_disk` folder)."""
    from datasets import DatasetDict, load_dataset, load_from_disk
    from trl import get_dataset

    if dataset_args.datasets:
        return get_dataset(dataset_args)
    name = script_args.dataset_name
    if not name:
        raise UsageError("no dataset: pass --dataset_name (a Hub id, a local file or folder) or `datasets:` in the YAML")
    path = Path(name)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        data = load_from_disk(str(path))
        return data if isinstance(data, DatasetDict) else DatasetDict({script_args.dataset_train_split: data})
    if path.is_file():
        builder = _DATA_FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise UsageError(f"--dataset_name {name}: unknown file type {path.suffix!r} (json, jsonl, csv, parquet, txt)")
        return load_dataset(builder, data_files={script_args.dataset_train_split: str(path)})
    return load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)


def _split(data, name: str, what: str):
    if name not in data:
        raise UsageError(f"the dataset has no {what} split {name!r} (it has: {', '.join(data)}); set --dataset_{what}_split")
    return data[name]


def build_trainer(method: str, argv: list[str]):
    """Parse `argv`, load the data and build the method's trainer (not yet trained)."""
    from trl import get_peft_config, get_quantization_config

    import hf_plugins

    from . import cli

    uds, argv = _wants_uds(argv)
    argv = _resolve_config(argv)
    if not uds and "--config" in argv:
        from .trainers.hub_config import read_config_yaml

        # a YAML that sets any `uds_*` field asks for UDS too
        uds = any(key.startswith("uds_") for key in read_config_yaml(argv[argv.index("--config") + 1]))
    parser = _parser(method, uds)
    try:
        script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(
            args=argv, fail_with_unknown_args=True
        )
    except ValueError as error:
        message = str(error)
        if "not used by" in message or "Unknown arguments" in message:
            raise UsageError(
                f"{message.splitlines()[0]} — not fields of `hf-plugins {method}` "
                f"({cli.TRAIN_COMMANDS[method][0]}, TRL's ScriptArguments/ModelConfig); another method's field?"
            ) from error
        raise UsageError(message.splitlines()[0]) from error
    if not model_args.model_name_or_path:
        raise UsageError("no model: pass --model_name_or_path (a Hub id or a local folder)")

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    data = load_training_data(script_args, dataset_args)
    train = _split(data, script_args.dataset_train_split, "train")
    evaluation = None
    if training_args.eval_strategy != "no":
        evaluation = _split(data, script_args.dataset_test_split, "test")

    _, trainer_class = _classes(method, uds)
    trainer = trainer_class(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    return trainer, script_args


def run_training_command(method: str, argv: list[str]) -> int:
    """`hf-plugins <method> ...`: build, train, save (model, trainer state, model card), optionally push."""
    if any(arg in ("-h", "--help") for arg in argv):
        uds, _ = _wants_uds(argv)
        _parser(method, uds).print_help()
        return 0
    try:
        trainer, script_args = build_trainer(method, argv)
    except (UsageError, ValueError, FileNotFoundError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"hf-plugins {method}: error: {message}", file=sys.stderr)
        return 2
    args = trainer.args
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    trainer.save_state()
    if trainer.accelerator.is_main_process:
        trainer.create_model_card(dataset_name=script_args.dataset_name)
    if args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.accelerator.print(f"hf-plugins {method}: trained; model saved to {args.output_dir}")
    return 0
