"""UDS on FusedSFTTrainer, 4 steps of 1 of 4 candidates per process; run under torchrun by the DDP test.

usage: train_uds_ddp.py MODEL_DIR OUTPUT_DIR [CHECKPOINT]; saves a checkpoint every 2 steps, resumes from CHECKPOINT
if given. The model's attention dropout is on, so the scoring and training forwards both draw dropout masks. Each
process writes OUTPUT_DIR/selections_<rank>.json (the token ids of the examples it selected) and the
main process OUTPUT_DIR/losses.json.
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_plugins import FusedSFTTrainer, with_uds
from hf_plugins.testing import CPU_TRAINING_ARGS, tiny_conversational_dataset


model_dir, out = sys.argv[1:3]
checkpoint = sys.argv[3] if len(sys.argv) > 3 else None
cls = with_uds(FusedSFTTrainer)
args = cls.config_class(
    output_dir=out,
    **{**CPU_TRAINING_ARGS, "save_strategy": "steps"},
    save_steps=2,
    max_steps=4,
    per_device_train_batch_size=4,
    uds_keep=1,
    uds_alpha=1.0,
    learning_rate=5e-3,
    assistant_only_loss=True,
    disable_tqdm=True,
)
model = AutoModelForCausalLM.from_pretrained(model_dir, attention_dropout=0.1)
t = cls(
    model=model,
    args=args,
    train_dataset=tiny_conversational_dataset(64),
    processing_class=AutoTokenizer.from_pretrained(model_dir),
)
selections, subset = [], t._uds_subset


def record(batch, indices):
    chosen = subset(batch, indices)
    selections.append([ids[m.bool()].tolist() for ids, m in zip(chosen["input_ids"], chosen["attention_mask"])])
    return chosen


t._uds_subset = record
t.train(resume_from_checkpoint=checkpoint)
rank = t.accelerator.process_index
json.dump(
    {"selections": selections, "memory_count": t.uds_callback.memory.count},
    open(os.path.join(out, f"selections_{rank}.json"), "w"),
)
if t.accelerator.is_main_process:
    logs = [h for h in t.state.log_history if "loss" in h]
    json.dump(
        {
            "losses": [h["loss"] for h in logs],
            "fraction": [h["uds/selected_fraction"] for h in logs],
            "diversity": [h["uds/diversity"] for h in logs],
            "utility": [h["uds/utility"] for h in logs],
        },
        open(os.path.join(out, "losses.json"), "w"),
    )
    print("WORLD", t.accelerator.num_processes)
# Tear the process group down before exit: gloo's threads otherwise race the interpreter's shutdown (an occasional
# "terminate called without an active exception" abort)
t.accelerator.wait_for_everyone()
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
