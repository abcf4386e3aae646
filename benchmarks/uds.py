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
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from otr_step import build, clock, timed_step  # noqa: E402


def make_trainer(uds: bool, args, folder, tokenizer, dataset):
    import torch
    from transformers import AutoModelForCausalLM

    from hf_plugins import FusedSFTConfig, FusedSFTTrainer, with_uds

    common = dict(
        output_dir=tempfile.mkdtemp(prefix="uds-bench-"), per_device_train_batch_size=args.candidates,
        max_length=args.max_length, learning_rate=1e-4, bf16=False, use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False, report_to="none", save_strategy="no", seed=0, dataloader_num_workers=0,
        disable_tqdm=True, assistant_only_loss=True,
    )
    if uds:
        cls = with_uds(FusedSFTTrainer)
        config = cls.config_class(**common, uds_keep=args.keep)
    else:
        cls, config = FusedSFTTrainer, FusedSFTConfig(**common)
    return cls(
        model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), args=config,
        train_dataset=dataset, processing_class=tokenizer,
    )


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def uds_step(trainer, batch) -> float:
    """Seconds of one UDS micro-step: selection (scoring forward, scores, memory) + forward + backward on the kept."""
    sync()
    start = clock()
    (selected,) = trainer._uds_select([batch])
    num_items = int((selected["labels"][:, 1:] != -100).sum())
    trainer.training_step(trainer.model, selected, num_items)
    sync()
    elapsed = clock() - start
    trainer.model.zero_grad(set_to_none=True)
    return elapsed


def step_benchmark(args, torch) -> None:
    folder, tokenizer, dataset = build(argparse.Namespace(**{**vars(args), "batch_size": args.candidates}))
    full = make_trainer(False, args, folder, tokenizer, dataset)
    uds = make_trainer(True, args, folder, tokenizer, dataset)
    loader = iter(uds.get_train_dataloader())
    batches = [uds._prepare_inputs(next(loader)) for _ in range(args.batches)]
    counts = [int((batch["labels"][:, 1:] != -100).sum()) for batch in batches]
    timed_step(full, batches[0], counts[0])  # warm-up
    uds_step(uds, batches[0])
    times = {"full": [], "uds": []}
    for round_index in range(args.rounds):
        for index, batch in enumerate(batches):
            order = ("full", "uds") if (round_index + index) % 2 == 0 else ("uds", "full")
            for name in order:
                times[name].append(
                    timed_step(full, batch, counts[index]) if name == "full" else uds_step(uds, batch)
                )
    vocab = args.vocab if args.vocab > len(tokenizer) else len(tokenizer)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {args.threads} thread(s)"
    print(f"step: hidden {args.hidden}, {args.layers} layers, V = {vocab}, full fine-tuning; {args.candidates} "
          f"candidates, keep {args.keep}; {device}; {args.rounds} rounds x {args.batches} batches, interleaved")
    full_median, uds_median = statistics.median(times["full"]), statistics.median(times["uds"])
    paired = statistics.median(u / f for u, f in zip(times["uds"], times["full"]))
    print(f"  full batch (forward + backward on {args.candidates}): {full_median:.4f} s")
    print(f"  UDS (score {args.candidates}, forward + backward on {args.keep}): {uds_median:.4f} s")
    print(f"  UDS / full: {uds_median / full_median:.3f} (paired median {paired:.3f}); theory "
          f"{(args.candidates + 3 * args.keep) / (3 * args.candidates):.3f} without the head")
    # The lm_head factors are recomputed once per optimizer step while the head trains (above: once, as no optimizer
    # step is taken); their cost per micro-step shrinks with gradient accumulation
    callback = uds.uds_callback
    weight = uds.model.get_output_embeddings().weight
    sync()
    start = clock()
    callback._factors = None
    callback.head_factors(weight, None, step=-1)
    sync()
    factors = clock() - start
    for accumulation in (1, 8, 32):
        print(f"  with the lm_head factors ({factors:.4f} s per optimizer step) at {accumulation} micro-batches per "
              f"step: UDS / full = {(uds_median + factors / accumulation) / full_median:.3f}")


def scoring_benchmark(args, torch) -> None:
    from hf_plugins.callbacks.uds import (
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

    cosines_time, cosines = None, None

    def ours_factors():
        return head_factors(weight, None, constants, torch.float32, cosines)

    def reference():
        utility, sketches = [], []
        for example in hidden:  # the reference projects one example at a time
            logits = (example @ weight.T)[None]
            utility.append(nuclear_norms_from_logits(logits))
            sketches.append(sketches_from_logits(logits, constants))
        return torch.cat(utility), torch.cat(sketches)

    def best_of(fn, repeats):
        times = []
        for _ in range(repeats):
            sync()
            start = clock()
            out = fn()
            sync()
            times.append(clock() - start)
        return min(times), out

    cosines_time, cosines = best_of(lambda: constants.vocab_transform(0, vocab, torch.float32), 1)
    factor_time, factors = best_of(ours_factors, 2)
    ours_time, (u_ours, s_ours) = best_of(lambda: scores_from_hidden(hidden, factors, constants), args.score_repeats)
    ref_time, (u_ref, s_ref) = best_of(reference, max(1, args.score_repeats // 2))
    err_u = ((u_ours - u_ref).abs() / u_ref.abs()).max().item()
    err_s = ((s_ours.double() - s_ref.double()).norm() / s_ref.double().norm()).item()
    print(f"scoring: B = {args.candidates}, N = {args.score_tokens}, D = {args.hidden}, V = {vocab}, T = "
          f"{args.sketch_length}, sketch 8 x 128, float32")
    print(f"  reference (logits, svdvals, FFT sketch): {ref_time:.4f} s per batch")
    print(f"  hidden states (Gram + eigvalsh, projected sketch): {ours_time:.5f} s per batch "
          f"({ref_time / ours_time:.0f}x faster)")
    print(f"  lm_head factors (once per optimizer step, or per run with a frozen head): {factor_time:.4f} s; the "
          f"vocabulary cosines they use (once per run): {cosines_time:.4f} s")
    print(f"  largest relative difference: utility {err_u:.1e}, sketch {err_s:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000, help="pad the lm_head to rows (0: the tokenizer's)")
    parser.add_argument("--candidates", type=int, default=4, help="B, candidates per micro-batch")
    parser.add_argument("--keep", type=int, default=1, help="K, examples kept")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--score_vocab", type=int, default=32000)
    parser.add_argument("--score_tokens", type=int, default=128, help="N, padded tokens per candidate")
    parser.add_argument("--sketch_length", type=int, default=512, help="T")
    parser.add_argument("--score_repeats", type=int, default=4)
    parser.add_argument("--skip_step", action="store_true")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from transformers.utils import logging

    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    if not args.skip_step:
        step_benchmark(args, torch)
    scoring_benchmark(args, torch)


if __name__ == "__main__":
    main()
