"""Train the tiny model 3 steps with stock SFTTrainer or FusedSFTTrainer; run under torchrun by the DDP test.

usage: train_tiny.py MODEL_DIR OUTPUT_DIR {stock,fused}; writes OUTPUT_DIR/losses.json on the main process.
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from hf_plugins import FusedSFTConfig, FusedSFTTrainer
from hf_plugins.testing import CPU_TRAINING_ARGS, tiny_conversational_dataset


model_dir, out, which = sys.argv[1:4]
cls, cfg = (FusedSFTTrainer, FusedSFTConfig) if which == "fused" else (SFTTrainer, SFTConfig)
args = cfg(
    output_dir=out,
    max_steps=3,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    learning_rate=5e-3,
    assistant_only_loss=True,
    **CPU_TRAINING_ARGS,
)
t = cls(
    model=AutoModelForCausalLM.from_pretrained(model_dir),
    args=args,
    train_dataset=tiny_conversational_dataset(32),
    processing_class=AutoTokenizer.from_pretrained(model_dir),
)
t.train()
if t.accelerator.is_main_process:
    json.dump([h["loss"] for h in t.state.log_history if "loss" in h], open(os.path.join(out, "losses.json"), "w"))
    print("WORLD", t.accelerator.num_processes)
# Tear the process group down before exit: gloo's threads otherwise race the interpreter's shutdown (an occasional
# "terminate called without an active exception" abort)
t.accelerator.wait_for_everyone()
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
