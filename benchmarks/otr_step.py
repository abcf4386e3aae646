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
default), which a busy shared machine inflates far less than wall time. "paired ratio" is the median over (batch, round) of the baseline's
time divided by the variant's on the same batch, which cancels slow drifts of the machine's load.

    python benchmarks/otr_step.py                    # hidden 256, 4 layers, V = 384 (the tiny tokenizer), 1 thread
    python benchmarks/otr_step.py --vocab 32000      # the same with the lm_head padded to a realistic vocabulary
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def clock() -> float:
    """Wall time on GPU; on CPU the process's CPU time, which a busy shared machine does not inflate when it
    deschedules us (the benchmark runs one thread, so CPU time is the work done)."""
    import torch

    return time.perf_counter() if torch.cuda.is_available() else time.process_time()


def build(args):
    """The tokenizer, a freshly built model folder and the dataset, built once and shared by every variant."""
    import torch

    from hf_plugins.testing import build_tiny_model, build_tokenizer, tiny_conversational_dataset

    tokenizer = build_tokenizer()
    model = build_tiny_model(
        tokenizer,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=4 * args.hidden,
    )
    if args.vocab and args.vocab > len(tokenizer):
        # Padding rows the data never uses still cost what a real vocabulary costs in the head (and the sampler)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.resize_token_embeddings(args.vocab, mean_resizing=False)
    folder = tempfile.mkdtemp(prefix="otr-bench-")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer, tiny_conversational_dataset(args.batch_size * args.batches, seed=1)


def make_trainer(name, args, folder, tokenizer, dataset):
    """The trainer of one variant: `"nll"` (FusedSFTTrainer), `"otr-K<k>"` or `"exact"` (OTRTrainer)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_plugins import FusedSFTConfig, FusedSFTTrainer, OTRConfig, OTRTrainer

    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"otr-bench-{name}-"),
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        learning_rate=1e-4,
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        assistant_only_loss=True,
    )
    if name == "nll":
        trainer_cls, config = FusedSFTTrainer, FusedSFTConfig(**common)
    else:
        num_samples = None if name == "exact" else int(name.removeprefix("otr-K"))
        trainer_cls, config = OTRTrainer, OTRConfig(num_samples=num_samples, **common)
    return trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def timed_step(trainer, batch, num_items) -> float:
    """Seconds of one forward + backward of `trainer` on `batch` (the part of a step the loss changes)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = clock()
    trainer.training_step(trainer.model, batch, num_items)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = clock() - start
    trainer.model.zero_grad(set_to_none=True)
    return elapsed


def head_only(args, vocab: int) -> None:
    """The loss head alone (forward + backward of `fused_linear_loss`, chunked) on random [rows, hidden] inputs: the
    share of OTR's sampling in the head itself, which the whole step dilutes."""
    import torch

    from hf_plugins.ops import fused_linear_loss

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.head_rows, args.hidden, generator=g).requires_grad_(True)
    weight = (torch.randn(vocab, args.hidden, generator=g) / args.hidden**0.5).requires_grad_(True)
    labels = torch.randint(0, vocab, (args.head_rows,), generator=g)
    calls = {}
    for name in args.variants:
        if name == "nll":
            calls[name] = dict(method="sft")
        else:
            num_samples = None if name == "exact" else int(name.removeprefix("otr-K"))
            calls[name] = dict(method="otr", num_samples=num_samples, generator=torch.Generator().manual_seed(0))

    def timed(kwargs) -> float:
        start = clock()
        loss = fused_linear_loss(hidden, weight, labels, backend="chunked", **kwargs)
        torch.autograd.grad(loss, [hidden, weight])
        return clock() - start

    for kwargs in calls.values():
        timed(kwargs)
    times = {name: [] for name in calls}
    for round_index in range(args.rounds * 2):
        names = list(calls)
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(calls[name]))
    print(f"loss head alone: {args.head_rows} rows, D = {args.hidden}, V = {vocab}, forward + backward, chunked")
    base = statistics.median(times[args.variants[0]])
    for name in calls:
        median = statistics.median(times[name])
        print(f"{name:<12}{median:>10.4f}{base / median:>21.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=0, help="pad the lm_head to this many rows (0: the tokenizer's)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batches", type=int, default=6, help="distinct batches, each timed on every variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=["nll", "otr-K8", "otr-K256", "exact"])
    parser.add_argument("--head_rows", type=int, default=512, help="also time the loss head alone (0: skip)")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from transformers.utils import logging

    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()
    folder, tokenizer, dataset = build(args)

    trainers = {name: make_trainer(name, args, folder, tokenizer, dataset) for name in args.variants}
    loader = iter(trainers[args.variants[0]].get_train_dataloader())
    batches = [next(loader) for _ in range(args.batches)]
    counts = [int((batch["labels"][:, 1:] != -100).sum()) for batch in batches]
    for name, trainer in trainers.items():  # warm-up: first calls allocate and pick kernels
        timed_step(trainer, batches[0], counts[0])

    # Interleaved: every batch runs on every variant back to back (in a rotating order), so load from other
    # processes lands on all variants alike, and each variant's time can be paired with the baseline's on the same
    # batch and round
    times = {name: [] for name in args.variants}
    for round_index in range(args.rounds):
        for index, (batch, count) in enumerate(zip(batches, counts)):
            shift = (round_index + index) % len(args.variants)
            for name in args.variants[shift:] + args.variants[:shift]:
                times[name].append(timed_step(trainers[name], batch, count))

    vocab = args.vocab if args.vocab > len(tokenizer) else len(tokenizer)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {args.threads} thread(s)"
    baseline = args.variants[0]
    print(
        f"model: hidden {args.hidden}, {args.layers} layers, V = {vocab}, full fine-tuning; batch {args.batch_size} "
        f"({statistics.mean(counts):.0f} supervised tokens on average); {device}; forward + backward, "
        f"{args.rounds} rounds x {args.batches} batches per variant"
    )
    print(f"{'variant':<12}{'median s':>10}{'throughput vs ' + baseline:>22}{'paired ratio':>14}")
    for name in args.variants:
        median = statistics.median(times[name])
        paired = statistics.median(b / t for b, t in zip(times[baseline], times[name]))
        print(f"{name:<12}{median:>10.4f}{statistics.median(times[baseline]) / median:>21.3f}x{paired:>13.3f}x")
    if args.head_rows:
        head_only(args, vocab)


if __name__ == "__main__":
    main()
