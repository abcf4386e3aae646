#!/usr/bin/env python
"""GRPO's training loss on CPU: the fused head (`"grpo"`, chunked) against TRL 1.16's fused head plus TRL's loss math,
on identical inputs, and against the three-matmul floor.

Every variant does what a GRPO training micro-step does past the backbone: the per-token loss of the completion
tokens, its gradients for the hidden states and the lm_head weight, and the metrics TRL logs.

- `ours`: `fused_linear_loss(..., "grpo", backend="chunked", return_metrics=True)` and TRL's metrics from the
  `GRPOStatistics` it returns; the gradients are computed in the forward pass (three matmuls per tile);
- `trl`: `trl.kernels.ChunkedLogProbFunction` (what `GRPOTrainer` patches into the model: log-probs and entropies,
  the logits recomputed in backward, four matmuls per tile) and `GRPOTrainer._compute_loss` itself, run unbound on
  its output (TRL's loss and metric code, nothing re-written);
- `floor`: the head's three matmuls done bare on preallocated buffers.

The loss is TRL's default, dapo, off-policy (old log-probs: ratios on both sides of the clip range) with the KL to a
reference at beta 0.04, at the token and at the sequence level (GSPO's ratio; tiles then hold whole completions).
Time: process CPU time, the variants interleaved in rotating order and paired per round (`_harness.paired_ratio`).
Peak extra memory: peak RSS of one call in a fresh worker process per variant. See docs/benchmarks.md.

    python benchmarks/grpo_head.py                          # N=4096 completion tokens, V=32000, D=256, 1 thread
    python benchmarks/grpo_head.py -N 1024 -V 8000 --rounds 2  # a quick run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import _harness as bench


VARIANTS = ("ours", "trl", "floor")
#: TRL 1.16's vocabulary tile in GRPOTrainer's patched head (`trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE`)
TRL_CHUNK = 32768


def make_inputs(cfg: dict, with_floor: bool = False) -> dict:
    """hidden [B, T, D] and weight [V, D] (leaves), completion labels [B, T] with right padding, advantages [B],
    old and reference log-probs [B, T] near the current ones."""
    import torch

    rows, batch = cfg["rows"], cfg["batch"]
    base, gen = bench.head_inputs(rows, cfg["vocab"], cfg["hidden"], cfg["dtype"], cfg["seed"])
    length = rows // batch
    labels = base["labels"].view(batch, length).clone()
    for row in range(batch):  # completions of different lengths: the last quarter of some rows is padding
        if row % 2:
            labels[row, length - length // 4 :] = -100
    with torch.no_grad():
        logits = base["hidden"] @ base["weight"].t()
        lp = torch.log_softmax(logits.float(), -1).gather(-1, base["labels"].clamp(min=0).unsqueeze(-1))
        lp = lp.view(batch, length)
        del logits
    out = {
        "hidden": base["hidden"].detach().view(batch, length, -1).requires_grad_(),
        "weight": base["weight"],
        "labels": labels,
        "advantages": torch.randn(batch, generator=gen),
        "old": lp + 0.3 * torch.randn(batch, length, generator=gen),
        "ref": lp + 0.3 * torch.randn(batch, length, generator=gen),
    }
    if with_floor:
        dtype = bench.torch_dtype(cfg["dtype"])
        out["floor_G"] = torch.randn(rows, cfg["vocab"], generator=gen).mul_(1e-4).to(dtype)
        out["floor"] = bench.head_buffers(rows, cfg["vocab"], cfg["hidden"], dtype)
    return out


def options(level: str) -> dict:
    return {"loss_type": "dapo", "beta": 0.04, "importance_sampling_level": level}


class _Accelerator:
    """What `_compute_loss` uses of an accelerator, on one process."""

    num_processes = 1
    sync_gradients = True

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather

    def reduce(self, tensor, reduction="sum"):
        return tensor


def trl_loss(lp, entropies, inputs: dict, level: str):
    """`GRPOTrainer._compute_loss` run unbound on TRL's per-token log-probs and entropies (its model forward
    returns exactly those, zero outside the completion mask), with the attributes its `__init__` sets for dapo,
    beta 0.04 and the default epsilon, on one process; returns the loss (TRL logs its metrics on the way)."""
    from collections import defaultdict
    from types import SimpleNamespace

    import torch
    from trl import GRPOConfig, GRPOTrainer

    mask = inputs["labels"] != -100
    defaults = GRPOConfig.__dataclass_fields__
    args = SimpleNamespace(
        **{
            name: defaults[name].default
            for name in (
                "use_bias_correction_kl",
                "delta",
                "sapo_temperature_pos",
                "sapo_temperature_neg",
                "vespo_k_pos",
                "vespo_lambda_pos",
                "vespo_k_neg",
                "vespo_lambda_neg",
                "entropy_target",
            )
        },
        steps_per_generation=1,
    )
    trainer = SimpleNamespace(
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=0.04,
        loss_type="dapo",
        epsilon_low=0.2,
        epsilon_high=0.2,
        args=args,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=mask.shape[1],
        accelerator=_Accelerator(),
        _entropy_bonus_enabled=False,
        use_adaptive_entropy=False,
        entropy_coef=0.0,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, entropies, None),
    )
    batch = {
        "prompt_ids": torch.zeros(mask.shape[0], 0, dtype=torch.long),
        "prompt_mask": torch.zeros(mask.shape[0], 0, dtype=torch.long),
        "completion_ids": inputs["labels"].clamp(min=0),
        "completion_mask": mask.long(),
        "advantages": inputs["advantages"],
        "num_items_in_batch": mask.sum(),
        "old_per_token_logps": inputs["old"],
        "ref_per_token_logps": inputs["ref"],
    }
    return GRPOTrainer._compute_loss(trainer, None, batch)


def run_variant(variant: str, level: str, inputs: dict, cfg: dict) -> float:
    """One forward + backward (and TRL's metrics) of `variant`; returns the loss."""
    import torch

    h, w, y = inputs["hidden"], inputs["weight"], inputs["labels"]
    if variant == "floor":
        buffers = inputs["floor"]
        with torch.no_grad():
            bench.head_matmuls(
                h.view(-1, h.shape[-1]),
                w,
                inputs["floor_G"],
                buffers["logits"],
                buffers["grad_hidden"],
                buffers["grad_weight"],
            )
        return float("nan")
    h.grad = w.grad = None
    if variant == "ours":
        from hf_plugins.ops import fused_linear_loss

        loss, metrics = fused_linear_loss(
            h,
            w,
            y,
            "grpo",
            backend="chunked",
            return_metrics=True,
            advantages=inputs["advantages"],
            old_log_probs=inputs["old"],
            ref_log_probs=inputs["ref"],
            num_items_in_batch=(y != -100).sum(),
            **options(level),
        )
        metrics["grpo_statistics"].metrics()
    elif variant == "trl":
        from trl.kernels import ChunkedLogProbFunction

        mask = y != -100
        lp, entropy, *_ = ChunkedLogProbFunction.apply(
            h[mask], w, None, y[mask], 1.0, TRL_CHUNK, None, 1.0, ("log_probs", "entropy")
        )
        # as TRL's patched forward returns them: [B, T], zero outside the mask, still connected to the graph
        lp, entropy = (x.new_zeros(mask.shape).masked_scatter(mask, x) for x in (lp, entropy))
        loss = trl_loss(lp, entropy, inputs, level)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    loss.backward()
    return float(loss.detach())


def check(cfg: dict, level: str) -> dict:
    """Loss and gradient agreement of ours with TRL at the benchmark shape (one call each)."""
    inputs = make_inputs(cfg)
    results = {}
    for variant in ("ours", "trl"):
        loss = run_variant(variant, level, inputs, cfg)
        results[variant] = (loss, inputs["hidden"].grad.clone(), inputs["weight"].grad.clone())
    (ours, gh, gw), (trl, th, tw) = results["ours"], results["trl"]
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    return {"loss_ours": ours, "loss_trl": trl, "grad_hidden_rel_err": rel(gh, th), "grad_weight_rel_err": rel(gw, tw)}


# ---------------------------------------------------------------------------------------------------- workers
def worker(spec: dict) -> dict:
    """A fresh process: build the inputs, warm the code paths up on a small copy, then one measured call."""
    import torch

    torch.set_num_threads(spec["threads"])
    cfg, variant, level = spec["cfg"], spec["variant"], spec["level"]
    small = {**cfg, "rows": 64, "batch": 4, "vocab": 512}
    run_variant(variant, level, make_inputs(small, with_floor=variant == "floor"), small)
    inputs = make_inputs(cfg, with_floor=variant == "floor")
    with bench.PeakMemory("cpu", fresh=True) as memory:
        run_variant(variant, level, inputs, cfg)
    return {"peak_extra_mib": memory.extra_bytes / bench.MIB, "peak_reset": memory.peak_reset}


def peak_memory(cfg: dict, threads: int, variant: str, level: str) -> float:
    spec = {"cfg": cfg, "threads": threads, "variant": variant, "level": level}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return bench.run_worker([os.path.abspath(__file__), "--worker", json.dumps(spec)], f"{variant}/{level}", env=env)[
        "peak_extra_mib"
    ]


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-N", "--rows", type=int, default=4096, help="completion tokens (before padding)")
    p.add_argument("-V", "--vocab", type=int, default=32000)
    p.add_argument("-D", "--hidden", type=int, default=256)
    p.add_argument("-B", "--batch", type=int, default=16, help="completions (T = N / B tokens each)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--levels", nargs="+", default=["token", "sequence"], choices=["token", "sequence"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_memory", action="store_true")
    p.add_argument("--json", help="write every number to this file")
    p.add_argument("--markdown", help="write the result table to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        bench.report_result(worker(json.loads(args.worker)))
        return 0
    if args.rows % args.batch:
        p.error("--rows must be a multiple of --batch")
    cfg = {
        "rows": args.rows,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "batch": args.batch,
        "dtype": args.dtype,
        "seed": args.seed,
    }

    # memory first: the workers' peaks start at this process's, which has allocated nothing large yet
    memory = {}
    if not args.skip_memory:
        for level in args.levels:
            for variant in VARIANTS:
                bench.log(f"memory {variant}/{level}")
                memory[f"{variant}/{level}"] = peak_memory(cfg, args.threads, variant, level)

    torch = bench.setup(args.threads)
    inputs = make_inputs(cfg, with_floor=True)
    rows = []
    timings = {}
    checks = {}
    for level in args.levels:
        checks[level] = check(cfg, level)
        bench.log(f"{level}: ours vs TRL {checks[level]}")

        def run(variant, _, level=level):
            seconds, _ = bench.timed(lambda: run_variant(variant, level, inputs, cfg))
            return seconds

        for variant in VARIANTS:  # warm-up
            run_variant(variant, level, inputs, cfg)

        def progress(r, level=level):
            bench.log(f"  {level}: round {r + 1}/{args.rounds}")

        times = bench.interleaved(VARIANTS, run, args.rounds, after_round=progress)
        timings[level] = times
        median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
        rows.append(
            {
                "level": level,
                "ours_s": median["ours"],
                "trl_s": median["trl"],
                "floor_s": median["floor"],
                "ours_over_trl": bench.paired_ratio(times, "ours", "trl"),
                "ours_over_floor": bench.paired_ratio(times, "ours", "floor"),
                "trl_over_floor": bench.paired_ratio(times, "trl", "floor"),
                "ours_mib": memory.get(f"ours/{level}"),
                "trl_mib": memory.get(f"trl/{level}"),
                "floor_mib": memory.get(f"floor/{level}"),
            }
        )

    def fmt(value, spec=".3f", suffix=""):
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"

    header = (
        f"GRPO head, dapo beta=0.04 off-policy: N={args.rows} (B={args.batch}), V={args.vocab}, D={args.hidden}, "
        f"{args.dtype}, {bench.device_label(args.threads)}, torch {torch.__version__}; paired medians of "
        f"{args.rounds} rounds (process CPU time)"
    )
    text = (
        header
        + "\n\n"
        + bench.table(
            [
                "level",
                "ours",
                "TRL head + loss",
                "floor",
                "ours/TRL",
                "ours/floor",
                "TRL/floor",
                "ours MiB",
                "TRL MiB",
            ],
            [
                [
                    r["level"],
                    fmt(r["ours_s"], ".3f", " s"),
                    fmt(r["trl_s"], ".3f", " s"),
                    fmt(r["floor_s"], ".3f", " s"),
                    fmt(r["ours_over_trl"], ".2f", "x"),
                    fmt(r["ours_over_floor"], ".2f", "x"),
                    fmt(r["trl_over_floor"], ".2f", "x"),
                    fmt(r["ours_mib"], ".0f"),
                    fmt(r["trl_mib"], ".0f"),
                ]
                for r in rows
            ],
            align="lrrrrrrrr",
        )
    )
    print(text)
    bench.write_text(args.markdown, text + "\n")
    if args.json:
        bench.write_json(
            args.json,
            {
                "config": cfg,
                "threads": args.threads,
                "rows": rows,
                "checks": checks,
                "times": timings,
                "memory_mib": memory,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
