"""Training-step benchmark: `LfUTrainer` (alpha 0.1, lambda 5, every hidden state) against `FusedSFTTrainer`, same
model, data, seed and loss head, with full fine-tuning and with LoRA.

An LfU step runs, besides SFT's forward and backward on the batch: a forward and backward of the SFT loss on the
ascent minibatch B_B, and a forward to the hidden states (no lm_head) and backward of the consistency loss under the
perturbed parameters, plus the copy and restore of the trainable parameters: about three forwards and two backwards
where SFT runs one of each, so about 2-2.5x SFT's time (the spec's estimate). The script times the forward +
backward of a training step (`Trainer.training_step`; the optimizer update is the same for both and would only
dilute the ratio) of each trainer on the same batches, interleaved (each batch on every variant back to back, in a
rotating order), as CPU seconds on one thread; "paired ratio" is the median over (batch, round) of the baseline's
time over the variant's.

    python benchmarks/lfu_step.py                      # hidden 256, 4 layers, V = 384 (the tiny tokenizer), 1 thread
    python benchmarks/lfu_step.py --vocab 32000        # the lm_head padded to a realistic vocabulary
    python benchmarks/lfu_step.py --output benchmarks/results/cpu-lfu-step-tiny.json
"""

from __future__ import annotations

import argparse
import statistics

import _harness as bench


VARIANTS = ("sft", "lfu", "sft-lora", "lfu-lora")


def make_trainer(name, args, folder, tokenizer, dataset):
    from hf_plugins import FusedSFTTrainer, LfUTrainer

    lora = name.endswith("-lora")
    config = {"peft_config": bench.lora_config(), "seed": 0} if lora else {}
    if name.startswith("lfu"):
        return bench.step_trainer(
            LfUTrainer, args, folder, tokenizer, dataset, args.batch_size, lfu_alpha=0.1, lfu_lambda=5.0, **config
        )
    return bench.step_trainer(FusedSFTTrainer, args, folder, tokenizer, dataset, args.batch_size, **config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_step_arguments(parser)
    parser.add_argument("--output", default=None, help="also write the JSON result here")
    args = parser.parse_args()

    bench.setup(args.threads)
    folder, tokenizer, vocab, dataset = bench.step_data(args, args.batch_size)
    trainers = {name: make_trainer(name, args, folder, tokenizer, dataset) for name in VARIANTS}
    batches = bench.first_batches(trainers["sft"], args.batches)
    counts = [bench.supervised_tokens(batch) for batch in batches]
    times = bench.interleaved(
        VARIANTS,
        lambda name, i: bench.timed_step(trainers[name], batches[i], counts[i]),
        args.rounds,
        batches=len(batches),
        warmup=True,
    )
    header = (
        f"model: hidden {args.hidden}, {args.layers} layers, V = {vocab}; batch {args.batch_size} "
        f"({statistics.mean(counts):.0f} supervised tokens on average); {bench.device_label(args.threads)}; forward "
        f"+ backward, {args.rounds} rounds x {args.batches} batches per variant"
    )
    print(header)
    full = {name: times[name] for name in ("sft", "lfu")}
    lora = {name: times[name] for name in ("sft-lora", "lfu-lora")}
    print("full fine-tuning")
    print("\n".join(bench.ratio_table(full, "sft")))
    print("LoRA r=8, all linear layers")
    print("\n".join(bench.ratio_table(lora, "sft-lora")))
    result = {
        "config": vars(args),
        "setup": header,
        "median_seconds": {name: statistics.median(values) for name, values in times.items()},
        "lfu_over_sft": {
            "full": bench.paired_ratio(times, "lfu", "sft"),
            "lora": bench.paired_ratio(times, "lfu-lora", "sft-lora"),
        },
    }
    bench.write_json(args.output, result)


if __name__ == "__main__":
    main()
