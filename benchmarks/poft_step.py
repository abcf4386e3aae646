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
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from otr_step import build, clock, timed_step  # noqa: E402


def make_trainer(name, args, folder, tokenizer, dataset):
    import torch
    from transformers import AutoModelForCausalLM

    from hf_plugins import FusedSFTConfig, FusedSFTTrainer, PoFTConfig, PoFTTrainer

    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"poft-bench-{name}-"), per_device_train_batch_size=args.batch_size,
        max_length=args.max_length, learning_rate=1e-4, bf16=False, use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False, report_to="none", save_strategy="no", seed=0, dataloader_num_workers=0,
        disable_tqdm=True, assistant_only_loss=True,
    )
    trainer_cls, config = (FusedSFTTrainer, FusedSFTConfig(**common)) if name == "nll" else (PoFTTrainer, PoFTConfig(**common))
    return trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), args=config,
        train_dataset=dataset, processing_class=tokenizer,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=0, help="pad the lm_head to this many rows (0: the tokenizer's)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--score_examples", type=int, default=64, help="examples scored for the throughput (0: skip)")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from transformers.utils import logging

    from hf_plugins import score_with_aligned_models

    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    folder, tokenizer, dataset = build(args)
    dataset = dataset.add_column("ref_score", [-3.0 + 0.01 * i for i in range(len(dataset))])

    variants = ["nll", "poft"]
    trainers = {name: make_trainer(name, args, folder, tokenizer, dataset) for name in variants}
    loader = iter(trainers["poft"].get_train_dataloader())
    batches = [next(loader) for _ in range(args.batches)]
    counts = {name: [] for name in variants}
    for batch in batches:
        counts["nll"].append(int((batch["labels"][:, 1:] != -100).sum()))
        counts["poft"].append(int(batch["labels"].shape[0]))  # PoFT normalises by sequences
    plain = [{k: v for k, v in batch.items() if k != "ref_score"} for batch in batches]
    for name in variants:
        timed_step(trainers[name], (batches if name == "poft" else plain)[0], counts[name][0])
    times = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for index in range(len(batches)):
            shift = (round_index + index) % 2
            for name in variants[shift:] + variants[:shift]:
                batch = (batches if name == "poft" else plain)[index]
                times[name].append(timed_step(trainers[name], batch, counts[name][index]))

    vocab = args.vocab if args.vocab > len(tokenizer) else len(tokenizer)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {args.threads} thread(s)"
    print(f"model: hidden {args.hidden}, {args.layers} layers, V = {vocab}, full fine-tuning; batch {args.batch_size}; "
          f"{device}; forward + backward, {args.rounds} rounds x {args.batches} batches per variant")
    print(f"{'variant':<10}{'median s':>10}{'throughput vs nll':>20}{'paired ratio':>14}")
    for name in variants:
        median = statistics.median(times[name])
        paired = statistics.median(b / t for b, t in zip(times["nll"], times[name]))
        print(f"{name:<10}{median:>10.4f}{statistics.median(times['nll']) / median:>19.3f}x{paired:>13.3f}x")

    if args.score_examples:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        subset = dataset.select(range(min(args.score_examples, len(dataset)))).remove_columns("ref_score")
        start = clock()
        scored = score_with_aligned_models(subset, model, tokenizer, max_length=args.max_length,
                                           load_from_cache_file=False, cache_dir=tempfile.mkdtemp())
        elapsed = clock() - start
        texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in subset]
        tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
        print(f"scoring: {len(scored)} examples, {tokens} rendered tokens in {elapsed:.2f} s: {tokens / elapsed:.0f} "
              "tokens/s (one aligned model, batch 8, no cache)")


if __name__ == "__main__":
    main()
