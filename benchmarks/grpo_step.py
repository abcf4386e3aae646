#!/usr/bin/env python
"""A GRPO training step: stock `trl.GRPOTrainer` vs `hf_plugins.FusedGRPOTrainer`, same model, prompts and
completions.

Completions are replayed (`hf_plugins.testing.ReplayedCompletions` as the `rollout_func`), so generation costs
nothing and both trainers train on the same tokens; what is timed is the rest of a step: rewards and advantages,
TRL's no-grad reference pass (beta 0.04; the same code in both), and the policy loss with its backward (`step`), and
the policy loss with its backward alone on prepared inputs (`loss`), which is all the trainers differ in. Variants
are interleaved on the same batches, in rotating order, and compared pairwise (`_harness.paired_ratio`). A real
GRPO step is dominated by generation, so its speed-up is smaller than the `loss` ratio.

    python benchmarks/grpo_step.py                         # tiny model (hidden 256, 4 layers), V=32000, full FT
    python benchmarks/grpo_step.py --lora                  # LoRA: the lm_head is frozen (two head matmuls)
    python benchmarks/grpo_step.py --model smollm2         # SmolLM2-135M-Instruct from the demo cache
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

import _harness as bench


def build(trainer_cls, model_dir, tokenizer, args, lora: bool):
    """A stock or fused trainer with replayed completions; dapo with a KL to the reference (beta 0.04)."""
    import torch
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import GRPOConfig

    from hf_plugins import FusedGRPOConfig, FusedGRPOTrainer
    from hf_plugins.testing import (
        CPU_TRAINING_ARGS,
        ReplayedCompletions,
        replayed_completion_reward,
        tiny_prompt_completion_dataset,
    )

    config_cls = FusedGRPOConfig if trainer_cls is FusedGRPOTrainer else GRPOConfig
    config = config_cls(
        **{
            **CPU_TRAINING_ARGS,
            "use_cpu": not bench.cuda_available(),
            "output_dir": tempfile.mkdtemp(),
            "learning_rate": 1e-6,
            "disable_tqdm": True,
            "per_device_train_batch_size": args.batch_size,
            "num_generations": args.num_generations,
            "max_completion_length": args.completion_length,
            "beta": 0.04,
            "loss_type": "dapo",
        }
    )
    torch.manual_seed(0)
    trainer = trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=replayed_completion_reward,
        args=config,
        train_dataset=tiny_prompt_completion_dataset(args.batch_size * args.batches).select_columns(["prompt"]),
        processing_class=tokenizer,
        peft_config=bench.lora_config() if lora else None,
        rollout_func=ReplayedCompletions(tokenizer, args.completion_length, bank_size=32),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # as `train()` sets it
    return trainer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (built here), 'smollm2' (demo cache) or a model folder")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000, help="pad the tiny model's lm_head to this many rows")
    p.add_argument("--batch_size", type=int, default=8, help="completions per step")
    p.add_argument("--num_generations", type=int, default=4)
    p.add_argument("--completion_length", type=int, default=128)
    p.add_argument("--lora", action="store_true", help="LoRA (rank 8, every linear layer) instead of full FT")
    p.add_argument("--batches", type=int, default=4, help="distinct batches, each timed on every variant")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write every number to this file")
    args = p.parse_args(argv)

    torch = bench.setup(args.threads)
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    from hf_plugins import FusedGRPOTrainer

    if args.model == "tiny":
        model_dir, tokenizer, vocab = bench.tiny_model_folder(
            args.hidden, args.layers, 4, 2, 4 * args.hidden, args.vocab
        )
    else:
        from hf_plugins.demo.model import resolve_model

        model_dir = resolve_model(None if args.model == "smollm2" else args.model)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        vocab = len(tokenizer)
    variants = {"stock": GRPOTrainer, "fused": FusedGRPOTrainer}
    trainers = {name: build(cls, model_dir, tokenizer, args, args.lora) for name, cls in variants.items()}
    loader = iter(trainers["stock"].get_train_dataloader())
    batches = [next(loader) for _ in range(args.batches)]
    prepared = {name: [trainer._prepare_inputs(batch) for batch in batches] for name, trainer in trainers.items()}

    def step(name, index):
        trainer = trainers[name]
        seconds, _ = bench.timed(lambda: trainer.training_step(trainer.model, batches[index], None))
        trainer.model.zero_grad(set_to_none=True)
        return seconds

    def loss(name, index):
        trainer = trainers[name]
        seconds, _ = bench.timed(lambda: trainer.compute_loss(trainer.model, prepared[name][index]).backward())
        trainer.model.zero_grad(set_to_none=True)
        return seconds

    results = {}
    for part, run in (("step", step), ("loss", loss)):
        times = bench.interleaved(
            variants,
            run,
            args.rounds,
            batches=args.batches,
            warmup=True,
            after_round=lambda r, part=part: bench.log(f"  {part}: round {r + 1}/{args.rounds}"),
        )
        results[part] = {
            "stock_s": statistics.median(times["stock"]),
            "fused_s": statistics.median(times["fused"]),
            "fused_over_stock": bench.paired_ratio(times, "fused", "stock"),
            "times": times,
        }
    # the same loss on the same prepared batch (the head's float32 reductions differ)
    losses = {
        name: float(trainers[name].compute_loss(trainers[name].model, prepared[name][0]).detach()) for name in variants
    }

    mode = "LoRA r=8 (frozen lm_head)" if args.lora else "full fine-tuning"
    print(
        f"GRPO step, dapo beta=0.04, model={args.model} (V={vocab}), {mode}, {args.batch_size} completions of "
        f"{args.completion_length} tokens (replayed), {bench.device_label(args.threads)}, "
        f"torch {torch.__version__}; medians over {args.batches} batches x {args.rounds} rounds"
    )
    print(
        bench.table(
            ["part", "stock", "fused", "fused/stock (paired)"],
            [
                [part, f"{r['stock_s']:.3f} s", f"{r['fused_s']:.3f} s", f"{r['fused_over_stock']:.2f}x"]
                for part, r in results.items()
            ],
            align="lrrr",
        )
    )
    print(f"loss on batch 0: stock {losses['stock']:.6f}, fused {losses['fused']:.6f}")
    if args.json:
        bench.write_json(args.json, {"args": vars(args), "vocab": vocab, "results": results, "losses": losses})
    return 0


if __name__ == "__main__":
    sys.exit(main())
