"""Training-step benchmark: `RoSTETrainer` (W4A4KV4, all rotations) vs `FusedSFTTrainer`, same model, data and seed.

RoSTE's extra work per step is the activation fake quantisation of every block linear's input, the online Hadamard
transforms (R3 on Q/K, R4 on the down projection's input), the K/V fake quantisation, and, once per optimizer step,
the rotated weight fake quantisation (cached across micro-batches). The script reports the median step time of each
trainer and the ratio RoSTE / SFT, measured in one process in interleaved rounds (SFT, RoSTE, SFT, ...), each round a
fresh `train()` whose first step is a warm-up.

    python benchmarks/roste.py                       # hidden 256, 4 layers, MLP 768 (= 12 x 64, a Kronecker R4)
    python benchmarks/roste.py --rounds 3 --steps-per-round 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def step_times(kind: str, args, dataset, tokenizer) -> list[float]:
    from transformers import TrainerCallback

    from hf_plugins import FusedSFTConfig, FusedSFTTrainer, RoSTEConfig, RoSTETrainer
    from hf_plugins.testing import CPU_TRAINING_ARGS, build_tiny_model

    model = build_tiny_model(
        tokenizer, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=max(1, args.heads // 2), intermediate_size=args.intermediate,
    )
    common = dict(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps_per_round, per_device_train_batch_size=args.batch_size,
        max_length=args.max_length, **{**CPU_TRAINING_ARGS, "logging_steps": 1000},
    )
    if kind == "roste":
        trainer = RoSTETrainer(model=model, args=RoSTEConfig(rotations="all", **common), train_dataset=dataset,
                               processing_class=tokenizer)
    else:
        trainer = FusedSFTTrainer(model=model, args=FusedSFTConfig(**common), train_dataset=dataset,
                                  processing_class=tokenizer)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    trainer.add_callback(Timer())
    trainer.train()
    return times[1:]  # the first step is a warm-up


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps-per-round", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from hf_plugins.testing import build_tokenizer, tiny_conversational_dataset

    tokenizer = build_tokenizer()
    dataset = tiny_conversational_dataset(args.batch_size * args.steps_per_round)
    times = {"sft": [], "roste": []}
    for _ in range(args.rounds):
        for kind in ("sft", "roste"):
            times[kind] += step_times(kind, args, dataset, tokenizer)
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    result = {
        "config": vars(args),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "median_step_s": medians,
        "roste_over_sft": medians["roste"] / medians["sft"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
