"""Training-step benchmark: stock `trl.SFTTrainer` vs `hf_plugins.FusedSFTTrainer`, same model, data and seed.

Each trainer runs in its own fresh subprocess so that peak memory (`ru_maxrss`) is its own. Reports the median
seconds per optimizer step (after warm-up), the peak resident memory of the process, and the final losses (which
must agree: the fused trainer computes the same loss).

    python benchmarks/trainer_step.py                       # SmolLM2-135M-Instruct from the demo cache, LoRA
    python benchmarks/trainer_step.py --full                # full fine-tuning (the lm_head is trained too)
    python benchmarks/trainer_step.py --model tiny          # the tiny offline test model (seconds)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import _harness as bench


def worker(args) -> dict:
    from trl import SFTConfig, SFTTrainer

    from hf_plugins import FusedSFTTrainer

    bench.setup(args.threads, quiet=False)
    if args.model == "tiny":
        from hf_plugins.testing import save_tiny_model, tiny_conversational_dataset

        model_dir = save_tiny_model(tempfile.mkdtemp())
        dataset = tiny_conversational_dataset(256)
    else:
        from hf_plugins.demo.data import load_chatterbot
        from hf_plugins.demo.model import resolve_model

        model_dir = resolve_model(None if args.model == "smollm2" else args.model)
        dataset = load_chatterbot()["train"]

    trainer_cls, config_cls = (FusedSFTTrainer, None) if args.worker == "fused" else (SFTTrainer, SFTConfig)
    trainer = bench.make_trainer(
        trainer_cls,
        model_dir,
        dataset,
        config_cls=config_cls,
        peft_config=None if args.full else bench.lora_config(),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
    )
    timer = bench.step_timer()
    trainer.add_callback(timer)
    with bench.PeakMemory("cpu") as memory:
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return {
        "trainer": trainer_cls.__name__,
        "seconds_per_step": statistics.median(timer.times[args.warmup :]),
        "peak_rss_mib": memory.peak_bytes / bench.MIB,
        "training_growth_mib": memory.extra_bytes / bench.MIB,
        "losses": losses,
        "vocab_size": trainer.model.config.vocab_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="'smollm2' (demo cache), 'tiny', or a local folder")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", choices=["stock", "fused"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        bench.report_result(worker(args))
        return

    results = {}
    for which in ("stock", "fused"):
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        try:
            results[which] = bench.run_worker([__file__, *sys.argv[1:], "--worker", which], f"{which} worker", env)
        except RuntimeError as error:
            sys.exit(str(error))

    stock, fused = results["stock"], results["fused"]
    mode = "full fine-tuning" if args.full else "LoRA r=8 all-linear"
    print(
        f"model={args.model} (V={fused['vocab_size']}), {mode}, batch {args.batch_size} x <= {args.max_length} "
        f"tokens, {args.threads} threads, median of steps {args.warmup + 1}..{args.steps}"
    )
    print(f"{'trainer':<18}{'s/step':>10}{'peak RSS MiB':>15}{'growth in train MiB':>22}")
    for row in (stock, fused):
        print(
            f"{row['trainer']:<18}{row['seconds_per_step']:>10.3f}{row['peak_rss_mib']:>15.0f}"
            f"{row['training_growth_mib']:>22.0f}"
        )
    print(f"speed-up (stock / fused time): {stock['seconds_per_step'] / fused['seconds_per_step']:.2f}x")
    diff = max(abs(a - b) for a, b in zip(stock["losses"], fused["losses"]))
    print(f"max |loss difference| over {len(fused['losses'])} steps: {diff:.2e}")
    bench.write_json(args.json, {"args": vars(args), **results})


if __name__ == "__main__":
    main()
