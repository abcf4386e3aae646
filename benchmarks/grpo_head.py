#!/usr/bin/env python
"""GRPO's training loss past the backbone, on CPU or a CUDA GPU: the fused head (`"grpo"`) against TRL 1.16's fused
head plus TRL's loss math and against Liger-Kernel's GRPO loss, on identical inputs, beside the three-matmul floor.

Every variant does what a GRPO training micro-step does past the backbone: the per-token loss of the completion
tokens, its gradients for the hidden states and the lm_head weight, and the metrics it logs.

- `ours`: `fused_linear_loss(..., "grpo", backend=..., return_metrics=True)` (`chunked` on CPU, `triton` on CUDA by
  default) and TRL's metrics from the `GRPOStatistics` it returns; the gradients are computed in the forward pass
  (three matmuls per tile; four at the sequence level when a completion is longer than `SEQUENCE_TILE_BUDGET / V`
  rows, which then takes a first no-grad pass: the output says which);
- `trl`: `trl.kernels.ChunkedLogProbFunction` (what `GRPOTrainer` patches into the model: log-probs and entropies,
  the logits recomputed in backward, four matmuls per tile; Triton kernels on CUDA, a torch fallback on CPU) and
  `GRPOTrainer._compute_loss` itself, run unbound on its output (TRL's loss and metric code, nothing re-written);
- `liger`: Liger-Kernel's `liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss` (torch code, its loss math
  `torch.compile`d unless `--no-liger_compiled`; one sequence per chunk, its default): log-probs by
  `_ChunkedSelectiveLogProbFunction` (forward, then recomputed for the float32 gradient matmuls: four per tile) under
  `torch.autograd.grad` inside the forward, so its backward only hands the stored gradients out. It is configured
  for the same loss, with `use_bias_correction_kl=True` set explicitly (TRL's default; Liger's own default is False,
  a different KL term). It computes no entropy and logs the KL and one clip ratio only (TRL logs the entropy and
  five clip ratios), so it does a little less work than the other two. Both levels are expressible in Liger (it
  refuses the sequence level only for cispo, sapo and vespo); it computes its log-probs in float32 whatever the
  input dtype, so in float64 it agrees with the others to float32 precision only;
- `floor`: the head's three matmuls done bare on preallocated buffers.

The loss is TRL's default, dapo, off-policy (old log-probs: ratios on both sides of the clip range) with the KL to a
reference at beta 0.04 (`epsilon` 0.2, bias-corrected KL: TRL's defaults), at the token and at the sequence level
(GSPO's ratio; tiles then hold whole completions). Before timing, one call of each variant checks that TRL's and
Liger's loss and gradients agree with ours at the benchmark shape (relative max error, reported).

Time: the variants interleaved in rotating order and paired per round (`_harness.interleaved`, `paired_ratio`); on
CPU process CPU time, on CUDA CUDA events around each call (`_harness.cuda_times`). Peak extra memory: on CPU the
peak RSS growth of one call in a fresh worker process per variant; on CUDA `torch.cuda.max_memory_allocated` above
what was allocated before the call (`_harness.PeakMemory("cuda")`), gradients included. A variant that fails (a
package missing, out of memory) is reported with its error and the run goes on (exit code 1); with `--json` /
`--markdown` the results are written after each level, so a run cut short keeps the levels it finished. See
docs/benchmarks.md.

    python benchmarks/grpo_head.py                             # CPU: N=4096 completion tokens, V=32000, D=256
    python benchmarks/grpo_head.py -N 1024 -V 8000 --rounds 2  # a quick run
    python benchmarks/grpo_head.py --device cuda               # N=16384, V=151936, D=4096, bfloat16, ours on triton
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import sys
import traceback

import _harness as bench


VARIANTS = ("ours", "trl", "liger", "floor")
#: What each variant is called in the output
TITLES = {"ours": "ours", "trl": "TRL head + loss", "liger": "Liger GRPO loss", "floor": "floor"}
#: The defaults of each device: the issue's shapes, and the dtype and backend a user of that device trains with
DEVICE_DEFAULTS = {
    "cpu": {"rows": 4096, "vocab": 32000, "hidden": 256, "dtype": "float32", "backend": "chunked"},
    "cuda": {"rows": 16384, "vocab": 151936, "hidden": 4096, "dtype": "bfloat16", "backend": "triton"},
}
#: The loss every variant computes, in GRPOConfig's names: dapo, beta 0.04, and TRL's defaults otherwise
LOSS = {"loss_type": "dapo", "beta": 0.04, "epsilon": 0.2, "use_bias_correction_kl": True}
#: TRL 1.16's vocabulary tile in GRPOTrainer's patched head (`trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE`)
TRL_CHUNK = 32768
#: Rows per matmul when the old and reference log-probs are drawn (no [N, V] logits at once)
SETUP_ROWS = 2048


def make_inputs(cfg: dict, with_floor: bool = False) -> dict:
    """hidden [B, T, D] and weight [V, D] (leaves), completion labels [B, T] with right padding, advantages [B],
    old and reference log-probs [B, T] near the current ones, on `cfg["device"]`."""
    import torch

    rows, batch, device = cfg["rows"], cfg["batch"], cfg["device"]
    base, gen = bench.head_inputs(rows, cfg["vocab"], cfg["hidden"], cfg["dtype"], cfg["seed"], device=device)
    length = rows // batch
    labels = base["labels"].view(batch, length).clone()
    for row in range(batch):  # completions of different lengths: the last quarter of some rows is padding
        if row % 2:
            labels[row, length - length // 4 :] = -100
    with torch.no_grad():
        lp = torch.cat(
            [
                torch.log_softmax((h @ base["weight"].t()).float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
                for h, y in zip(base["hidden"].split(SETUP_ROWS), base["labels"].split(SETUP_ROWS))
            ]
        ).view(batch, length)
    noise = lambda: 0.3 * torch.randn(batch, length, generator=gen, device=device)  # noqa: E731
    out = {
        "hidden": base["hidden"].detach().view(batch, length, -1).requires_grad_(),
        "weight": base["weight"],
        "labels": labels,
        "advantages": torch.randn(batch, generator=gen, device=device),
        "old": lp + noise(),
        "ref": lp + noise(),
    }
    if with_floor:
        dtype = bench.torch_dtype(cfg["dtype"])
        out["floor_G"] = torch.randn(rows, cfg["vocab"], generator=gen, device=device, dtype=dtype).mul_(1e-4)
        out["floor"] = bench.head_buffers(rows, cfg["vocab"], cfg["hidden"], dtype, device=device)
    return out


def ours_matmuls(cfg: dict, level: str) -> int:
    """Head matmuls per tile of `ours` at this shape: a sequence-level tile holds whole completions while one fits
    the library's budget, else a first no-grad pass gives every log-prob (`GRPOMethod`)."""
    from hf_plugins.losses.grpo import SEQUENCE_TILE_BUDGET

    longest = cfg["rows"] // cfg["batch"]  # the unpadded completions are full length
    return 3 if level == "token" or longest * cfg["vocab"] <= SEQUENCE_TILE_BUDGET else 4


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
    returns exactly those, zero outside the completion mask), with the attributes its `__init__` sets for `LOSS`,
    on one process; returns the loss (TRL logs its metrics on the way)."""
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
        use_bias_correction_kl=LOSS["use_bias_correction_kl"],
        steps_per_generation=1,
    )
    trainer = SimpleNamespace(
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=LOSS["beta"],
        loss_type=LOSS["loss_type"],
        epsilon_low=LOSS["epsilon"],
        epsilon_high=LOSS["epsilon"],
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
    no_prompt = torch.zeros(mask.shape[0], 0, dtype=torch.long, device=mask.device)
    batch = {
        "prompt_ids": no_prompt,
        "prompt_mask": no_prompt,
        "completion_ids": inputs["labels"].clamp(min=0),
        "completion_mask": mask.long(),
        "advantages": inputs["advantages"],
        "num_items_in_batch": mask.sum(),
        "old_per_token_logps": inputs["old"],
        "ref_per_token_logps": inputs["ref"],
    }
    return GRPOTrainer._compute_loss(trainer, None, batch)


def liger_loss(inputs: dict, level: str, cfg: dict):
    """Liger's `LigerFusedLinearGRPOLoss` configured for `LOSS` (gradients computed inside its forward); returns the
    loss after reading the metrics it returns (the KL and the clip ratio), as a trainer logging them would."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(
        beta=LOSS["beta"],
        compiled=cfg["liger_compiled"],
        use_ref_model=True,
        chunk_size=cfg["liger_chunk_size"],
        epsilon_low=LOSS["epsilon"],
        epsilon_high=LOSS["epsilon"],
        loss_type=LOSS["loss_type"],
        importance_sampling_level=level,
        use_bias_correction_kl=LOSS["use_bias_correction_kl"],
    )
    y = inputs["labels"]
    mask = y != -100
    loss, metrics = loss_fn(
        inputs["hidden"],
        inputs["weight"],
        y.clamp(min=0),
        mask.long(),
        inputs["advantages"],
        ref_per_token_logps=inputs["ref"],
        old_per_token_logps=inputs["old"],
        num_items_in_batch=mask.sum(),
    )
    for metric in metrics:
        float(metric)
    return loss


def clear_grads(inputs: dict) -> None:
    inputs["hidden"].grad = inputs["weight"].grad = None


def run_variant(variant: str, level: str, inputs: dict, cfg: dict) -> float:
    """One forward + backward (and the metrics) of `variant`; returns the loss (NaN for the floor)."""
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
    clear_grads(inputs)
    if variant == "ours":
        from hf_plugins.ops import fused_linear_loss

        loss, metrics = fused_linear_loss(
            h,
            w,
            y,
            "grpo",
            backend=cfg["backend"],
            return_metrics=True,
            advantages=inputs["advantages"],
            old_log_probs=inputs["old"],
            ref_log_probs=inputs["ref"],
            num_items_in_batch=(y != -100).sum(),
            importance_sampling_level=level,
            **LOSS,
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
    elif variant == "liger":
        loss = liger_loss(inputs, level, cfg)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    loss.backward()
    return float(loss.detach())


def relative_error(value, reference) -> float:
    """max |value - reference| / max |reference|, computed in float32 (float64 for float64 tensors)."""
    import torch

    dtype = torch.float64 if reference.dtype == torch.float64 else torch.float32
    value, reference = value.detach().to(dtype), reference.detach().to(dtype)
    return float((value - reference).abs().max() / reference.abs().max())


def error_text(error: BaseException) -> str:
    """The error's type and the first line of its message."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0][:300] if message else ''}"


def check(variants, level: str, inputs: dict, cfg: dict, errors: dict) -> tuple[list, dict]:
    """One call of each variant (which also warms it up; one that fails is reported in `errors` and left out):
    `(the variants that ran, their losses and each one's loss and gradient agreement with ours at the benchmark
    shape, as relative max errors)`."""
    results = {}
    for variant in variants:
        if variant == "floor":
            continue
        try:
            loss = run_variant(variant, level, inputs, cfg)
            results[variant] = (loss, inputs["hidden"].grad.clone(), inputs["weight"].grad.clone())
        except Exception as error:  # noqa: BLE001 - reported, and the other variants still run
            errors[f"{variant}/{level}"] = error_text(error)
            bench.log(f"{variant}/{level} failed:")
            traceback.print_exc(file=sys.stderr)
        clear_grads(inputs)
    out = {f"loss_{variant}": loss for variant, (loss, _, _) in results.items()}
    if "ours" in results:
        loss, gh, gw = results["ours"]
        for variant, (other, oh, ow) in results.items():
            if variant != "ours":
                out[f"{variant}_loss_rel_err"] = abs(other - loss) / abs(loss)
                out[f"{variant}_grad_hidden_rel_err"] = relative_error(oh, gh)
                out[f"{variant}_grad_weight_rel_err"] = relative_error(ow, gw)
    results.clear()
    if "floor" in variants:
        run_variant("floor", level, inputs, cfg)  # its warm-up
    return [v for v in variants if v == "floor" or f"{v}/{level}" not in errors], out


def time_call(device: str, fn) -> float:
    """Seconds of one call of `fn`: CUDA events around it on CUDA, the process's CPU time on CPU."""
    if device == "cuda":
        return bench.cuda_times(fn, 1)[0][0]
    return bench.timed(fn)[0]


def cuda_peak_mib(variant: str, level: str, inputs: dict, cfg: dict) -> float:
    """Peak CUDA memory of one call above what was allocated before it (the inputs; the gradients count)."""
    clear_grads(inputs)
    gc.collect()
    with bench.PeakMemory("cuda") as memory:
        run_variant(variant, level, inputs, cfg)
    clear_grads(inputs)
    return memory.extra_bytes / bench.MIB


# ---------------------------------------------------------------------------------------------------- workers
def worker(spec: dict) -> dict:
    """A fresh process (CPU): build the inputs, warm the code paths up on two small copies (the second with other
    completion lengths, so that Liger's compiled loss is already shape-generic and the measured call compiles
    nothing), then one measured call."""
    import torch

    torch.set_num_threads(spec["threads"])
    cfg, variant, level = spec["cfg"], spec["variant"], spec["level"]
    for length in (4, 8):
        small = {**cfg, "rows": cfg["batch"] * length, "vocab": 512}
        run_variant(variant, level, make_inputs(small, with_floor=variant == "floor"), small)
    inputs = make_inputs(cfg, with_floor=variant == "floor")
    with bench.PeakMemory("cpu", fresh=True) as memory:
        run_variant(variant, level, inputs, cfg)
    return {"peak_extra_mib": memory.extra_bytes / bench.MIB, "peak_reset": memory.peak_reset}


def cpu_peak_mib(cfg: dict, threads: int, variant: str, level: str) -> float:
    spec = {"cfg": cfg, "threads": threads, "variant": variant, "level": level}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return bench.run_worker([os.path.abspath(__file__), "--worker", json.dumps(spec)], f"{variant}/{level}", env=env)[
        "peak_extra_mib"
    ]


# ------------------------------------------------------------------------------------------------------ output
def fmt(value, spec=".3f", suffix="") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


def render(res: dict) -> str:
    cfg, machine = res["config"], res["machine"]
    cuda = cfg["device"] == "cuda"
    seconds = (
        (lambda s: fmt(None if s is None else s * 1e3, ".1f", " ms")) if cuda else (lambda s: fmt(s, ".3f", " s"))
    )
    ratio = lambda r: fmt(r, ".2f", "x")  # noqa: E731
    liger = "Liger compiled" if cfg["liger_compiled"] else "Liger not compiled"
    header = (
        f"GRPO head, dapo beta={LOSS['beta']} off-policy: N={cfg['rows']} (B={cfg['batch']}), V={cfg['vocab']}, "
        f"D={cfg['hidden']}, {cfg['dtype']}, ours on {cfg['backend']}; {machine['device']}; torch {machine['torch']}, "
        f"trl {machine['trl']}, liger-kernel {machine['liger_kernel']} ({liger}, {cfg['liger_chunk_size']} "
        f"sequence(s) per chunk); paired medians of {res['rounds']} rounds "
        f"({'CUDA events' if cuda else 'process CPU time'})"
    )
    table = bench.table(
        [
            "level",
            "ours",
            TITLES["trl"],
            TITLES["liger"],
            "floor",
            "ours/TRL",
            "ours/Liger",
            "ours/floor",
            "TRL/floor",
            "Liger/floor",
            "ours MiB",
            "TRL MiB",
            "Liger MiB",
        ],
        [
            [
                row["level"],
                *(seconds(row.get(f"{v}_s")) for v in VARIANTS),
                *(ratio(row.get(key)) for key in ("ours_over_trl", "ours_over_liger", "ours_over_floor")),
                *(ratio(row.get(key)) for key in ("trl_over_floor", "liger_over_floor")),
                *(fmt(row.get(f"{v}_mib"), ".0f") for v in ("ours", "trl", "liger")),
            ]
            for row in res["rows"]
        ],
        align="lrrrrrrrrrrrr",
    )
    lines = [header, "", table, ""]
    for level in res["levels"]:
        lines.append(f"- {level}: ours makes {res['ours_matmuls'][level]} head matmuls per tile.")
        check = res["checks"].get(level, {})
        for variant in ("trl", "liger"):
            if f"{variant}_loss_rel_err" in check:
                errors = ", ".join(
                    f"{part} {check[f'{variant}_{key}_rel_err']:.1e}"
                    for part, key in (("loss", "loss"), ("grad hidden", "grad_hidden"), ("grad weight", "grad_weight"))
                )
                lines.append(
                    f"- {level}: {TITLES[variant]} against ours (relative max error): {errors} "
                    f"(loss {check[f'loss_{variant}']:.7g}, ours {check['loss_ours']:.7g})."
                )
    lines.append(
        "- Liger: LigerFusedLinearGRPOLoss(loss_type='dapo', beta=0.04, epsilon_low=epsilon_high=0.2, "
        "use_bias_correction_kl=True: TRL's default, Liger's own is False); no entropy, two metrics."
    )
    for name, error in res["errors"].items():
        lines.append(f"- {name} failed: {error}")
    return "\n".join(lines) + "\n"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=sorted(DEVICE_DEFAULTS), default="cpu")
    p.add_argument("-N", "--rows", type=int, help="completion tokens, padding included (cpu 4096, cuda 16384)")
    p.add_argument("-V", "--vocab", type=int, help="vocabulary (cpu 32000, cuda 151936)")
    p.add_argument("-D", "--hidden", type=int, help="hidden size (cpu 256, cuda 4096)")
    p.add_argument("-B", "--batch", type=int, default=16, help="completions (T = N / B tokens each)")
    p.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], help="cpu float32, cuda bfloat16")
    p.add_argument("--backend", choices=["chunked", "triton"], help="ours' backend (cpu chunked, cuda triton)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--levels", nargs="+", default=["token", "sequence"], choices=["token", "sequence"])
    p.add_argument(
        "--liger_compiled",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile Liger's loss math (Liger's default)",
    )
    p.add_argument("--liger_chunk_size", type=int, default=1, help="sequences per Liger chunk (Liger's default 1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_memory", action="store_true")
    p.add_argument("--json", help="write every number to this file")
    p.add_argument("--markdown", help="write the result table to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args, None
    for name, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("rows", "vocab", "hidden", "batch", "threads", "rounds", "liger_chunk_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.rows % args.batch:
        p.error("--rows must be a multiple of --batch")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda needs a CUDA device (torch.cuda.is_available() is False); run on CPU without it")
    elif args.backend == "triton" and "ours" in args.variants:
        import torch

        from hf_plugins.utils import triton_usable

        if not triton_usable(torch.device("cpu")):
            p.error("--backend triton on CPU runs only under the Triton interpreter: set TRITON_INTERPRET=1")
    cfg = {
        "rows": args.rows,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "batch": args.batch,
        "dtype": args.dtype,
        "seed": args.seed,
        "device": args.device,
        "backend": args.backend,
        "liger_compiled": args.liger_compiled,
        "liger_chunk_size": args.liger_chunk_size,
    }
    return args, cfg


def run(args, cfg: dict) -> dict:
    """Every level: agreement check (doubling as warm-up), interleaved timed rounds, peak memory; the results are
    written after each level."""
    import statistics

    device, variants = cfg["device"], list(args.variants)
    res = {
        "config": cfg,
        "threads": args.threads,
        "rounds": args.rounds,
        "levels": [],
        "rows": [],
        "checks": {},
        "times": {},
        "memory_mib": {},
        "errors": {},
    }

    # on CPU memory first: a worker's peak starts at this process's, which has allocated nothing large yet
    if device == "cpu" and not args.skip_memory:
        for level in args.levels:
            for variant in variants:
                bench.log(f"memory {variant}/{level}")
                try:
                    res["memory_mib"][f"{variant}/{level}"] = cpu_peak_mib(cfg, args.threads, variant, level)
                except RuntimeError as error:
                    res["errors"][f"{variant}/{level} memory"] = str(error).strip().splitlines()[-1][:300]

    torch = bench.setup(args.threads)
    res["ours_matmuls"] = {level: ours_matmuls(cfg, level) for level in args.levels}
    res["machine"] = {
        "device": bench.device_label(args.threads),
        "torch": torch.__version__,
        "trl": version("trl"),
        "liger_kernel": version("liger-kernel"),
    }
    if device == "cuda":
        res["machine"]["cuda"] = torch.version.cuda
        res["machine"]["triton"] = version("triton")
    inputs = make_inputs(cfg, with_floor="floor" in variants)
    for level in args.levels:
        active, res["checks"][level] = check(variants, level, inputs, cfg, res["errors"])
        bench.log(f"{level}: agreement with ours {res['checks'][level]}")

        def once(variant, _, level=level):
            return time_call(device, lambda: run_variant(variant, level, inputs, cfg))

        def progress(r, level=level):
            bench.log(f"  {level}: round {r + 1}/{args.rounds}")

        times = bench.interleaved(active, once, args.rounds, after_round=progress) if active else {}
        clear_grads(inputs)
        if device == "cuda" and not args.skip_memory:
            for variant in active:
                try:
                    res["memory_mib"][f"{variant}/{level}"] = cuda_peak_mib(variant, level, inputs, cfg)
                except Exception as error:  # noqa: BLE001 - e.g. out of memory: reported
                    res["errors"][f"{variant}/{level} memory"] = error_text(error)
                    clear_grads(inputs)
                torch.cuda.empty_cache()
        row = {"level": level}
        for variant in VARIANTS:
            row[f"{variant}_s"] = statistics.median(times[variant]) if variant in times else None
            row[f"{variant}_mib"] = res["memory_mib"].get(f"{variant}/{level}")
        for numerator, denominator in (
            ("ours", "trl"),
            ("ours", "liger"),
            ("ours", "floor"),
            ("trl", "floor"),
            ("liger", "floor"),
        ):
            paired = numerator in times and denominator in times
            row[f"{numerator}_over_{denominator}"] = (
                bench.paired_ratio(times, numerator, denominator) if paired else None
            )
        res["levels"].append(level)
        res["rows"].append(row)
        res["times"][level] = times
        bench.write_json(args.json, res)
        bench.write_text(args.markdown, render(res))
    return res


def main(argv=None) -> int:
    args, cfg = parse_args(argv)
    if args.worker:
        bench.report_result(worker(json.loads(args.worker)))
        return 0
    res = run(args, cfg)
    print(render(res), end="")
    return 1 if res["errors"] else 0  # a variant that did not run fails the check that asked for it


if __name__ == "__main__":
    sys.exit(main())
