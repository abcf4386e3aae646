"""UDS benchmark: the cost of a UDS step against full-batch training on the same candidates, and the cost of scoring
from hidden states against the reference's scoring on materialised logits.

1. Step: `with_uds(FusedSFTTrainer)` keeping 1 of 4 candidates (its no-grad scoring forward on the 4, the scores,
   the selection, then forward + backward on the 1) against `FusedSFTTrainer` training on all 4 (forward + backward),
   same model, data and batches, interleaved batch by batch; the ratio of the two in one run. The optimizer step,
   the same for both and amortised over gradient accumulation, is not timed; the lm_head factors UDS recomputes once
   per optimizer step (full fine-tuning) are timed separately and added at 1, 8 and 32 micro-batches per step.
   Theory (a forward = 1, a backward = 2): (B + 3K) / 3B = 0.58 at K/B = 1/4, less when the lm_head is a large
   share of the step (the scoring forward never applies it).
2. Scoring: one candidate batch `[B, N]` scored from its hidden states (`scores_from_hidden`; the lm_head factors,
   computed once per optimizer step, timed separately) against the reference computation: the logits `[N, V]` of
   each example, `torch.linalg.svdvals`, the two-sided FFT sketch over the zero-padded `[T, V]` logits.

    python benchmarks/uds.py                         # hidden 256, 4 layers, lm_head padded to V = 32000, 1 thread
    python benchmarks/uds.py --vocab 0               # the tiny tokenizer's V = 384

On CPU the times are the process's CPU time (1 thread), which other jobs on a shared machine inflate less than wall
time; on a GPU, wall time with synchronisation.
"""

from __future__ import annotations

import argparse
import statistics

import _harness as bench


def uds_step(trainer, batch) -> float:
    """Seconds of one UDS micro-step: selection (scoring forward, scores, memory) + forward + backward on the kept."""

    def select_and_train():
        (selected,) = trainer._uds_select([batch])
        trainer.training_step(trainer.model, selected, bench.supervised_tokens(selected))

    elapsed, _ = bench.timed(select_and_train)
    trainer.model.zero_grad(set_to_none=True)
    return elapsed


def step_benchmark(args) -> None:
    from hf_plugins import FusedSFTTrainer, with_uds

    folder, tokenizer, vocab, dataset = bench.step_data(args, args.candidates)
    full = bench.step_trainer(FusedSFTTrainer, args, folder, tokenizer, dataset, args.candidates)
    uds = bench.step_trainer(
        with_uds(FusedSFTTrainer), args, folder, tokenizer, dataset, args.candidates, uds_keep=args.keep
    )
    batches = bench.first_batches(uds, args.batches, prepare=True)
    counts = [bench.supervised_tokens(batch) for batch in batches]
    steps = {
        "full": lambda i: bench.timed_step(full, batches[i], counts[i]),
        "uds": lambda i: uds_step(uds, batches[i]),
    }
    times = bench.interleaved(steps, lambda name, i: steps[name](i), args.rounds, batches=args.batches, warmup=True)

    print(
        f"step: hidden {args.hidden}, {args.layers} layers, V = {vocab}, full fine-tuning; {args.candidates} "
        f"candidates, keep {args.keep}; {bench.device_label(args.threads)}; {args.rounds} rounds x {args.batches} "
        "batches, interleaved"
    )
    full_median, uds_median = statistics.median(times["full"]), statistics.median(times["uds"])
    print(f"  full batch (forward + backward on {args.candidates}): {full_median:.4f} s")
    print(f"  UDS (score {args.candidates}, forward + backward on {args.keep}): {uds_median:.4f} s")
    paired = bench.paired_ratio(times, "uds", "full")
    print(
        f"  UDS / full: {uds_median / full_median:.3f} (paired median {paired:.3f}); theory "
        f"{(args.candidates + 3 * args.keep) / (3 * args.candidates):.3f} without the head"
    )
    # The lm_head factors are recomputed once per optimizer step while the head trains (above: once, as no optimizer
    # step is taken); their cost per micro-step shrinks with gradient accumulation
    callback = uds.uds_callback
    weight = uds.model.get_output_embeddings().weight

    def recompute_factors():
        callback._factors = None
        callback.head_factors(weight, None, step=-1)

    factors, _ = bench.timed(recompute_factors)
    for accumulation in (1, 8, 32):
        print(
            f"  with the lm_head factors ({factors:.4f} s per optimizer step) at {accumulation} micro-batches per "
            f"step: UDS / full = {(uds_median + factors / accumulation) / full_median:.3f}"
        )


def scoring_benchmark(args) -> None:
    import torch

    from hf_plugins.losses.uds import (
        SketchConstants,
        head_factors,
        nuclear_norms_from_logits,
        scores_from_hidden,
        sketches_from_logits,
    )

    vocab = args.score_vocab
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.candidates, args.score_tokens, args.hidden, generator=g)
    weight = torch.randn(vocab, args.hidden, generator=g) / args.hidden**0.5
    constants = SketchConstants.draw(args.sketch_length, vocab, 8, 128, g)

    def reference():
        utility, sketches = [], []
        for example in hidden:  # the reference projects one example at a time
            logits = (example @ weight.T)[None]
            utility.append(nuclear_norms_from_logits(logits))
            sketches.append(sketches_from_logits(logits, constants))
        return torch.cat(utility), torch.cat(sketches)

    def best_of(fn, repeats):
        runs = [bench.timed(fn) for _ in range(repeats)]
        return min(seconds for seconds, _ in runs), runs[-1][1]

    cosines_time, cosines = best_of(lambda: constants.vocab_transform(0, vocab, torch.float32), 1)
    factor_time, factors = best_of(lambda: head_factors(weight, None, constants, torch.float32, cosines), 2)
    ours_time, (u_ours, s_ours) = best_of(lambda: scores_from_hidden(hidden, factors, constants), args.score_repeats)
    ref_time, (u_ref, s_ref) = best_of(reference, max(1, args.score_repeats // 2))
    err_u = ((u_ours - u_ref).abs() / u_ref.abs()).max().item()
    err_s = ((s_ours.double() - s_ref.double()).norm() / s_ref.double().norm()).item()
    print(
        f"scoring: B = {args.candidates}, N = {args.score_tokens}, D = {args.hidden}, V = {vocab}, T = "
        f"{args.sketch_length}, sketch 8 x 128, float32"
    )
    print(f"  reference (logits, svdvals, FFT sketch): {ref_time:.4f} s per batch")
    print(
        f"  hidden states (Gram + eigvalsh, projected sketch): {ours_time:.5f} s per batch "
        f"({ref_time / ours_time:.0f}x faster)"
    )
    print(
        f"  lm_head factors (once per optimizer step, or per run with a frozen head): {factor_time:.4f} s; the "
        f"vocabulary cosines they use (once per run): {cosines_time:.4f} s"
    )
    print(f"  largest relative difference: utility {err_u:.1e}, sketch {err_s:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_step_arguments(parser, vocab=32000, batch_size=False)
    parser.add_argument("--candidates", type=int, default=4, help="B, candidates per micro-batch")
    parser.add_argument("--keep", type=int, default=1, help="K, examples kept")
    parser.add_argument("--score_vocab", type=int, default=32000)
    parser.add_argument("--score_tokens", type=int, default=128, help="N, padded tokens per candidate")
    parser.add_argument("--sketch_length", type=int, default=512, help="T")
    parser.add_argument("--score_repeats", type=int, default=4)
    parser.add_argument("--skip_step", action="store_true")
    args = parser.parse_args()

    bench.setup(args.threads)
    if not args.skip_step:
        step_benchmark(args)
    scoring_benchmark(args)


if __name__ == "__main__":
    main()
