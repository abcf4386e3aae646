"""Peak memory of a uniform soup of 4 checkpoints saved in several shards: `hf_plugins.merging.uniform_soup`, which
streams the shards, against loading the 4 state dicts whole and averaging them (what a plain script does).

Each variant runs in its own fresh process; its peak extra RSS (above the process after its imports) is compared to
the size of one checkpoint, of one shard, and to "one shard per input plus one output shard".

    python benchmarks/merging_memory.py --output benchmarks/results/cpu-merging-memory.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import _harness as bench


def build_checkpoints(root: str, args) -> list[str]:
    """A base model of the given shapes and `args.inputs` noisy copies of it, saved in shards of `args.shard`."""
    torch = bench.setup(args.threads)
    from hf_plugins.testing import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_tiny_model(
        tokenizer,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=8,
        num_kv_heads=4,
        intermediate_size=args.intermediate,
    )
    model.resize_token_embeddings(args.vocab, mean_resizing=False)
    paths = []
    for i in range(args.inputs):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1e-3 * torch.randn_like(parameter))
        path = os.path.join(root, f"ingredient-{i}")
        model.save_pretrained(path, max_shard_size=args.shard)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def worker(variant: str, paths: list[str], output: str, shard: str, threads: int) -> None:
    torch = bench.setup(threads)
    from safetensors.torch import load_file, save_file

    from hf_plugins.merging import Checkpoint, uniform_soup

    checkpoints = [Checkpoint.open(path) for path in paths]
    with bench.PeakMemory("cpu", fresh=True) as memory:
        if variant == "streaming":
            uniform_soup(paths, output_dir=output, max_shard_size=shard, progress=False)
        else:  # every state dict whole in memory, then the mean
            states = [
                {name: tensor for file, _ in checkpoint.shards() for name, tensor in load_file(checkpoint.path / file).items()}
                for checkpoint in checkpoints
            ]  # fmt: skip
            mean = {name: sum(state[name].to(torch.float32) for state in states) / len(states) for name in states[0]}
            os.makedirs(output)
            save_file(mean, os.path.join(output, "model.safetensors"), metadata={"format": "pt"})
    largest_shard = max(
        os.path.getsize(checkpoint.path / file) for checkpoint in checkpoints for file, _ in checkpoint.shards()
    )
    bench.report_result(
        {
            "variant": variant,
            # the peak RSS was reset on entry (VmHWM; ru_maxrss keeps the imports' peak): the peak above the RSS then
            "extra_peak_bytes": (memory.after["hwm_kib"] - memory.before["rss_kib"]) * 1024
            if memory.peak_reset
            else memory.extra_bytes,
            "largest_shard_bytes": largest_shard,
            "checkpoint_bytes": checkpoints[0].total_bytes,
            "shards_per_checkpoint": len(checkpoints[0].shards()),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1152)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--shard", default="16MB", help="max_shard_size of the inputs and of the soup")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="also write the JSON result here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--soup", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.paths, args.soup, args.shard, args.threads)
        return
    root = tempfile.mkdtemp(prefix="merging-memory-")
    try:
        paths = build_checkpoints(root, args)
        results = {}
        for variant in ("streaming", "whole state dicts"):
            argv = [__file__, "--worker", variant, "--shard", args.shard, "--threads", str(args.threads),
                    "--soup", os.path.join(root, variant.replace(" ", "-")), "--paths", *paths]  # fmt: skip
            results[variant] = bench.run_worker(argv, variant)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    streaming = results["streaming"]
    shard, checkpoint = streaming["largest_shard_bytes"], streaming["checkpoint_bytes"]
    summary = {
        "setup": {
            **{k: v for k, v in vars(args).items() if k not in ("worker", "paths", "soup", "output")},
            "device": bench.device_label(args.threads),
        },  # fmt: skip
        "checkpoint_mib": checkpoint / bench.MIB,
        "shards_per_checkpoint": streaming["shards_per_checkpoint"],
        "largest_shard_mib": shard / bench.MIB,
        "one_shard_per_input_plus_output_mib": (args.inputs + 1) * shard / bench.MIB,
        "all_inputs_mib": args.inputs * checkpoint / bench.MIB,
        "extra_peak_mib": {variant: result["extra_peak_bytes"] / bench.MIB for variant, result in results.items()},
    }
    rows = [[variant, f"{mib:.0f}"] for variant, mib in summary["extra_peak_mib"].items()]
    print(f"{args.inputs} checkpoints of {checkpoint / bench.MIB:.0f} MiB in {summary['shards_per_checkpoint']} "
          f"shards (largest {shard / bench.MIB:.0f} MiB); (inputs + 1) x shard = "
          f"{summary['one_shard_per_input_plus_output_mib']:.0f} MiB, all inputs = {summary['all_inputs_mib']:.0f} MiB")  # fmt: skip
    print(bench.table(["variant", "extra peak RSS (MiB)"], rows))
    print(bench.write_json(args.output, summary))


if __name__ == "__main__":
    main()
