"""Train the tiny model with stock GRPOTrainer, then FusedGRPOTrainer, on replayed completions; run under torchrun
by tests/test_grpo_trainer.py with 2 completions per process (the test's 1-process run has 4).

usage: train_grpo_tiny.py MODEL_DIR OUTPUT_DIR CELL_JSON; writes OUTPUT_DIR/{stock,fused}_{logs.json,params.pt} on
the main process.
"""

import json
import sys
from pathlib import Path

import torch
from trl import GRPOTrainer


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_grpo_trainer import make_trainer, step_logs  # noqa: E402  (the test's own trainer setup)

from hf_plugins import FusedGRPOTrainer  # noqa: E402


model_dir, out, cell = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
for which, cls in (("stock", GRPOTrainer), ("fused", FusedGRPOTrainer)):
    trainer = make_trainer(cls, model_dir, out / which, **{**cell, "per_device_train_batch_size": 2})
    trainer.train()
    if trainer.accelerator.is_main_process:
        (out / f"{which}_logs.json").write_text(json.dumps(step_logs(trainer)))
        torch.save(trainer.parameter_steps[-1], out / f"{which}_params.pt")
        print("WORLD", trainer.accelerator.num_processes)
    trainer.accelerator.wait_for_everyone()
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
