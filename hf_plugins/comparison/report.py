"""What `hf-plugins compare` writes: each run's record (from its trainer's `log_history`), `results.json`, the
Markdown table and the PNG plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .evaluation import LOG_PREFIX


#: The name of a finished run's record, in the run's folder: its presence is what makes the run finished
RECORD = "compare_run.json"


def write_json(path: Path, data) -> None:
    """Write `data` as JSON under a temporary name, then rename it into place: an interrupted write leaves no file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def run_record(method: str, log_history: list[dict], settings: dict, extra: dict | None = None) -> dict[str, Any]:
    """A run's record: its training loss per logged step, its held-out metrics per evaluation, its training time."""
    train = [
        {"step": entry["step"], "loss": entry["loss"]} for entry in log_history if "loss" in entry and "step" in entry
    ]
    evaluations = []
    for entry in log_history:
        if LOG_PREFIX + "step" in entry:
            metrics = {key[len(LOG_PREFIX) :]: value for key, value in entry.items() if key.startswith(LOG_PREFIX)}
            evaluations.append({"step": metrics.pop("step"), **metrics})
    runtime = next((entry["train_runtime"] for entry in reversed(log_history) if "train_runtime" in entry), None)
    evaluating = sum(entry.pop("seconds", 0.0) for entry in evaluations)
    return {
        "method": method,
        "settings": settings,
        "train_loss": train,
        "evaluations": evaluations,
        # `train_runtime` of the trainer (of the last session, for a resumed run) without the held-out evaluations
        "train_runtime_s": None if runtime is None else max(runtime - evaluating, 0.0),
        "evaluation_s": evaluating,
        "extra": extra or {},
    }


def _final(record: dict, key: str):
    evaluations = record["evaluations"]
    return evaluations[-1].get(key) if evaluations else None


def _start(record: dict, key: str):
    evaluations = record["evaluations"]
    return evaluations[0].get(key) if evaluations and evaluations[0]["step"] == 0 else None


def _number(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(results: dict) -> str:
    """One row per method: held-out loss at the start and at the end, token accuracy and drift at the end, the last
    training loss and the training time."""
    drift_on = results["drift_on"]
    header = [
        "method",
        "steps",
        "held-out loss (start)",
        "held-out loss",
        "token accuracy",
        f"drift (KL per token, {drift_on})",
        "last training loss",
        "training time (s)",
    ]
    if "general" in results["held_out"] and drift_on == "general":
        header.insert(6, "general held-out loss")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for method in results["methods"]:
        record = results["runs"][method]
        row = [
            f"`{method}`",
            str(record["evaluations"][-1]["step"]) if record["evaluations"] else "-",
            _number(_start(record, "eval_loss")),
            _number(_final(record, "eval_loss")),
            _number(_final(record, "eval_token_accuracy")),
            "-" if _final(record, f"{drift_on}_drift") is None else f"{_final(record, f'{drift_on}_drift'):.3g}",
            _number(record["train_loss"][-1]["loss"] if record["train_loss"] else None),
            _number(record["train_runtime_s"], 1),
        ]
        if len(header) > len(row):
            row.insert(6, _number(_final(record, "general_loss")))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


#: The plots: file name -> (the record's series, the y label)
PLOTS = {
    "train_loss.png": ("train", "training loss"),
    "eval_loss.png": ("eval_loss", "held-out loss (per token)"),
    "drift.png": ("drift", "drift: KL(start || model) per token"),
}


def matplotlib_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def write_plots(results: dict, output_dir: Path) -> list[str]:
    """The three PNG plots (training loss per step, held-out loss and drift per evaluation step), one line per
    method; returns their file names. Needs matplotlib (the `bench` extra)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    drift_key = f"{results['drift_on']}_drift"
    for name, (series, label) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for method in results["methods"]:
            record = results["runs"][method]
            if series == "train":
                points = [(entry["step"], entry["loss"]) for entry in record["train_loss"]]
            else:
                key = drift_key if series == "drift" else series
                points = [(entry["step"], entry[key]) for entry in record["evaluations"] if key in entry]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o" if series != "train" else None, ms=3, label=method)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(output_dir / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written
