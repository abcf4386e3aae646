"""`hf-plugins merge soup|lines|transfer`: the weight-space tools of `hf_plugins.merging` from the command line.

hf-plugins merge soup --models run1 run2 run3 --output soup [--greedy --eval_fn my_module.my_eval]
hf-plugins merge lines --base base --model finetuned --alpha 0.5 --output lines
hf-plugins merge transfer --source_model ft --source_base old_base --target_base new_base --output transferred
hf-plugins merge --config merge.yaml    (the same keys, plus `method: soup|lines|transfer`; flags override it)

Bad input (an unknown key, a missing field, a checkpoint that does not match the others) is one line on stderr and
exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_checks import UsageError


METHODS = {
    "soup": "average fine-tunes of one base (uniform, or greedy on a held-out score)",
    "lines": "scale a fine-tune's update layer by layer (LiNeS)",
    "transfer": "carry a fine-tune's update over to a new version of its base",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(message)


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not true or false")


def _factor(value: str):
    return value if value == "alpha" else float(value)


def _alpha(value: str):
    return value if value == "norm_ratio" else float(value)


def build_parser(method: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=f"hf-plugins merge {method}", description=METHODS[method], argument_default=None)
    add = parser.add_argument
    add("--config", help="YAML file with these options as keys (the flags given override it)")
    add("--output", help="output folder (refused if it exists and is not empty, unless --overwrite true)")
    if method == "soup":
        add("--models", nargs="+", help="ingredient folders (full models of one base, or LoRA adapters of one base)")
        add("--greedy", type=_bool, help="greedy soup on --eval_fn's held-out score (default: false, uniform)")
        add("--eval_fn", help="greedy: import path of a function model -> held-out score (my_module.my_eval)")
        add("--higher_is_better", type=_bool, help="greedy: whether a higher score is better (default: true)")
        add("--base", help="greedy, LoRA ingredients: their base model (default: the adapters' own)")
    elif method == "lines":
        add("--base", help="the pretrained model the fine-tune started from")
        add("--model", help="the fine-tuned model, or a LoRA adapter of --base")
        add("--alpha", type=_alpha, help="factor of the first block, in [0, 1]; or norm_ratio (with --tasks)")
        add("--beta", type=float, help="increase of the factor to the last block (default: 1 - alpha)")
        add("--outside", type=_factor, help="factor outside the blocks: alpha (default) or a number in [0, 1]")
        add("--tasks", nargs="+", help="with --alpha norm_ratio: the task fine-tunes merged into --model")
        add("--layer_pattern", help="regex whose first group is a parameter's block index")
        add("--num_layers", type=int, help="number of blocks (default: the config's num_hidden_layers)")
    else:
        add("--source_model", help="the fine-tuned model (or LoRA adapter) of --source_base")
        add("--source_base", help="the base it was fine-tuned from")
        add("--target_base", help="the new base to carry the fine-tune over to")
        add("--lam", type=float, help="scale of the transferred update (default: 1.0)")
    add("--max_shard_size", help="largest output shard, as in save_pretrained (default: 5GB)")
    add("--overwrite", type=_bool, help="replace an existing output folder (default: false)")
    add("--progress", type=_bool, help="show a progress bar per shard (default: true)")
    return parser


_REQUIRED = {
    "soup": ("models", "output"),
    "lines": ("base", "model", "alpha", "output"),
    "transfer": ("source_model", "source_base", "target_base", "output"),
}


def _options(method: str, rest: list[str], from_yaml: dict) -> dict:
    parser = build_parser(method)
    flags = {key: value for key, value in vars(parser.parse_args(rest)).items() if value is not None}
    flags.pop("config", None)
    known = {action.dest for action in parser._actions} - {"help", "config"}
    unknown = sorted(set(from_yaml) - known)
    if unknown:
        raise UsageError(f"`{unknown[0]}` (a key of the YAML config) is not an option of `hf-plugins merge {method}`")
    options = {**from_yaml, **flags}
    missing = [name for name in _REQUIRED[method] if options.get(name) in (None, [], "")]
    if missing:
        raise UsageError(f"--{missing[0]} is required (`hf-plugins merge {method} --help`)")
    if method == "soup" and options.get("greedy") and not options.get("eval_fn"):
        raise UsageError("--greedy true needs --eval_fn, the import path of a function model -> held-out score")
    if method == "soup" and options.get("eval_fn") and not options.get("greedy"):
        raise UsageError("--eval_fn is used by the greedy soup only: add --greedy true")
    return options


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"--config {path}: cannot read it ({error.__class__.__name__}: {error})") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values")
    return loaded


def run(method: str, options: dict) -> str:
    from . import merging
    from .training_script import import_callable

    common = {
        "output_dir": options["output"],
        "max_shard_size": options.get("max_shard_size", "5GB"),
        "overwrite": bool(options.get("overwrite", False)),
        "progress": options.get("progress", True),
    }
    if method == "soup":
        if not options.get("greedy"):
            return str(merging.uniform_soup(options["models"], **common))
        eval_fn = import_callable("--eval_fn", options["eval_fn"])
        result = merging.greedy_soup(
            options["models"], eval_fn, options.get("higher_is_better", True), base=options.get("base"), **common
        )
        kept = ", ".join(result.ingredients)
        return f"{result.output_dir} ({len(result.ingredients)} ingredient(s): {kept}; score {result.soup_score:.6g})"
    if method == "lines":
        extra = {key: options[key] for key in ("tasks", "layer_pattern", "num_layers") if options.get(key) is not None}
        return str(
            merging.lines_scale(
                options["base"],
                options["model"],
                options["alpha"],
                options.get("beta"),
                options.get("outside", "alpha"),
                **extra,
                **common,
            )
        )
    return str(
        merging.transfer_finetuning(
            options["source_model"], options["source_base"], options["target_base"], options.get("lam", 1.0), **common
        )
    )


def usage() -> str:
    listed = "\n".join(f"  {name:<9} {description}" for name, description in METHODS.items())
    return f"usage: hf-plugins merge <method> [options] | hf-plugins merge --config merge.yaml\n\nmethods:\n{listed}\n"


def main(argv: list[str]) -> int:
    from .merging import MergeError

    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    try:
        method, rest = (argv[0], argv[1:]) if not argv[0].startswith("-") else (None, argv)
        from_yaml = {}
        if "--config" in rest:
            position = rest.index("--config")
            if position + 1 >= len(rest):
                raise UsageError("--config needs a YAML file")
            from_yaml = _read_yaml(rest[position + 1])
        yaml_method = from_yaml.pop("method", None)
        method = method or yaml_method
        if method not in METHODS:
            raise UsageError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
        if yaml_method not in (None, method):
            raise UsageError(f"the YAML config says method: {yaml_method}, the command line {method}")
        options = _options(method, rest, from_yaml)
        print(f"hf-plugins merge {method}: wrote {run(method, options)}")
        return 0
    except (UsageError, MergeError) as error:
        print(f"hf-plugins merge: error: {error}", file=sys.stderr)
        return 2
