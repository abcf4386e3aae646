"""TL-Training, stage 2: reinforcement learning with the tool-call error-category reward, on FusedGRPOTrainer.

The paper optimises its rule-based reward with PPO; here the same reward drives GRPO (see docs/methods/tl_training.md
for the differences). `FusedGRPOTrainer` is a drop-in for TRL's `GRPOTrainer` (the same arguments, losses and
metrics) whose policy loss runs on the fused head, without the `[tokens, vocab]` logits; swap it back for
`trl.GRPOTrainer` and the run is the same. `hf-plugins tl-grpo` (`TLGRPOTrainer`) does this rendering and brings the
reward itself. Each prompt is the conversation up to the first tool call, rendered with the row's own tools
(`hf_plugins.data.render_tool_prompt`); the dataset's `gold_call` and `tools` columns reach the reward function, which
logs how many completions fell in each category (`tool_call/<category>`). Offline, on a CPU, without vLLM. Start from
the SFT model: an instruct model that never writes a call gets -2 for every completion, and GRPO nothing to learn from
(docs/methods/tl_training.md).

    python examples/tl_training/sft.py --output-dir tl-sft
    python examples/tl_training/grpo.py --model tl-sft --output-dir tl-grpo
"""

import argparse

from transformers import AutoTokenizer

from hf_plugins import FusedGRPOConfig, FusedGRPOTrainer, tool_call_reward
from hf_plugins.data import render_tool_prompt
from hf_plugins.testing import tiny_tool_calling_dataset


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tl-sft", help="the TL-Training SFT model (examples/tl_training/sft.py)")
    parser.add_argument("--output-dir", default="tl-grpo")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=32)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    config = FusedGRPOConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=48,
        temperature=1.0,  # GRPO needs sampling (the paper's PPO rollouts are greedy)
        learning_rate=1e-3,
        beta=0.0,
        logging_steps=1,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        seed=0,
    )
    trainer = FusedGRPOTrainer(
        model=args.model,
        reward_funcs=[tool_call_reward],
        args=config,
        # Each prompt is rendered as text with its row's own tools (GRPOTrainer renders conversational prompts with
        # the trainer's `tools` argument, which it would also execute); `gold_call` and `tools` reach the reward
        train_dataset=tiny_tool_calling_dataset(args.rows, seed=1).map(
            render_tool_prompt, fn_kwargs={"tokenizer": tokenizer}, remove_columns=["messages"]
        ),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    last = [entry for entry in trainer.state.log_history if "reward" in entry][-1]
    counts = {key.split("/", 1)[1]: value for key, value in last.items() if key.startswith("tool_call/") and value}
    print(f"{type(trainer).__name__}, last step: mean reward {last['reward']:.3f}, completions per category {counts}")


if __name__ == "__main__":
    main()
