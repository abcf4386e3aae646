"""The `hf-plugins` command.

hf-plugins <method> --config run.yaml [...]    train with a method's trainer (`hf_plugins.training_script`;
                                               the methods: `hf_plugins.trainers.TRAINERS`)
hf-plugins merge soup|lines|transfer [...]     edit fine-tuned checkpoints without training (`hf_plugins.merging`)
hf-plugins compare --methods sft,dft,... --config run.yaml
                                               train several methods alike and compare them (`hf_plugins.comparison`)
hf-plugins demo [--model ...] [--method ...]   fine-tune the embedded default model offline (see `hf_plugins.demo`)
hf-plugins env                                 print the versions to paste into a bug report
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys

# The methods' commands, read without importing the trainers: `--help`, `env` and a mistyped command answer at once
from . import _TRAIN_COMMANDS as TRAIN_COMMANDS


def usage() -> str:
    width = max(len(name) for name in TRAIN_COMMANDS)
    methods = "\n".join(f"  {name:<{width}}   {desc}" for name, (_, _, desc) in TRAIN_COMMANDS.items())
    return f"""usage: hf-plugins <command> [options]

training commands (`hf-plugins <method> --config run.yaml [--any_config_field value]`; the YAML of `trl sft`, and
for `grpo` and `truthrl` of `trl grpo`, works):
{methods}

other commands:
  merge   model soups, LiNeS and fine-tuning transfer of saved checkpoints (`hf-plugins merge --help`)
  compare train several methods from the same model, data and budget; compare them on held-out sets
          (`hf-plugins compare --methods sft,dft,asft --config run.yaml`; `hf-plugins compare --help`)
  demo    fine-tune SmolLM2-135M-Instruct with LoRA on real conversations, offline (`hf-plugins demo --help`)
  env     print library versions for bug reports
"""


_PACKAGES = (
    "hf-plugins",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "liger-kernel",
    "triton",
    "bitsandbytes",
    "tokenizers",
)


def print_env() -> None:
    print(f"- Python: {platform.python_version()} ({platform.platform()})")
    for name in _PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"- {name}: {version}")
    try:
        import torch

        cuda = torch.version.cuda if torch.cuda.is_available() else "not available"
        devices = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"- CUDA: {cuda}{f' ({devices})' if devices else ''}")
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in TRAIN_COMMANDS:
        from .training_script import run_training_command

        return run_training_command(command, rest)
    if command == "merge":
        from .merge_command import main as merge_main

        return merge_main(rest)
    if command == "compare":
        from .comparison import main as compare_main

        return compare_main(rest)
    if command == "demo":
        from .demo.run import main as demo_main

        return demo_main(rest) or 0
    if command == "env":
        print_env()
        return 0
    print(
        f"hf-plugins: error: unknown command {command!r}; choose one of {', '.join([*TRAIN_COMMANDS, 'merge', 'compare', 'demo', 'env'])} "
        "(`hf-plugins --help`).",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
