"""Training-step benchmark: `PoFTTrainer` against `FusedSFTTrainer(loss_type="nll")`, same model, data, seed and loss
head, plus the throughput of `score_with_aligned_models`.

PoFT's loss needs each sequence's mean log-prob before its per-sequence weight is known, so its head makes one more
no-grad forward matmul (four instead of three); everything else in the step is SFT's. The step timing is
`benchmarks/otr_step.py`'s (forward + backward of `Trainer.training_step`, variants interleaved batch by batch, CPU
time on CPU, paired ratios); see that file for how to read it.

    python benchmarks/poft_step.py                   # hidden 256, 4 layers, V = 384 (the tiny tokenizer), 1 thread
    python benchmarks/poft_step.py --vocab 32000     # the lm_head padded to a realistic vocabulary
"""

from __future__ import annotations

import argparse
import tempfile

import _harness as bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_step_arguments(parser)
    parser.add_argument("--score_examples", type=int, default=64, help="examples scored for the throughput (0: skip)")
    args = parser.parse_args()

    torch = bench.setup(args.threads)
    from hf_plugins import FusedSFTTrainer, PoFTTrainer, score_with_aligned_models

    folder, tokenizer, vocab, dataset = bench.step_data(args, args.batch_size)
    dataset = dataset.add_column("ref_score", [-3.0 + 0.01 * i for i in range(len(dataset))])

    classes = {"nll": FusedSFTTrainer, "poft": PoFTTrainer}
    trainers = {
        name: bench.step_trainer(cls, args, folder, tokenizer, dataset, args.batch_size)
        for name, cls in classes.items()
    }
    batches = {"poft": bench.first_batches(trainers["poft"], args.batches)}
    batches["nll"] = [{k: v for k, v in batch.items() if k != "ref_score"} for batch in batches["poft"]]
    counts = {
        "nll": [bench.supervised_tokens(batch) for batch in batches["poft"]],
        "poft": [int(batch["labels"].shape[0]) for batch in batches["poft"]],  # PoFT normalises by sequences
    }
    times = bench.interleaved(
        classes,
        lambda name, i: bench.timed_step(trainers[name], batches[name][i], counts[name][i]),
        args.rounds,
        batches=args.batches,
        warmup=True,
    )

    print(
        f"model: hidden {args.hidden}, {args.layers} layers, V = {vocab}, full fine-tuning; batch "
        f"{args.batch_size}; {bench.device_label(args.threads)}; forward + backward, {args.rounds} rounds x "
        f"{args.batches} batches per variant"
    )
    print("\n".join(bench.ratio_table(times, "nll", width=10)))

    if args.score_examples:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        subset = dataset.select(range(min(args.score_examples, len(dataset)))).remove_columns("ref_score")
        elapsed, scored = bench.timed(
            lambda: score_with_aligned_models(
                subset,
                model,
                tokenizer,
                max_length=args.max_length,
                load_from_cache_file=False,
                cache_dir=tempfile.mkdtemp(),
            )
        )
        texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in subset]
        tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
        print(
            f"scoring: {len(scored)} examples, {tokens} rendered tokens in {elapsed:.2f} s: {tokens / elapsed:.0f} "
            "tokens/s (one aligned model, batch 8, no cache)"
        )


if __name__ == "__main__":
    main()
