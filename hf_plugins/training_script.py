"""`hf-plugins <method>`: TRL's `sft` script (and, for `grpo`, its `grpo` script) for our trainers.

The arguments are TRL's own dataclasses (`ScriptArguments`, `ModelConfig`, `DatasetMixtureConfig`; `grpo`: the
`GRPOScriptArguments` of `trl grpo`, with `reward_funcs`) plus the method's config, parsed by TRL's `TrlParser`, so a
YAML written for `trl sft` (or `trl grpo`) runs unchanged after changing the command:

    hf-plugins asft --config run.yaml --kl_coef 0.05
    hf-plugins grpo --config run.yaml --reward_funcs my_rewards.length_reward
    hf-plugins sft --config run.yaml --uds --uds_keep 2        # UDS online batch selection on any method
    hf-plugins sft --config run.yaml --hft --hft_ratio 0.5     # HFT (Half Fine-Tuning) on any method
    accelerate launch --config_file examples/accelerate/multi_gpu.yaml examples/train.py asft --config run.yaml

`--config` takes a YAML file, a folder written by `<Config>.save_pretrained`, or a Hub repo id holding one. Datasets
can be Hub ids, local data files or folders, or folders written by `datasets.save_to_disk`. Bad input (an unknown
field, a field of another method's config, a missing model or checkpoint, a dataset the method cannot read) ends
with a one-line error and exit status 2, before any model is loaded where possible (`hf_plugins.cli_checks`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from .cli_checks import (
    UsageError,
    check_assistant_turns,
    check_checkpoint,
    check_dataset_format,
    check_model_path,
    check_prompt_dataset,
    unknown_field_message,
)


_DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _trainers():
    """The registry of the methods, `hf_plugins.trainers.TRAINERS`, imported on first use: inside
    `run_training_command`, where what the import logs is held back with the rest (`_HeldBackUntilBuilt`)."""
    from .trainers import TRAINERS

    return TRAINERS


def _is_grpo(method: str) -> bool:
    """Whether `method` trains with a GRPO-side trainer: `trl grpo`'s script arguments (reward functions) and prompt
    datasets instead of `trl sft`'s."""
    from trl import GRPOTrainer

    return issubclass(_trainers()[method], GRPOTrainer)


def _classes(method: str, uds: bool, hft: bool = False):
    """The method's (config class, trainer class); their UDS versions (`with_uds`) with `uds=True`, their HFT
    versions (`with_hft`, applied last) with `hft=True`."""
    from .trainers import with_hft, with_uds

    trainer_class = _trainers()[method]
    config_class = trainer_class.config_class
    if uds and _is_grpo(method):
        raise UsageError(
            f"UDS (--uds, --uds_* fields) selects SFT batches; it is not an option of `hf-plugins {method}`"
        )
    if uds:
        config_class, trainer_class = with_uds(config_class), with_uds(trainer_class)
    if hft:
        config_class, trainer_class = with_hft(config_class), with_hft(trainer_class)
    return config_class, trainer_class


def _wants_uds(argv: list[str]) -> tuple[bool, list[str]]:
    """`--uds` (or any `--uds_*` field) turns on UDS online batch selection; the flag itself is ours, not a field."""
    uds = "--uds" in argv or any(arg.startswith("--uds_") for arg in argv)
    return uds, [arg for arg in argv if arg != "--uds"]


def _wants_hft(argv: list[str]) -> tuple[bool, list[str]]:
    """`--hft` (or any `--hft_*` field) turns on HFT, Half Fine-Tuning; the flag itself is ours, not a field."""
    hft = "--hft" in argv or any(arg.startswith("--hft_") for arg in argv)
    return hft, [arg for arg in argv if arg != "--hft"]


def _script_arguments(method: str):
    """TRL's script arguments of the command: `trl grpo`'s (with the reward functions) for GRPO, else `trl sft`'s."""
    if _is_grpo(method):
        from trl.scripts.grpo import GRPOScriptArguments

        return GRPOScriptArguments
    from trl import ScriptArguments

    return ScriptArguments


def _parser(method: str, uds: bool = False, hft: bool = False):
    import argparse

    from trl import DatasetMixtureConfig, ModelConfig, TrlParser

    config_class, trainer_class = _classes(method, uds, hft)

    class Parser(TrlParser):
        # argparse prints the whole usage (hundreds of options) before an error: one line is enough
        def error(self, message):
            raise UsageError(message)

    parser = Parser(
        (_script_arguments(method), config_class, ModelConfig, DatasetMixtureConfig),
        prog=f"hf-plugins {method}",
        description=trainer_class.description,
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
        raise UsageError(
            "no dataset: pass --dataset_name (a Hub id, a local file or folder) or `datasets:` in the YAML"
        )
    path = Path(name)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        data = load_from_disk(str(path))
        return data if isinstance(data, DatasetDict) else DatasetDict({script_args.dataset_train_split: data})
    if path.is_file():
        builder = _DATA_FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise UsageError(
                f"--dataset_name {name}: unknown file type {path.suffix!r} (json, jsonl, csv, parquet, txt)"
            )
        return load_dataset(builder, data_files={script_args.dataset_train_split: str(path)})
    return load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)


def _split(data, name: str, what: str):
    if name not in data:
        raise UsageError(
            f"the dataset has no {what} split {name!r} (it has: {', '.join(data)}); set --dataset_{what}_split"
        )
    return data[name]


def _flag_given(argv: list[str], yaml_keys, name: str) -> bool:
    return name in yaml_keys or any(arg == f"--{name}" or arg.startswith(f"--{name}=") for arg in argv)


def _flag_value(argv: list[str], yaml: dict, name: str):
    """The value of `--name` as argparse reads it (the last occurrence wins over the YAML), unparsed."""
    for i, arg in reversed(list(enumerate(argv))):
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return yaml.get(name)


def _field_names(*classes) -> list[str]:
    import dataclasses

    return [f.name for cls in classes for f in dataclasses.fields(cls) if f.init]


def _bad_value_message(message: str, argv: list[str], yaml: dict) -> str:
    """argparse's type errors, with what the field takes (`--uds_keep` is a count, not a fraction)."""
    match = re.match(r"argument (--\w+)[^:]*: invalid (int|float) value: '(.*)'", message)
    if not match:
        return message
    flag, kind, value = match.groups()
    if flag == "--uds_keep":
        batch = _flag_value(argv, yaml, "per_device_train_batch_size") or 8
        try:
            example = max(1, round(float(value) * int(batch)))
            hint = f" (with per_device_train_batch_size {batch}, --uds_keep {example} keeps {value} of each batch)"
        except ValueError:
            hint = ""
        return (
            f"--uds_keep {value}: uds_keep is a count, the K examples kept of each micro-batch of "
            f"per_device_train_batch_size candidates, not a fraction: pass a whole number{hint}"
        )
    return f"{flag} {value}: {flag[2:]} takes {'a whole number' if kind == 'int' else 'a number'}"


def _parse(method: str, uds: bool, argv: list[str], yaml: dict, hft: bool = False):
    """The parsed dataclasses; unknown fields and bad values as one-line `UsageError`s."""
    from trl import DatasetMixtureConfig, ModelConfig

    parser = _parser(method, uds, hft)
    try:
        *parsed, yaml_unknown, argv_unknown = parser.parse_args_and_config(
            args=argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except UsageError as error:
        raise UsageError(_bad_value_message(str(error), argv, yaml)) from None
    except ValueError as error:
        raise UsageError(str(error).strip().splitlines()[0]) from error
    for source, strings in (("yaml", yaml_unknown), ("flag", argv_unknown)):
        names = [s[2:].split("=", 1)[0] for s in strings if s.startswith("--")]
        if strings and not names:
            raise UsageError(f"unexpected argument {strings[0]!r} (options are --name value)")
        if names:
            config_class, _ = _classes(method, uds, hft)
            known = _field_names(_script_arguments(method), config_class, ModelConfig, DatasetMixtureConfig)
            others = {
                other: _field_names(trainer.config_class) for other, trainer in _trainers().items() if other != method
            }
            raise UsageError(unknown_field_message(names[0], known, others, method, on_command_line=source == "flag"))
    return parsed


def check_inputs(method: str, training_args, model_args) -> None:
    """The checks that need no data: the model and reference paths, the checkpoint, the method's refusals."""
    if not model_args.model_name_or_path:
        raise UsageError("no model: pass --model_name_or_path (a Hub id or a local folder)")
    trainer = _trainers()[method]
    why = trainer.full_fine_tuning
    refusal = getattr(trainer, "adapter_refusal", None)  # settings that need every weight trainable (MFT's new token)
    refusal = refusal(training_args) if refusal is not None and not why else None
    if refusal and getattr(model_args, "use_peft", False):
        raise UsageError(f"--use_peft (use_peft: true in a YAML) with `hf-plugins {method}`: {refusal}")
    if why:
        for flag in ("use_peft", "load_in_4bit", "load_in_8bit"):
            if getattr(model_args, flag, False):
                raise UsageError(
                    f"--{flag} ({flag}: true in a YAML) cannot be used with `hf-plugins {method}`: {why}; drop --{flag}"
                    + (" and the --lora_* options" if flag == "use_peft" else "")
                )
    for flag in ("load_in_4bit", "load_in_8bit"):
        if getattr(model_args, flag, False) and importlib.util.find_spec("bitsandbytes") is None:
            raise UsageError(f"--{flag} needs bitsandbytes, which is not installed: pip install 'hf-plugins[qlora]'")
    init_kwargs = training_args.model_init_kwargs or {}
    cache_dir = init_kwargs.get("cache_dir")
    check_model_path(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        cache_dir=cache_dir,
        gguf_file=init_kwargs.get("gguf_file"),
    )
    for field in ("ref_model", "base_model", "sft_adapter_path"):  # ASFT's reference, SRPPO's two models
        path = getattr(training_args, field, None)
        if isinstance(path, str) and path:
            check_model_path(path, flag=f"--{field}", cache_dir=cache_dir)
    if training_args.resume_from_checkpoint:
        check_checkpoint(training_args.resume_from_checkpoint)


def check_hft_model(model_args, training_args) -> None:
    """HFT's refusal of a model without the modules of its category rule (GPT-2's fused `c_attn`, fused experts),
    from the model's config alone, before the data and the weights load."""
    from transformers import AutoConfig

    from .callbacks.hft import check_hft_architecture

    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    check_hft_architecture(config)


def check_data(method: str, dataset, split: str, training_args, assistant_only_explicit: bool) -> None:
    """The dataset's columns against the method's format, and its assistant turns."""
    text_field = getattr(training_args, "dataset_text_field", "text")
    found = check_dataset_format(dataset, method, split, text_field, **_trainers()[method].dataset_needs)
    assistant_only = training_args.assistant_only_loss
    if method == "tl":  # TL-Training trains assistant turns only and drops rows without one itself
        assistant_only, every_row = True, False
    else:
        every_row = True
        if assistant_only is None:  # PoFT's default: on for conversations under the "completion" scope
            scope = getattr(training_args, "poft_target_scope", "")
            assistant_only = found == "conversational" and scope == "completion"
    check_assistant_turns(dataset, found, split, bool(assistant_only), assistant_only_explicit, every_row)


def import_callable(flag: str, name: str):
    """The function a dotted import path names (`my_module.my_function`; the working directory is importable), as
    `trl grpo` imports its reward functions; a `UsageError` naming `flag` when it cannot be imported."""
    import importlib
    import os

    if "." not in name:
        raise UsageError(f"{flag} {name}: not a dotted import path such as my_module.my_function")
    module_name, attribute = name.rsplit(".", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"{flag} {name}: cannot import {module_name} ({error})") from None
    if not callable(getattr(module, attribute, None)):
        raise UsageError(f"{flag} {name}: {module_name} has no function {attribute!r}")
    return getattr(module, attribute)


def check_grpo_data(method: str, dataset, split: str, training_args) -> None:
    """A GRPO-side dataset: the trainer's own `check_dataset` for a trainer that builds its prompts itself
    (TL-Training's RL stage renders `messages` + `tools`), else `trl grpo`'s `prompt` column."""
    check = getattr(_trainers()[method], "check_dataset", None)
    if check is None:
        check_prompt_dataset(dataset, method, split)
    else:
        check(dataset, training_args, split)


def reward_functions(script_args, required: bool = True) -> list:
    """The reward sources of `trl grpo`'s arguments, as its script resolves them: the reward model, then each of
    `reward_funcs`, a name of TRL's rewards (`accuracy_reward`, `reasoning_accuracy_reward`, `think_format_reward`,
    `get_soft_overlong_punishment` with its script's settings) or a dotted import path (the working directory is
    importable). Checked before any model loads. `required=False`: none is allowed (a trainer that builds its own
    reward adds these to it)."""
    from trl import rewards

    named = {
        "accuracy_reward": lambda: rewards.accuracy_reward,
        "reasoning_accuracy_reward": lambda: rewards.reasoning_accuracy_reward,
        "think_format_reward": lambda: rewards.think_format_reward,
        "get_soft_overlong_punishment": lambda: rewards.get_soft_overlong_punishment(
            max_completion_len=1280, soft_punish_cache=256
        ),
    }
    funcs = []
    if script_args.reward_model_name_or_path:
        check_model_path(script_args.reward_model_name_or_path, flag="--reward_model_name_or_path")
        funcs.append(script_args.reward_model_name_or_path)
    for name in script_args.reward_funcs or ():
        if name in named:
            funcs.append(named[name]())
            continue
        if "." not in name:
            raise UsageError(
                f"--reward_funcs {name}: not one of TRL's rewards ({', '.join(named)}) nor a dotted import path such "
                "as my_rewards.length_reward"
            )
        funcs.append(import_callable("--reward_funcs", name))
    if not funcs and required:
        raise UsageError(
            "no reward: pass --reward_funcs (TRL reward names or import paths) or --reward_model_name_or_path"
        )
    return funcs


def grpo_trainer_kwargs(method: str, script_args, training_args) -> dict:
    """The GRPO trainer's reward functions (None: the trainer builds its own) and the callables its config names by
    import path (`callable_fields`)."""
    trainer_class = _trainers()[method]
    funcs = reward_functions(script_args, required=not trainer_class.builds_own_reward)
    kwargs = {"reward_funcs": funcs or None}
    for field, keyword in trainer_class.callable_fields.items():
        path = getattr(training_args, field, None)
        if path:
            kwargs[keyword] = import_callable(f"--{field}", path)
    return kwargs


@dataclasses.dataclass
class TrainingSetup:
    """What `hf-plugins <method>` has parsed, checked and loaded before the model loads: the trainer's class and
    arguments, the data (`data`: every split loaded; `train`, `evaluation`: the checked splits) and the names of the
    training data, for the model card."""

    method: str
    trainer_class: type
    script_args: Any
    training_args: Any
    model_args: Any
    data: Any
    train: Any
    evaluation: Any
    trainer_kwargs: dict
    dataset_names: Any


def prepare_training(method: str, argv: list[str]) -> TrainingSetup:
    """Parse `argv`, check it, load and check the data: everything `build_trainer` does before the model loads, so
    that a caller running several methods (`hf-plugins compare`) can refuse bad input before any training."""
    from .trainers.hub_config import read_config_yaml

    uds, argv = _wants_uds(argv)
    hft, argv = _wants_hft(argv)
    argv = _resolve_config(argv)
    yaml = read_config_yaml(argv[argv.index("--config") + 1]) if "--config" in argv else {}
    # a YAML that sets any `uds_*` field asks for UDS too
    uds = uds or any(key.startswith("uds_") for key in yaml)
    hft = hft or any(key.startswith("hft_") for key in yaml)
    script_args, training_args, model_args, dataset_args = _parse(method, uds, argv, yaml, hft)
    check_inputs(method, training_args, model_args)
    if hft and not model_args.use_peft:  # (with an adapter, the trainer checks the adapted modules)
        check_hft_model(model_args, training_args)
    grpo = _is_grpo(method)
    trainer_kwargs = grpo_trainer_kwargs(method, script_args, training_args) if grpo else {}

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
    assistant_only_explicit = _flag_given(argv, yaml, "assistant_only_loss")
    train = _split(data, script_args.dataset_train_split, "train")
    if grpo:
        check_grpo_data(method, train, "train", training_args)
    else:
        check_data(method, train, "train", training_args, assistant_only_explicit)
    evaluation = None
    if training_args.eval_strategy != "no":
        evaluation = _split(data, script_args.dataset_test_split, "test")
        if grpo:
            check_grpo_data(method, evaluation, "test", training_args)
        else:
            check_data(method, evaluation, "test", training_args, assistant_only_explicit)

    _, trainer_class = _classes(method, uds, hft)
    dataset_names = script_args.dataset_name or [dataset.path for dataset in dataset_args.datasets or ()]
    return TrainingSetup(
        method, trainer_class, script_args, training_args, model_args, data, train, evaluation, trainer_kwargs,
        dataset_names,
    )  # fmt: skip


def trainer_from(setup: TrainingSetup):
    """The trainer of a `prepare_training` result (this loads the model), not yet trained."""
    from trl import get_peft_config, get_quantization_config

    return setup.trainer_class(
        model=setup.model_args.model_name_or_path,
        args=setup.training_args,
        train_dataset=setup.train,
        eval_dataset=setup.evaluation,
        peft_config=get_peft_config(setup.model_args),
        quantization_config=get_quantization_config(setup.model_args),
        **setup.trainer_kwargs,
    )


def build_trainer(method: str, argv: list[str]):
    """Parse `argv`, check it, load and check the data, and build the method's trainer (not yet trained); returns it
    with the name(s) of the training data, for the model card."""
    setup = prepare_training(method, argv)
    return trainer_from(setup), setup.dataset_names


class _HeldBackUntilBuilt(logging.Handler):
    """Holds back the warnings and the otherwise unhandled log records (e.g. a library's notice at import time) that
    reading the arguments and building the trainer produce; `show()`, called once the trainer is built, prints
    them. After a bad input they are dropped, so that the error line is all that is printed. A logging setup of the
    user's own (handlers on the root logger) prints as it always does."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self._warnings = warnings.catch_warnings(record=True)
        self._caught: list = []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        self._installed = not logging.getLogger().handlers
        if self._installed:
            logging.getLogger().addHandler(self)
        self._caught = self._warnings.__enter__()
        return self

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        if self._installed:
            logging.getLogger().removeHandler(self)
        if exc[0] is not None:  # an unexpected failure: what was held back may explain it
            self.show()
        return False

    def show(self):
        for warning in self._caught:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
        for record in self.records:
            if record.levelno >= logging.lastResort.level:
                logging.lastResort.handle(record)


def run_training_command(method: str, argv: list[str]) -> int:
    """`hf-plugins <method> ...`: build, train, save (model, trainer state, model card), optionally push."""
    if any(arg in ("-h", "--help") for arg in argv):
        uds, _ = _wants_uds(argv)
        hft, _ = _wants_hft(argv)
        _parser(method, uds, hft).print_help()
        return 0
    held = _HeldBackUntilBuilt()
    with held:
        try:
            trainer, dataset_names = build_trainer(method, argv)
        except (UsageError, ValueError, FileNotFoundError) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            print(f"hf-plugins {method}: error: {message}", file=sys.stderr)
            return 2
    held.show()
    args = trainer.args
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    trainer.save_state()
    if trainer.accelerator.is_main_process:
        trainer.create_model_card(dataset_name=dataset_names)
    if args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_names)
    trainer.accelerator.print(f"hf-plugins {method}: trained; model saved to {args.output_dir}")
    if getattr(args, "export_quantized", None):
        trainer.accelerator.print(f"hf-plugins {method}: quantised model exported to {args.export_quantized}")
    return 0
