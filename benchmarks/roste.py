"""Training-step benchmark: `RoSTETrainer` (W4A4KV4, all rotations) vs `FusedSFTTrainer`, same model, data and seed.

RoSTE's extra work per step is the activation fake quantisation of every block linear's input, the online Hadamard
transforms (R3 on Q/K, R4 on the down projection's input), the K/V fake quantisation, and, once per optimizer step,
the rotated weight fake quantisation (cached across micro-batches). The script reports the median step time of each
trainer and the ratio RoSTE / SFT, measured in one process in interleaved rounds (SFT, RoSTE, SFT, ...), each round a
fresh `train()` whose first step is a warm-up.

    python benchmarks/roste.py                       # hidden 256, 4 layers, MLP 768 (= 12 x 64, a Kronecker R4)
    python benchmarks/roste.py --rounds 3 --steps-per-round 6
    python benchmarks/roste.py --device cuda --preset qwen2.5-0.5b   # bf16, Qwen2.5-0.5B's block shapes

The model is randomly initialised with the test tokenizer (vocabulary 384), so the step is all transformer blocks:
RoSTE's overhead is relative to the blocks alone, without the cost of a real vocabulary's output head. Rows are long
plain texts cut to `--max-length` tokens, so every sequence has the full length.
"""

from __future__ import annotations

import argparse
import statistics

import _harness as bench


def step_times(kind: str, args, dataset, tokenizer) -> tuple[list[float], float | None]:
    """Step times after the first (warm-up) step, and the peak GPU memory of the run in GiB (None on CPU)."""
    import torch

    from hf_plugins import FusedSFTTrainer, RoSTETrainer
    from hf_plugins.testing import build_tiny_model

    on_gpu = args.device == "cuda"
    model = build_tiny_model(
        tokenizer,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads or max(1, args.heads // 2),
        intermediate_size=args.intermediate,
        max_position_embeddings=max(512, args.max_length),
        dtype=torch.bfloat16 if on_gpu else torch.float32,
    )
    device_args = dict(use_cpu=False, bf16=True) if on_gpu else {}
    method_args = dict(rotations="all") if kind == "roste" else {}
    trainer = bench.make_trainer(
        RoSTETrainer if kind == "roste" else FusedSFTTrainer,
        model,
        dataset,
        tokenizer,
        max_steps=args.steps_per_round,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        logging_steps=1000,
        **device_args,
        **method_args,
    )
    timer = bench.step_timer(sync_gpu=on_gpu)
    trainer.add_callback(timer)
    with bench.PeakMemory("cuda" if on_gpu else "cpu") as memory:
        trainer.train()
    del trainer, model
    return timer.times[1:], memory.peak_bytes / bench.GIB if on_gpu else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset",
        choices=("qwen2.5-0.5b",),
        default=None,
        help="the block shapes of a real model (hidden 896, 24 layers, 14/2 heads, MLP 4864 = 76 x 64)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: half the heads")
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="also write the JSON result here")
    args = parser.parse_args()
    if args.preset == "qwen2.5-0.5b":
        args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate = 896, 24, 14, 2, 4864

    torch = bench.setup(args.threads, quiet=False)
    from datasets import Dataset

    from hf_plugins.testing import build_tokenizer, tiny_language_modeling_dataset

    tokenizer = build_tokenizer()
    # one long text per row (several hundred short Q&A rows joined), so that no row is shorter than --max-length
    rows = args.batch_size * args.steps_per_round
    pieces = tiny_language_modeling_dataset(64 * rows)["text"]
    per_row = max(1, len(pieces) // rows)
    texts = ["\n".join(pieces[i : i + per_row]) for i in range(0, per_row * rows, per_row)]
    dataset = Dataset.from_dict({"text": texts})
    # rounds in a fixed order: SFT, RoSTE, SFT, RoSTE, ...
    runs = bench.interleaved(
        ("sft", "roste"), lambda kind, _: step_times(kind, args, dataset, tokenizer), args.rounds, rotate=False
    )
    times = {
        kind: [seconds for step_seconds, _ in kind_runs for seconds in step_seconds]
        for kind, kind_runs in runs.items()
    }
    peaks = {kind: kind_runs[-1][1] if kind_runs else None for kind, kind_runs in runs.items()}
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    result = {
        "config": vars(args),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "median_step_s": medians,
        "roste_over_sft": medians["roste"] / medians["sft"],
        "peak_memory_gib": peaks,
    }
    print(bench.write_json(args.output, result))


if __name__ == "__main__":
    main()
