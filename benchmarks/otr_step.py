"""Training-step benchmark: `OTRTrainer` at K=8 and K=256 (and the exact-expectation mode) against
`FusedSFTTrainer(loss_type="nll")`, same model, data, seed and loss head.

OTR adds to the fused head, per supervised token, one tempered softmax and cumulative sum over the vocabulary and K
binary searches (`searchsorted`), plus a scatter of K entries into the logits gradient; the matmuls are the same. The
script times the forward + backward of a training step (`Trainer.training_step`, the part of a step the loss
changes; the optimizer update is the same for every variant and would only dilute the ratio) of each trainer on the
same batches, and prints the median seconds per step and the throughput of each variant relative to the NLL
baseline, from one run.

The variants are interleaved: each batch runs on every variant back to back, in a rotating order, so a burst of load
from other processes lands on all of them alike. On CPU the times are the process's CPU seconds (one thread by
default), which a busy shared machine inflates far less than wall time. "paired ratio" is the median over (batch,
round) of the baseline's time divided by the variant's on the same batch, which cancels slow drifts of the machine's
load.

    python benchmarks/otr_step.py                    # hidden 256, 4 layers, V = 384 (the tiny tokenizer), 1 thread
    python benchmarks/otr_step.py --vocab 32000      # the same with the lm_head padded to a realistic vocabulary
"""

from __future__ import annotations

import argparse
import statistics

import _harness as bench


def make_trainer(name, args, folder, tokenizer, dataset):
    """The trainer of one variant: `"nll"` (FusedSFTTrainer), `"otr-K<k>"` or `"exact"` (OTRTrainer)."""
    from hf_plugins import FusedSFTTrainer, OTRTrainer

    if name == "nll":
        return bench.step_trainer(FusedSFTTrainer, args, folder, tokenizer, dataset, args.batch_size)
    num_samples = None if name == "exact" else int(name.removeprefix("otr-K"))
    return bench.step_trainer(OTRTrainer, args, folder, tokenizer, dataset, args.batch_size, num_samples=num_samples)


def head_only(args, vocab: int) -> None:
    """The loss head alone (forward + backward of `fused_linear_loss`, chunked) on random [rows, hidden] inputs: the
    share of OTR's sampling in the head itself, which the whole step dilutes."""
    import torch

    from hf_plugins.ops import fused_linear_loss

    inputs, _ = bench.head_inputs(args.head_rows, vocab, args.hidden)
    hidden, weight = inputs["hidden"], inputs["weight"]
    calls = {}
    for name in args.variants:
        if name == "nll":
            calls[name] = dict(method="sft")
        else:
            num_samples = None if name == "exact" else int(name.removeprefix("otr-K"))
            calls[name] = dict(method="otr", num_samples=num_samples, generator=torch.Generator().manual_seed(0))

    def run(name, _):
        def forward_backward():
            loss = fused_linear_loss(hidden, weight, inputs["labels"], backend="chunked", **calls[name])
            torch.autograd.grad(loss, [hidden, weight])

        return bench.timed(forward_backward)[0]

    times = bench.interleaved(calls, run, args.rounds * 2, warmup=True)
    print(f"loss head alone: {args.head_rows} rows, D = {args.hidden}, V = {vocab}, forward + backward, chunked")
    print("\n".join(bench.ratio_table(times, args.variants[0], paired=False, header=False)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_step_arguments(parser)
    parser.add_argument("--variants", nargs="+", default=["nll", "otr-K8", "otr-K256", "exact"])
    parser.add_argument("--head_rows", type=int, default=512, help="also time the loss head alone (0: skip)")
    args = parser.parse_args()

    bench.setup(args.threads)
    folder, tokenizer, vocab, dataset = bench.step_data(args, args.batch_size)
    trainers = {name: make_trainer(name, args, folder, tokenizer, dataset) for name in args.variants}
    batches = bench.first_batches(trainers[args.variants[0]], args.batches)
    counts = [bench.supervised_tokens(batch) for batch in batches]
    times = bench.interleaved(
        args.variants,
        lambda name, i: bench.timed_step(trainers[name], batches[i], counts[i]),
        args.rounds,
        batches=len(batches),
        warmup=True,
    )

    print(
        f"model: hidden {args.hidden}, {args.layers} layers, V = {vocab}, full fine-tuning; batch {args.batch_size} "
        f"({statistics.mean(counts):.0f} supervised tokens on average); {bench.device_label(args.threads)}; forward "
        f"+ backward, {args.rounds} rounds x {args.batches} batches per variant"
    )
    print("\n".join(bench.ratio_table(times, args.variants[0])))
    if args.head_rows:
        head_only(args, vocab)


if __name__ == "__main__":
    main()
