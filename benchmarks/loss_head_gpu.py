#!/usr/bin/env python
"""GPU benchmark of the fused linear loss head: every method on every backend, against the matmul floor.

For each method of `hf_plugins.losses.METHODS` it times forward + backward (gradients for `hidden` and `weight`) and
measures the peak CUDA memory of

- `reference`: `fused_linear_loss(..., backend="reference")`, the `[N, V]` logits materialised;
- `chunked`: our pure-torch backend at its default tile;
- `triton`: our Triton kernel between cuBLAS matmuls, at its default tile;
- `liger`: Liger-Kernel's fused linear cross-entropy (sft, dft via token scaling, weighted via reduction="none");
- `trl`: TRL's `trl.kernels.ChunkedLogProbFunction` with the loss TRL's SFTTrainer builds from its log-probs (sft and
  dft; outputs log-probs, entropy and top-1 as SFTTrainer asks),

beside the floor: the three matmuls of the head on preallocated buffers (`z = h @ W.T`, `grad_h = G @ W`,
`grad_W = G.T @ h`), measured in the same run. Memory is the peak of `torch.cuda.max_memory_allocated()` above what
was allocated before the call (the inputs), so it includes the two gradients every variant must produce.

Every variant runs in a `try`: one that fails (out of memory, a library missing on the machine) is reported with its
error and the run goes on. Results go to `--json` and, as a markdown table, to `--markdown`.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
import traceback

import _harness as bench
import torch


GIB = bench.GIB
TRL_METHODS = ("sft", "dft")
LIGER_METHODS = ("sft", "dft", "weighted")
#: Matmuls a method adds to the three of the head (ASFT: the reference logits; PoFT: its no-grad scoring pass).
EXTRA_MATMULS = {"asft": 1, "poft": 1}
#: Sequences the rows are split into for per-sequence methods.
SEQUENCES = 8


log = bench.log


def make_inputs(n, v, d, dtype, seed=0):
    scale = 2.0 / math.sqrt(d)  # logits of std ~2: a non-trivial softmax
    inputs, g = bench.head_inputs(n, v, d, dtype, seed, scale=scale, device="cuda")
    hidden, weight = inputs["hidden"], inputs["weight"]
    return {
        **inputs,
        "token_weights": 2 * torch.rand(n, device="cuda", generator=g),
        "ref_hidden": (hidden.detach() + 0.1 * torch.randn(n, d, device="cuda", generator=g).to(dtype)),
        "ref_weight": (weight.detach() + 0.1 * scale * torch.randn(v, d, device="cuda", generator=g).to(dtype)),
    }


def method_kwargs(method, inputs):
    if method == "weighted":
        return {"token_weights": inputs["token_weights"]}
    if method == "asft":
        return {"ref_hidden": inputs["ref_hidden"], "ref_weight": inputs["ref_weight"], "kl_coef": 0.05}
    if method == "otr":
        return {"num_samples": 8, "temperature": 1.2, "negative_reward": -0.1}
    if method == "poft":
        return {"ref_scores": torch.full((SEQUENCES,), -2.0, device="cuda"), "beta": 1.0}
    if method == "grpo":  # TRL's default loss (dapo), off-policy, with the KL to a reference (beta 0.04)
        g = torch.Generator(device="cuda").manual_seed(1)
        shape = (SEQUENCES, inputs["labels"].numel() // SEQUENCES)
        log_probs = lambda: 0.3 * torch.randn(shape, device="cuda", generator=g) - 10.0  # noqa: E731
        return {
            "advantages": torch.randn(SEQUENCES, device="cuda", generator=g),
            "old_log_probs": log_probs(),
            "ref_log_probs": log_probs(),
            "beta": 0.04,
        }
    return {}


def loss_fn(variant, method, inputs, chunk_size=None):
    """A closure computing the loss of `variant` (forward only; the caller runs backward)."""
    from hf_plugins.ops import fused_linear_loss

    h, w, y = inputs["hidden"], inputs["weight"], inputs["labels"]
    if variant in ("reference", "chunked", "triton", "liger"):
        kwargs = method_kwargs(method, inputs)

        # per-sequence methods see [B, T] rows (PoFT's score is a mean over each sequence)
        hh, yy = (h.view(SEQUENCES, -1, h.shape[-1]), y.view(SEQUENCES, -1)) if method in ("poft", "grpo") else (h, y)

        def run():
            torch.manual_seed(0)  # OTR's uniforms: the same draw on every backend
            return fused_linear_loss(hh, w, yy, method, backend=variant, chunk_size=chunk_size, **kwargs)

        return run
    if variant == "trl":
        from trl.kernels import ChunkedLogProbFunction

        def run():
            logp = ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 32768, None, 1.0, ("entropy", "is_top1"))[0]
            if method == "sft":  # SFTTrainer, loss_type="nll"
                return -logp.sum() / logp.numel()
            return -(logp.detach().exp() * logp).sum() / logp.numel()  # loss_type="dft"

        return run
    raise ValueError(variant)


def clear(leaves):
    for leaf in leaves:
        leaf.grad = None


def forward_backward(fn):
    loss = fn()
    loss.backward()
    return loss


def measure(fn, leaves, reps):
    """(median seconds of forward+backward, peak bytes above the inputs, loss) after one warm-up."""
    clear(leaves)
    forward_backward(fn)
    clear(leaves)
    gc.collect()
    with bench.PeakMemory("cuda") as memory:
        times, loss = bench.cuda_times(lambda: forward_backward(fn), reps, before=lambda: clear(leaves))
    value = float(loss.detach())
    del loss
    return statistics.median(times), memory.extra_bytes, value


def measure_floor(inputs, reps):
    h, w = inputs["hidden"].detach(), inputs["weight"].detach()
    n, d = h.shape
    v = w.shape[0]
    buffers = bench.head_buffers(n, v, d, h.dtype, device="cuda")

    def once():  # the logits stand for their own gradient
        bench.head_matmuls(h, w, buffers["logits"], **buffers)

    once()
    torch.cuda.synchronize()
    times, _ = bench.cuda_times(once, reps)
    buffers.clear()  # free them before the next case (the closure keeps the name)
    torch.cuda.empty_cache()
    return statistics.median(times)


def gradient_errors(fn, ref_grads, leaves):
    """Relative L2 error of a variant's gradients against the reference backend's (float32 logits)."""
    clear(leaves)
    loss = fn()
    loss.backward()
    errors = [
        float((leaf.grad.float() - ref).norm() / ref.norm().clamp_min(1e-30)) for leaf, ref in zip(leaves, ref_grads)
    ]
    clear(leaves)
    return float(loss), errors


def run(args):
    import hf_plugins.ops.triton.head as triton_head
    from hf_plugins.losses import METHODS

    device = torch.cuda.get_device_properties(0)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    res = {
        "machine": {
            "gpu": device.name,
            "sm_count": device.multi_processor_count,
            "memory_gib": round(device.total_memory / GIB, 1),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": __import__("triton").__version__,
            "python": platform.python_version(),
        },
        "shape": {"N": args.rows, "V": args.vocab, "D": args.hidden, "dtype": args.dtype},
        "cases": [],
        "sweep": [],
    }
    for name in ("trl", "liger_kernel"):
        try:
            __import__(name)
            res["machine"][name] = importlib.metadata.version(name.replace("_", "-"))
        except Exception as error:  # noqa: BLE001
            res["machine"][name] = f"unavailable: {error}"
    inputs = make_inputs(args.rows, args.vocab, args.hidden, dtype)
    leaves = [inputs["hidden"], inputs["weight"]]
    floor = measure_floor(inputs, args.reps + 2)
    res["floor_s"] = floor
    flops = 3 * 2 * args.rows * args.vocab * args.hidden
    res["floor_tflops"] = flops / floor / 1e12
    log(f"floor {floor * 1e3:.1f} ms ({res['floor_tflops']:.0f} TFLOP/s)")

    # Kernel launch settings: each candidate timed on sft (the label-target kernel) and otr (the sampler), the fastest
    # of each family kept for the rest of the run; the library defaults are set from these measurements
    families = {"sft": ("DEFAULT_BLOCK_V", "DEFAULT_NUM_WARPS"), "otr": ("SAMPLING_BLOCK_V", "SAMPLING_NUM_WARPS")}
    res["kernel_sweep"] = []
    for method, (block_name, warps_name) in families.items():
        if args.methods and method not in args.methods:
            continue
        best = None
        for config in args.kernel_configs[method]:
            block, warps = map(int, config.split("x"))
            setattr(triton_head, block_name, block)
            setattr(triton_head, warps_name, warps)
            case = {"method": method, "block_v": block, "num_warps": warps}
            try:
                seconds, peak, _ = measure(loss_fn("triton", method, inputs), leaves, args.reps)
                case.update(seconds=seconds, peak_gib=peak / GIB, vs_floor=seconds / floor)
                if best is None or seconds < best[0]:
                    best = (seconds, block, warps)
            except Exception as error:  # noqa: BLE001
                case["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            log(json.dumps(case))
            res["kernel_sweep"].append(case)
        if best is not None:
            setattr(triton_head, block_name, best[1])
            setattr(triton_head, warps_name, best[2])
    res["kernel_settings"] = {
        name: getattr(triton_head, name)
        for name in ("DEFAULT_BLOCK_V", "DEFAULT_NUM_WARPS", "SAMPLING_BLOCK_V", "SAMPLING_NUM_WARPS")
    }
    log("kernel settings", res["kernel_settings"])

    methods = args.methods or list(METHODS)
    for method in methods:
        ref_grads = None
        variants = ["reference", "chunked", "triton"]
        if method in LIGER_METHODS:
            variants.append("liger")
        if method in TRL_METHODS:
            variants.append("trl")
        if args.skip:
            variants = [v for v in variants if v not in args.skip]
        for variant in variants:
            case = {"method": method, "variant": variant}
            t0 = time.time()
            try:
                fn = loss_fn(variant, method, inputs)
                reps = 1 if variant in ("reference", "chunked") else args.reps
                seconds, peak, value = measure(fn, leaves, reps)
                method_floor = floor * (3 + EXTRA_MATMULS.get(method, 0)) / 3
                case.update(
                    seconds=seconds,
                    peak_gib=peak / GIB,
                    loss=value,
                    vs_floor=seconds / floor,
                    vs_method_floor=seconds / method_floor,
                )
                if variant == "reference":
                    clear(leaves)
                    loss = fn()
                    loss.backward()
                    ref_grads = [leaf.grad.float().clone() for leaf in leaves]
                    clear(leaves)
                    del loss
                elif ref_grads is not None and variant in ("triton", "liger", "trl"):
                    _, errors = gradient_errors(fn, ref_grads, leaves)
                    case["grad_rel_err"] = errors
            except Exception as error:  # noqa: BLE001
                case["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                traceback.print_exc(file=sys.stderr)
            clear(leaves)
            gc.collect()
            torch.cuda.empty_cache()
            log(json.dumps(case), f"({time.time() - t0:.1f}s)")
            res["cases"].append(case)
        del ref_grads
        gc.collect()
        torch.cuda.empty_cache()

    for rows in args.sweep_rows:
        case = {"method": "sft", "variant": "triton", "tile_rows": rows}
        try:
            seconds, peak, _ = measure(loss_fn("triton", "sft", inputs, chunk_size=rows), leaves, args.reps)
            case.update(seconds=seconds, peak_gib=peak / GIB, vs_floor=seconds / floor)
        except Exception as error:  # noqa: BLE001
            case["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        log(json.dumps(case))
        res["sweep"].append(case)
    res["default_tile_rows"] = triton_head.default_tile_rows(args.rows, args.vocab, args.hidden)
    return res


def render(res) -> str:
    m, s = res["machine"], res["shape"]
    lines = [
        f"GPU: {m['gpu']} ({m['sm_count']} SMs, {m['memory_gib']} GiB); torch {m['torch']}, CUDA {m['cuda']}, "
        f"triton {m['triton']}, trl {m.get('trl')}, liger-kernel {m.get('liger_kernel')}.",
        f"N={s['N']} V={s['V']} D={s['D']} {s['dtype']}; forward+backward, gradients for hidden and weight; "
        f"three-matmul floor {res['floor_s'] * 1e3:.1f} ms ({res['floor_tflops']:.0f} TFLOP/s); "
        f"triton default tile {res['default_tile_rows']} rows.",
        "",
    ]
    rows = []
    for c in res["cases"]:
        if "error" in c:
            rows.append([c["method"], c["variant"], f"failed: {c['error'][:80]}", "", "", "", ""])
            continue
        errors = ", ".join(f"{e:.1e}" for e in c.get("grad_rel_err", [])) or "-"
        rows.append(
            [
                c["method"],
                c["variant"],
                f"{c['seconds'] * 1e3:.1f}",
                f"{c['vs_floor']:.2f}",
                f"{c['vs_method_floor']:.2f}",
                f"{c['peak_gib']:.2f}",
                errors,
            ]
        )
    header = [
        "method",
        "backend",
        "time (ms)",
        "x floor",
        "x method floor",
        "peak memory (GiB)",
        "grad rel. error (h, W)",
    ]
    lines.append(bench.table(header, rows, align="llrrrrl"))
    if res.get("kernel_sweep"):
        rows = []
        for c in res["kernel_sweep"]:
            cells = [c["method"], str(c["block_v"]), str(c["num_warps"])]
            if "error" in c:
                rows.append([*cells, f"failed: {c['error'][:60]}", ""])
            else:
                rows.append([*cells, f"{c['seconds'] * 1e3:.1f}", f"{c['vs_floor']:.2f}"])
        lines += [
            "",
            f"Kernel launch sweep (default tile; kept: {res['kernel_settings']}):",
            "",
            bench.table(["method", "block", "warps", "time (ms)", "x floor"], rows, align="lrrrr"),
        ]
    if res["sweep"]:
        rows = []
        for c in res["sweep"]:
            if "error" in c:
                rows.append([str(c["tile_rows"]), f"failed: {c['error'][:80]}", "", ""])
            else:
                rows.append(
                    [str(c["tile_rows"]), f"{c['seconds'] * 1e3:.1f}", f"{c['vs_floor']:.2f}", f"{c['peak_gib']:.2f}"]
                )
        lines += [
            "",
            "Triton tile sweep (sft):",
            "",
            bench.table(["tile rows", "time (ms)", "x floor", "peak memory (GiB)"], rows, align="rrrr"),
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", "-N", type=int, default=16384)
    p.add_argument("--vocab", "-V", type=int, default=151936)
    p.add_argument("--hidden", "-D", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up (median)")
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--skip", nargs="+", default=[], help="variants to leave out (e.g. chunked)")
    p.add_argument("--sweep_rows", type=int, nargs="*", default=[256, 512, 1024, 2048])
    p.add_argument(
        "--sft_kernels",
        nargs="*",
        default=["4096x8", "4096x16", "8192x16", "8192x32", "16384x32"],
        help="BLOCKxWARPS launch settings tried for the label-target kernel",
    )
    p.add_argument(
        "--otr_kernels",
        nargs="*",
        default=["1024x4", "2048x8", "4096x8", "4096x16"],
        help="BLOCKxWARPS launch settings tried for OTR's sampling kernel",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.kernel_configs = {"sft": args.sft_kernels, "otr": args.otr_kernels}
    if not torch.cuda.is_available():
        raise SystemExit("loss_head_gpu.py needs a CUDA device; benchmarks/loss_head.py measures the CPU.")
    res = run(args)
    text = render(res)
    print(text)
    bench.write_json(args.json, res, indent=1)
    bench.write_text(args.markdown, text)


if __name__ == "__main__":
    main()
