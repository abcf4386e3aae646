"""The `hf-plugins` command.

    hf-plugins demo [--model ...] [--method ...]   fine-tune the embedded default model offline (see `hf_plugins.demo`)
    hf-plugins env                                 print the versions to paste into a bug report
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys

USAGE = """usage: hf-plugins <command> [options]

commands:
  demo    fine-tune SmolLM2-135M-Instruct with LoRA on real conversations, offline (`hf-plugins demo --help`)
  env     print library versions for bug reports
"""

_PACKAGES = (
    "hf-plugins", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "liger-kernel", "triton",
    "bitsandbytes", "tokenizers",
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
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo.run import main as demo_main

        return demo_main(rest) or 0
    if command == "env":
        print_env()
        return 0
    print(f"hf-plugins: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
