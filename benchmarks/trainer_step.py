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
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def worker(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from hf_plugins import FusedSFTConfig, FusedSFTTrainer
    from hf_plugins.testing import CPU_TRAINING_ARGS

    torch.set_num_threads(args.threads)
    if args.model == "tiny":
        from hf_plugins.testing import save_tiny_model, tiny_conversational_dataset

        model_dir = save_tiny_model(tempfile.mkdtemp())
        dataset = tiny_conversational_dataset(256)
    else:
        from hf_plugins.demo.data import load_chatterbot
        from hf_plugins.demo.model import resolve_model

        model_dir = resolve_model(None if args.model == "smollm2" else args.model)
        dataset = load_chatterbot()["train"]

    trainer_cls, config_cls = (FusedSFTTrainer, FusedSFTConfig) if args.worker == "fused" else (SFTTrainer, SFTConfig)
    config = config_cls(
        output_dir=tempfile.mkdtemp(),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        learning_rate=1e-4,
        disable_tqdm=True,
        **CPU_TRAINING_ARGS,
    )
    peft_config = None
    if not args.full:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = trainer_cls(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=peft_config,
    )

    step_times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_times.append(time.perf_counter() - self.start)

    trainer.add_callback(Timer())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer.train()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return {
        "trainer": trainer_cls.__name__,
        "seconds_per_step": statistics.median(step_times[args.warmup :]),
        "peak_rss_mib": rss_after / 1024,
        "training_growth_mib": (rss_after - rss_before) / 1024,
        "losses": losses,
        "vocab_size": model.config.vocab_size,
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
        print("RESULT " + json.dumps(worker(args)))
        return

    results = {}
    for which in ("stock", "fused"):
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--worker", which], env=env, capture_output=True, text=True
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            sys.exit(f"{which} worker failed:\n{out.stderr[-4000:]}")
        results[which] = json.loads(lines[-1][len("RESULT ") :])

    stock, fused = results["stock"], results["fused"]
    mode = "full fine-tuning" if args.full else "LoRA r=8 all-linear"
    print(f"model={args.model} (V={fused['vocab_size']}), {mode}, batch {args.batch_size} x <= {args.max_length} tokens, "
          f"{args.threads} threads, median of steps {args.warmup + 1}..{args.steps}")
    print(f"{'trainer':<18}{'s/step':>10}{'peak RSS MiB':>15}{'growth in train MiB':>22}")
    for row in (stock, fused):
        print(f"{row['trainer']:<18}{row['seconds_per_step']:>10.3f}{row['peak_rss_mib']:>15.0f}{row['training_growth_mib']:>22.0f}")
    print(f"speed-up (stock / fused time): {stock['seconds_per_step'] / fused['seconds_per_step']:.2f}x")
    diff = max(abs(a - b) for a, b in zip(stock["losses"], fused["losses"]))
    print(f"max |loss difference| over {len(fused['losses'])} steps: {diff:.2e}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), **results}, handle, indent=2)


if __name__ == "__main__":
    main()
