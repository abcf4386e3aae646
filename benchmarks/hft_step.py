"""HFT (Half Fine-Tuning) against full fine-tuning: seconds per optimizer step and peak memory, same model, data and
seed (`with_hft(FusedSFTTrainer)` vs `FusedSFTTrainer`).

Each variant runs `Trainer.train()` in its own fresh process, so its peak resident memory is its own; the time is
the median CPU time (`_harness.clock`) of a whole optimizer step (forward, backward and the AdamW update, where HFT saves: the frozen
half gets no weight gradient and no optimizer state) after the warm-up steps.

    python benchmarks/hft_step.py --output benchmarks/results/cpu-hft-step.json     # both models below
    python benchmarks/hft_step.py --models tiny                                      # the tiny model alone

Models: `tiny`, the test fixture scaled up (hidden 256, 4 layers, MLP 1024, lm_head padded to V=32000: the
trainer-step benchmarks' model), and `smollm2`, SmolLM2-135M-Instruct from the demo's cache (V=49152, tied
embeddings), on chatterbot conversations.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import _harness as bench


def cpu_step_timer():
    """A callback whose `times` are the CPU seconds (`bench.clock`) of every optimizer step: on a shared machine the
    process's CPU time is not inflated by other jobs as its wall time is."""
    from transformers import TrainerCallback

    class CPUStepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *_, **__):
            self.start = bench.clock()

        def on_step_end(self, *_, **__):
            self.times.append(bench.clock() - self.start)

    return CPUStepTimer()


def worker(args) -> dict:
    import torch

    from hf_plugins import FusedSFTConfig, FusedSFTTrainer, with_hft

    bench.setup(args.threads, quiet=True)
    if args.model == "tiny":
        from hf_plugins.testing import tiny_conversational_dataset

        folder, tokenizer, _ = bench.tiny_model_folder(256, 4, 4, 2, 1024, 32000)
        dataset = tiny_conversational_dataset(args.batch_size * args.steps, seed=1)
    else:
        from transformers import AutoTokenizer

        from hf_plugins.demo.data import load_chatterbot
        from hf_plugins.demo.model import resolve_model

        folder = resolve_model(None)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        dataset = load_chatterbot()["train"]
    hft = args.worker == "hft"
    trainer_cls, config_cls = (
        (with_hft(FusedSFTTrainer), with_hft(FusedSFTConfig)) if hft else (FusedSFTTrainer, FusedSFTConfig)
    )
    with bench.PeakMemory("cpu") as memory:
        trainer = bench.make_trainer(
            trainer_cls,
            folder,
            dataset,
            tokenizer,
            config_cls=config_cls,
            seed=args.seed,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            max_length=args.max_length,
            **({"hft_seed": args.seed} if hft else {}),
        )
        timer = cpu_step_timer()
        trainer.add_callback(timer)
        trainer.train()
    parameters = list(trainer.model.parameters())
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if
                      torch.is_tensor(t) and t.dim() > 0)  # fmt: skip
    return {
        "variant": args.worker,
        "seconds_per_step": statistics.median(timer.times[args.warmup :]),
        "step_times": timer.times,
        "peak_rss_mib": memory.peak_bytes / bench.MIB,
        "growth_mib": memory.extra_bytes / bench.MIB,
        "optimizer_state_mib": state_bytes / bench.MIB,
        "trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad),
        "parameters": sum(p.numel() for p in parameters),
        "frozen_fraction_of_layers": trainer.hft_selection.frozen_fraction if hft else 0.0,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h],
        "vocab_size": trainer.model.config.vocab_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="also write the JSON result here")
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["full", "hft"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        bench.report_result(worker(args))
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    results = {}
    rows = []
    for model in args.models:
        results[model] = {}
        for variant in ("full", "hft"):
            argv = [__file__, *sys.argv[1:], "--model", model, "--worker", variant]
            results[model][variant] = bench.run_worker(argv, f"{model} {variant}", env)
            bench.log(f"{model} {variant}: {results[model][variant]['seconds_per_step']:.3f} s/step")
        full, hft = results[model]["full"], results[model]["hft"]
        results[model]["time_saving"] = 1 - hft["seconds_per_step"] / full["seconds_per_step"]
        results[model]["peak_rss_saving_mib"] = full["peak_rss_mib"] - hft["peak_rss_mib"]
        for row in (full, hft):
            rows.append(
                [
                    f"{model} (V={row['vocab_size']})",
                    "HFT" if row["variant"] == "hft" else "full fine-tuning",
                    f"{row['trainable_parameters'] / 1e6:.1f}M / {row['parameters'] / 1e6:.1f}M",
                    f"{row['seconds_per_step']:.3f}",
                    f"{row['peak_rss_mib']:.0f}",
                    f"{row['optimizer_state_mib']:.0f}",
                ]
            )
    header = ["model", "variant", "trainable", "s/step", "peak RSS MiB", "AdamW state MiB"]
    print(bench.table(header, rows, align="llrrrr"))
    for model in args.models:
        r = results[model]
        print(f"{model}: HFT saves {100 * r['time_saving']:.1f}% of the step time, {r['peak_rss_saving_mib']:.0f} MiB")
    report = {"config": vars(args), "device": bench.device_label(args.threads), "results": results}
    bench.write_json(args.output, report)


if __name__ == "__main__":
    main()
