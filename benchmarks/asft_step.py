"""Training-step benchmark: `ASFTTrainer` vs `FusedSFTTrainer(loss_type="dft")`, same model, data and seed.

ASFT is DFT plus a KL anchor to the frozen starting model, so its extra cost is one no-grad reference forward per step
plus the reference logits of each loss chunk. This script measures that overhead as a throughput ratio
(DFT seconds per step / ASFT seconds per step; the issue's target is >= 0.75).

Both trainers live in one process and train in interleaved rounds (DFT, ASFT, DFT, ASFT, ...), each round a fresh
`train()` of a few steps whose first step is a warm-up: a burst of load from other processes on a shared machine then
lands on both alike. The median step time over all rounds is reported.

    python benchmarks/asft_step.py                  # full FT (reference = frozen copy) and LoRA (adapters off)
    python benchmarks/asft_step.py --modes lora --rounds 5 --threads 2

The model is the tiny offline test architecture scaled up (default: hidden 256, 4 layers, MLP 688, the fixture's
384-token vocabulary; `--vocab 32000` pads the lm_head to a realistic size), built in code: no network needed.
"""

from __future__ import annotations

import argparse
import statistics

import _harness as bench


def time_mode(mode: str, model_dir: str, args) -> dict:
    from hf_plugins import ASFTTrainer, FusedSFTTrainer
    from hf_plugins.testing import tiny_conversational_dataset

    dataset = tiny_conversational_dataset(256)
    setups = {"dft": (FusedSFTTrainer, {"loss_type": "dft"}), "asft": (ASFTTrainer, {"kl_coef": 0.05})}
    trainers, timers = {}, {}
    for kind, (trainer_cls, method_args) in setups.items():
        trainers[kind] = bench.make_trainer(
            trainer_cls,
            model_dir,
            dataset,
            seed=0,
            peft_config=bench.lora_config() if mode == "lora" else None,
            max_steps=args.steps_per_round,
            per_device_train_batch_size=args.batch_size,
            max_length=args.max_length,
            assistant_only_loss=True,
            **method_args,
        )
        timers[kind] = bench.step_timer()
        trainers[kind].add_callback(timers[kind])

    def train_round(kind, _):
        start = len(timers[kind].times)
        trainers[kind].train()
        return timers[kind].times[start + 1 :]  # the first step of each round is a warm-up

    # rounds in a fixed order: DFT, ASFT, DFT, ASFT, ...
    rounds = bench.interleaved(trainers, train_round, args.rounds, rotate=False)
    per_round = {kind: [seconds for values in runs for seconds in values] for kind, runs in rounds.items()}
    asft = trainers["asft"]
    kl = [entry["kl"] for entry in asft.state.log_history if "kl" in entry]
    return {
        "mode": mode,
        "seconds_per_step": {kind: statistics.median(values) for kind, values in per_round.items()},
        "all_step_seconds": per_round,
        "reference": "adapters off (no copy)" if asft.ref_model is None else "frozen copy",
        "last_logged_kl": kl[-1] if kl else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=None, help="lm_head rows (default: the fixture tokenizer's 384)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps_per_round", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args()

    bench.setup(args.threads, quiet=False)
    model_dir, _, vocab = bench.tiny_model_folder(
        args.hidden, args.layers, args.heads, max(1, args.heads // 2), args.intermediate, args.vocab or 0
    )
    results = [time_mode(mode, model_dir, args) for mode in args.modes]

    print(
        f"model: hidden {args.hidden}, {args.layers} layers, MLP {args.intermediate}, V={vocab}; "
        f"batch {args.batch_size} "
        f"x <= {args.max_length} tokens; {args.threads} thread(s); median over {args.rounds} rounds x "
        f"{args.steps_per_round - 1} timed steps"
    )
    # The ratio of the fastest steps is shown too: on a shared machine it is the estimate least moved by other load
    print(
        f"{'mode':<6}{'reference':<24}{'DFT s/step':>12}{'ASFT s/step':>13}{'throughput ASFT/DFT':>21}"
        f"{'(fastest steps)':>17}"
    )
    for row in results:
        dft, asft = row["seconds_per_step"]["dft"], row["seconds_per_step"]["asft"]
        fastest = min(row["all_step_seconds"]["dft"]) / min(row["all_step_seconds"]["asft"])
        row["throughput_ratio"], row["fastest_step_ratio"] = dft / asft, fastest
        print(f"{row['mode']:<6}{row['reference']:<24}{dft:>12.4f}{asft:>13.4f}{dft / asft:>20.2f}x{fastest:>16.2f}x")
    bench.write_json(args.json, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
