"""TL-Training, stage 1: tool-use SFT with key-token weighting (PKT) and erroneous-call masking (MAE).

Runs offline on a CPU in seconds: a tiny randomly initialised model, a locally trained tokenizer with a tool-calling
ChatML template, and a small tool-calling dataset (six tools whose names share prefixes, some first calls answered
with an error). Swap in your own model and `messages` + `tools` dataset for real use.

    python examples/tl_training/sft.py --output-dir tl-sft
    python examples/tl_training/grpo.py --model tl-sft --output-dir tl-grpo
"""

import argparse
import tempfile

from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_plugins import TLConfig, TLTrainer
from hf_plugins.testing import CPU_TRAINING_ARGS, TOOL_CHAT_TEMPLATE, save_tiny_model, tiny_tool_calling_dataset


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="tl-sft", help="where the trained model and tokenizer are saved")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--rows", type=int, default=128, help="rows of the tiny tool-calling dataset")
    args = parser.parse_args()

    # A tiny model and tokenizer, built offline; the tokenizer gets the tool-calling template
    model_dir = save_tiny_model(tempfile.mkdtemp())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    dataset = tiny_tool_calling_dataset(args.rows)  # columns: messages, tools (JSON string), gold_call

    config = TLConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        max_weight=9.0,  # the paper's clip of the key-token weight
        weight_normalization="sample",  # per-sequence sum(w l) / sum(w), as the official code
        **CPU_TRAINING_ARGS,  # CPU settings: no bf16, no gradient checkpointing, no reporting
    )
    trainer = TLTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"loss: {losses[0]:.3f} -> {losses[-1]:.3f}; model saved to {args.output_dir}")


if __name__ == "__main__":
    main()
