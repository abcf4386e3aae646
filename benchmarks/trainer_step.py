"""Whole training-step benchmark: every trainer of the library against stock `trl.SFTTrainer`, same model, data,
batch, seed and settings.

Each trainer trains in its own fresh subprocess, so that its peak memory (`ru_maxrss`) is its own, for `--steps`
optimizer steps (forward, backward, optimizer update, logging: `Trainer.train()` as a user runs it). The script
reports the median seconds per step after `--warmup` steps, the time ratio to its baseline (ours / stock: below 1 is
faster than stock) with the issue's target, and the peak resident memory. `--rounds` repeats the whole sequence of
subprocesses, so that a burst of load from other processes on a shared machine lands on every trainer alike; the
median over rounds is reported.

Baselines: stock `SFTTrainer` on the same conversations; for TL-Training, stock `SFTTrainer` on the same tool-calling
conversations (`stock-tools`); UDS keeps 1 of 4 of each batch and is compared with stock training on the whole batch.

    python benchmarks/trainer_step.py --model tiny                      # V=32000 tiny model, LoRA, every trainer
    python benchmarks/trainer_step.py --model tiny --full               # full fine-tuning
    python benchmarks/trainer_step.py --model smollm2 --trainers stock sft dft
    python benchmarks/trainer_step.py --model tiny --markdown table.md --json results.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass, field

import _harness as bench


@dataclass(frozen=True)
class Variant:
    """One trainer of the table: how to build it and what it is measured against."""

    trainer: str  # a name in `hf_plugins`, "SFTTrainer" (TRL's), or "with_uds"/"with_hft" of FusedSFTTrainer
    method_args: dict = field(default_factory=dict)
    data: str = "chat"  # "chat", "chat+score" (PoFT's `ref_score`), "tools" (tool-calling conversations)
    baseline: str | None = "stock"
    target: float | None = None  # the target, as a time ratio to the baseline (ours / stock)
    lora_target: float | None = None  # a different target under LoRA
    full_only: bool = False
    label: str = ""


VARIANTS = {
    "stock": Variant("SFTTrainer", baseline=None, label="stock SFTTrainer"),
    "sft": Variant("FusedSFTTrainer", {"loss_type": "nll"}, target=1.0, label="FusedSFT (nll)"),
    "dft": Variant("FusedSFTTrainer", {"loss_type": "dft"}, target=1.0, label="FusedSFT (dft)"),
    # ASFT's targets are >= 0.8x (full) and >= 0.75x (LoRA) of stock's throughput: 1.25x and 1.33x its step time
    "asft": Variant("ASFTTrainer", target=1.25, lora_target=1 / 0.75, label="ASFT"),
    "otr": Variant("OTRTrainer", {"num_samples": 8}, target=1.0, label="OTR (K=8)"),
    "otr-exact": Variant("OTRTrainer", {"num_samples": "exact"}, target=1.0, label="OTR (exact)"),
    "poft": Variant("PoFTTrainer", data="chat+score", target=1.0, label="PoFT"),
    "stock-tools": Variant("SFTTrainer", data="tools", baseline=None, label="stock SFTTrainer, tool calls"),
    "tl": Variant("TLTrainer", data="tools", baseline="stock-tools", target=1.0, label="TL-Training"),
    "uds": Variant("with_uds", {"uds_keep": "quarter"}, target=0.6, label="UDS (keep 1 of 4)"),
    "roste": Variant("RoSTETrainer", target=1.5, full_only=True, label="RoSTE (W4A4KV4)"),
    "mft": Variant("MFTTrainer", label="MFT"),
    "hft": Variant("with_hft", label="HFT (half frozen)"),
    "lfu": Variant("LfUTrainer", label="LfU"),
}


def build_trainer(name: str, args, model_dir: str):
    from transformers import AutoTokenizer

    import hf_plugins
    from hf_plugins.testing import TOOL_CHAT_TEMPLATE, tiny_conversational_dataset, tiny_tool_calling_dataset

    variant = VARIANTS[name]
    rows = args.batch_size * (args.steps + 1)
    config = {}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if variant.data == "tools":
        tokenizer.chat_template = TOOL_CHAT_TEMPLATE
        dataset = tiny_tool_calling_dataset(rows, seed=1)
        if "gold_call" in dataset.column_names:
            dataset = dataset.remove_columns("gold_call")
    else:
        if args.model == "tiny":
            dataset = merged_conversations(
                tiny_conversational_dataset(rows * args.conversations_per_row, seed=1), args
            )
        else:
            from hf_plugins.demo.data import load_chatterbot

            dataset = load_chatterbot()["train"].select(range(rows))
            # stock SFTTrainer needs a template with generation markers for `assistant_only_loss`; our trainers
            # switch to the shipped training version of the model's template themselves: give every trainer that one
            from hf_plugins.chat_templates import TEMPLATES_DIR, find_shipped_template

            shipped = find_shipped_template(tokenizer.chat_template)
            if shipped is not None:
                config["chat_template_path"] = str(TEMPLATES_DIR / shipped.file)
        if variant.data == "chat+score":
            dataset = dataset.add_column("ref_score", [-3.0 + 0.01 * i for i in range(len(dataset))])

    if variant.trainer == "SFTTrainer":
        from trl import SFTConfig, SFTTrainer

        trainer_cls, config_cls = SFTTrainer, SFTConfig
    elif variant.trainer == "with_uds":
        trainer_cls, config_cls = hf_plugins.with_uds(hf_plugins.FusedSFTTrainer), None
    elif variant.trainer == "with_hft":
        trainer_cls, config_cls = hf_plugins.with_hft(hf_plugins.FusedSFTTrainer), None
    else:
        trainer_cls, config_cls = getattr(hf_plugins, variant.trainer), None
    method_args = dict(variant.method_args)
    if method_args.get("uds_keep") == "quarter":
        method_args["uds_keep"] = max(1, args.batch_size // 4)
    if name == "mft" and not args.full:
        method_args["mask_token"] = "pad"  # a new `<mask>` row could not train under LoRA (MFTTrainer refuses it)
    config.update(method_args)
    return bench.make_trainer(
        trainer_cls,
        model_dir,
        dataset,
        tokenizer,
        config_cls=config_cls,
        peft_config=None if args.full else bench.lora_config(),
        seed=0,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        assistant_only_loss=True,
        **({"use_cpu": False, "bf16": True} if args.device == "cuda" else {}),
        **config,
    )


def merged_conversations(dataset, args):
    """`dataset` with every `--conversations_per_row` consecutive conversations joined into one (one system turn,
    then all their user and assistant turns): long rows for long `--max_length` from a set of short ones."""
    if args.conversations_per_row == 1:
        return dataset
    from datasets import Dataset

    rows, step, conversations = [], args.conversations_per_row, dataset["messages"]
    for start in range(0, len(conversations) - step + 1, step):
        group = conversations[start : start + step]
        turns = [m for conversation in group for m in conversation if m["role"] != "system"]
        rows.append([m for m in group[0] if m["role"] == "system"] + turns)
    return Dataset.from_dict({"messages": rows})


def step_profiler(step: int, top: int):
    """A `TrainerCallback` that runs torch.profiler over optimizer step `step` (1-based) and keeps the `top` ops by
    self CPU time in `ops` (a step after the warm-up: the time the table's median is made of)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        def __init__(self):
            self.ops, self.total_ms = [], 0.0

        def on_step_begin(self, _args, state, *_, **__):
            if state.global_step + 1 == step:
                self.profile = profile(activities=[ProfilerActivity.CPU])
                self.profile.__enter__()

        def on_step_end(self, _args, state, *_, **__):
            if state.global_step == step:
                self.profile.__exit__(None, None, None)
                events = [e for e in self.profile.key_averages() if e.self_cpu_time_total > 0]
                events.sort(key=lambda e: -e.self_cpu_time_total)
                self.ops = [
                    {"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3} for e in events[:top]
                ]
                self.total_ms = sum(e.self_cpu_time_total for e in events) / 1e3

    return StepProfiler()


def worker(args) -> dict:
    bench.setup(args.threads)
    trainer = build_trainer(args.worker, args, args.model_dir)
    on_gpu = args.device == "cuda"
    timer = bench.step_timer(sync_gpu=on_gpu)
    trainer.add_callback(timer)
    profiler = step_profiler(args.warmup + 1, args.profile) if args.profile else None
    if profiler is not None:
        trainer.add_callback(profiler)
    with bench.PeakMemory(args.device) as memory:
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    if profiler is not None:
        # the profiled step is slower than the others: leave it out of the median
        del timer.times[args.warmup]
    return {
        "profile": None if profiler is None else {"total_self_ms": profiler.total_ms, "top_ops": profiler.ops},
        "trainer": type(trainer).__name__,
        "seconds_per_step": statistics.median(timer.times[args.warmup :]),
        "step_seconds": timer.times,
        "peak_rss_mib": memory.peak_bytes / bench.MIB,  # on the GPU: peak allocated GPU memory
        "training_growth_mib": memory.extra_bytes / bench.MIB,
        "losses": losses,
        "vocab_size": trainer.model.get_output_embeddings().weight.shape[0],
    }


def model_folder(args) -> str:
    if args.model == "tiny":
        folder, _, _ = bench.tiny_model_folder(
            args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate or 4 * args.hidden, args.vocab
        )
        return folder
    from hf_plugins.demo.model import resolve_model

    return resolve_model(None if args.model == "smollm2" else args.model)


def target_for(variant: Variant, args) -> float | None:
    """The round's target of `variant` in this mode, as a time ratio to its baseline (None: no target)."""
    return variant.lora_target if (variant.lora_target and not args.full) else variant.target


def table(results: dict, args) -> str:
    rows = []
    for name, runs in results.items():
        variant = VARIANTS[name]
        seconds = statistics.median(run["seconds_per_step"] for run in runs)
        peak = max(run["peak_rss_mib"] for run in runs)
        ratio, target_text, verdict = "", "", ""
        if variant.baseline in results:
            base = statistics.median(run["seconds_per_step"] for run in results[variant.baseline])
            ratio = f"{seconds / base:.2f}x"
            target = target_for(variant, args)
            if target is not None:
                target_text, verdict = f"<= {target:.2f}", "met" if seconds / base <= target else "missed"
        rows.append([variant.label or name, f"{seconds:.3f}", ratio, target_text, verdict, f"{peak:.0f}"])
    memory = "peak GPU memory MiB" if args.device == "cuda" else "peak RSS MiB"
    header = ["trainer", "s/step", "time vs baseline", "target", "", memory]
    return bench.table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="'smollm2' (demo cache), 'tiny', or a local folder")
    parser.add_argument("--trainers", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--hidden", type=int, default=256, help="tiny model: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="tiny model: decoder layers")
    parser.add_argument("--heads", type=int, default=4, help="tiny model: attention heads")
    parser.add_argument("--kv_heads", type=int, default=2, help="tiny model: key/value heads")
    parser.add_argument("--intermediate", type=int, default=0, help="tiny model: MLP size (0: 4 x hidden)")
    parser.add_argument("--vocab", type=int, default=32000, help="tiny model: lm_head rows")
    parser.add_argument(
        "--preset",
        choices=("qwen2.5-0.5b",),
        help="tiny model at a real model's shapes, random weights: hidden 896, 24 layers, 14/2 heads, MLP 4864, "
        "V=151936",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: bf16 on the GPU")
    parser.add_argument(
        "--conversations_per_row", type=int, default=1, help="tiny data: join this many conversations per row"
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole sequence of trainers")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA r=8 on every linear")
    parser.add_argument(
        "--profile", type=int, default=0, help="profile the first step after the warm-up; print this many top ops"
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.preset == "qwen2.5-0.5b":
        args.model, args.hidden, args.layers, args.heads, args.kv_heads = "tiny", 896, 24, 14, 2
        args.intermediate, args.vocab = 4864, 151936

    if args.worker:
        bench.report_result(worker(args))
        return

    names = [name for name in args.trainers if args.full or not VARIANTS[name].full_only]
    if not names:
        sys.exit(f"--trainers {' '.join(args.trainers)}: these train every weight; add --full")
    for name in list(names):  # a trainer's baseline always runs with it
        baseline = VARIANTS[name].baseline
        if baseline and baseline not in names:
            names.insert(0, baseline)
    model_dir = model_folder(args)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    results = {name: [] for name in names}
    for round_index in range(args.rounds):
        for name in names:
            bench.log(f"round {round_index + 1}/{args.rounds}: {name}")
            argv = [__file__, *sys.argv[1:], "--worker", name, "--model_dir", model_dir]
            try:
                results[name].append(bench.run_worker(argv, f"{name} worker", env))
            except RuntimeError as error:
                sys.exit(str(error))

    vocab = results[names[0]][0]["vocab_size"]
    mode = "full fine-tuning" if args.full else "LoRA r=8 on every linear layer"
    mode += ", bf16 on the GPU" if args.device == "cuda" else ", float32 on the CPU"
    heading = (
        f"model={args.preset or args.model} (V={vocab}), {mode}, batch {args.batch_size} x <= {args.max_length} tokens, "
        f"{args.threads} thread(s), median of steps {args.warmup + 1}..{args.steps}, {args.rounds} round(s)"
    )
    text = heading + "\n\n" + table(results, args)
    print(text)
    if "sft" in results and "stock" in results:  # the fused head computes stock's loss: a like-for-like check
        stock, fused = results["stock"][0]["losses"], results["sft"][0]["losses"]
        diff = max(abs(a - b) for a, b in zip(stock, fused, strict=True))
        print(f"max |loss difference| stock vs FusedSFT over {len(fused)} steps: {diff:.2e}")
    if args.profile:
        for name, runs in results.items():
            profile = runs[0]["profile"]
            ops = ", ".join(f"{op['op'].removeprefix('aten::')} {op['self_ms']:.0f}" for op in profile["top_ops"])
            print(f"{name}: {profile['total_self_ms']:.0f} ms self CPU in the profiled step; top ops (ms): {ops}")
    bench.write_text(args.markdown, text + "\n")
    bench.write_json(args.json, {"args": vars(args), "heading": heading, "results": results})


if __name__ == "__main__":
    main()
