"""FusedSFTTrainer under DDP (2 CPU processes, gloo), through torchrun: the same losses as stock SFTTrainer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


def _train(model_dir, out, which):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT), model_dir, str(out), which]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WORLD 2" in result.stdout, result.stdout[-2000:]
    return json.loads((out / "losses.json").read_text())


@pytest.mark.slow
def test_ddp_two_processes_matches_stock(tiny_model_dir, tmp_path):
    stock = _train(tiny_model_dir, tmp_path / "stock", "stock")
    fused = _train(tiny_model_dir, tmp_path / "fused", "fused")
    assert len(fused) == 3
    assert fused == pytest.approx(stock, abs=1e-5)
