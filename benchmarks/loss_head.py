#!/usr/bin/env python
"""Benchmark of the fused linear loss head (`hf_plugins.ops.fused_linear_loss`) on CPU.

`python benchmarks/loss_head.py --device cuda [options of loss_head_gpu.py]` runs the GPU benchmark instead
(`benchmarks/loss_head_gpu.py`: every backend, Liger's and TRL's heads, at the Qwen vocabulary by default).

For every method in `hf_plugins.losses.METHODS` it times forward + backward (gradients for `hidden` and `weight`) of

- `chunked`: `fused_linear_loss(..., backend="chunked")` at the default chunk size (`--chunk_sizes`: a sweep),
- `reference`: `fused_linear_loss(..., backend="reference")`, which materialises the `[N, V]` logits,
- `trl`: TRL's `trl.kernels.ChunkedLogProbFunction` with the loss TRL's SFTTrainer builds from its log-probs
  (only for the methods TRL's SFTTrainer has: `sft` and `dft`),

against the floor: the three matmuls of the head done bare on preallocated buffers (`logits = h @ W.T`,
`grad_hidden = G @ W`, `grad_weight = G.T @ h`). Each variant's peak extra memory is measured in a fresh worker
process (`--worker`) from the peak resident set size. Run `python benchmarks/loss_head.py --help` for the options and
see docs/benchmarks.md for results and how to read them.

torch is imported lazily: the memory workers are started before this process allocates anything large, because a
child's `ru_maxrss` starts at the parent's peak (Linux copies it across fork/exec).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import _harness as bench


DEFAULT_CHUNK = "default"
#: Methods with a counterpart in TRL's SFTTrainer (`loss_type="nll"` / `"dft"`): loss from TRL's per-token log-probs.
TRL_METHODS = ("sft", "dft")
#: Matmuls a method adds to the three of the head (ASFT: the reference model's logits, no gradient); the method's
#: floor is the measured three-matmul floor scaled by (3 + extra) / 3.
EXTRA_MATMULS = {"asft": 1}
#: Methods whose inputs are per sequence: their hidden states are passed as [B, T, D] (`--batch` sequences).
SEQUENCE_METHODS = ("poft", "grpo")


# ----------------------------------------------------------------------------------------------------------- inputs
def method_inputs(name: str, cfg: dict, generator) -> dict:
    """Inputs a method needs besides hidden/weight/labels; unknown methods get none (skipped if they need some).

    The entries for methods not yet in the library follow the argument names of the design's public API contract
    (`fused_linear_loss(..., **method_inputs)`); a method whose real signature differs fails the probe and is reported
    as skipped, with the error, instead of breaking the run.
    """
    import torch

    n, v, d, b = cfg["rows"], cfg["vocab"], cfg["hidden"], cfg["batch"]
    dtype = bench.torch_dtype(cfg["dtype"])
    shape = (b, n // b) if name in SEQUENCE_METHODS else (n,)
    if name == "weighted":
        return {"token_weights": torch.rand(shape, generator=generator).to(dtype)}
    if name == "asft":
        return {
            "ref_hidden": torch.randn(*shape, d, generator=generator).to(dtype),
            "ref_weight": (torch.randn(v, d, generator=generator) * d**-0.5).to(dtype),
            "kl_coef": 0.1,
        }
    if name == "otr":  # the method's default sampling settings; the generator is re-seeded for every call
        return {"generator": torch.Generator().manual_seed(cfg["seed"])}
    if name == "poft":
        return {"ref_scores": -torch.rand(b, generator=generator) * 3}
    if name == "grpo":  # TRL's default loss (dapo), off-policy, with the KL to a reference (beta 0.04)
        log_probs = lambda: (0.3 * torch.randn(b, n // b, generator=generator) - math.log(v)).to(dtype)  # noqa: E731
        return {
            "advantages": torch.randn(b, generator=generator).to(dtype),
            "old_log_probs": log_probs(),
            "ref_log_probs": log_probs(),
            "beta": 0.04,
        }
    return {}


def make_inputs(cfg: dict, method: str | None = None, with_floor: bool = False) -> dict:
    """hidden [N, D] and weight [V, D] (leaves that require grad), labels [N], method inputs, floor buffers.

    Scaled so the logits are ~N(0, 1). Built in place to keep the transient peak of the setup low.
    """
    out, gen = bench.head_inputs(cfg["rows"], cfg["vocab"], cfg["hidden"], cfg["dtype"], cfg["seed"])
    if method is not None:
        out["method_inputs"] = method_inputs(method, cfg, gen)
    if with_floor:
        import torch

        dtype = bench.torch_dtype(cfg["dtype"])
        # G stands for the logits gradient; random values so no zero/denormal fast paths
        out["floor_G"] = torch.randn(cfg["rows"], cfg["vocab"], generator=gen).mul_(1e-4).to(dtype)
        out["floor"] = bench.head_buffers(cfg["rows"], cfg["vocab"], cfg["hidden"], dtype)
    return out


def resolve_chunk(chunk_size, vocab: int) -> int:
    from hf_plugins.ops.chunked import default_chunk_size

    return default_chunk_size(vocab) if chunk_size in (None, DEFAULT_CHUNK) else int(chunk_size)


# --------------------------------------------------------------------------------------------------------- variants
def run_variant(variant: str, method: str, inputs: dict, cfg: dict, chunk_size=None, rows: int | None = None):
    """One forward + backward of `variant` for `method`; returns the loss (a float). `rows` limits N (warm-ups)."""
    import torch

    h, w, y = inputs["hidden"], inputs["weight"], inputs["labels"]
    if variant == "floor":
        r = cfg["rows"] if rows is None else rows
        buffers = inputs["floor"]
        with torch.no_grad():
            bench.head_matmuls(
                h[:r],
                w,
                inputs["floor_G"][:r],
                buffers["logits"][:r],
                buffers["grad_hidden"][:r],
                buffers["grad_weight"],
            )
        return float("nan")

    extra = dict(inputs.get("method_inputs", {}))
    n, d = cfg["rows"], h.shape[-1]
    if method in SEQUENCE_METHODS and variant in ("chunked", "reference"):
        # per-sequence inputs: hidden [B, T, D], labels [B, T]; a warm-up keeps the first rows // B positions of each
        b = cfg["batch"]
        t = n // b if rows is None else max(1, rows // b)
        h, y = h.view(b, n // b, d)[:, :t], y.view(b, n // b)[:, :t]
        extra = {
            k: (val[:, :t] if torch.is_tensor(val) and val.shape[:2] == (b, n // b) else val)
            for k, val in extra.items()
        }
    elif rows is not None:
        h, y = h[:rows], y[:rows]
        extra = {
            k: (val[:rows] if torch.is_tensor(val) and val.shape[:1] == (n,) else val) for k, val in extra.items()
        }
    # a sampling method draws the same tokens in every call (and every backend): fresh generator, same seed
    extra = {
        k: (torch.Generator().manual_seed(cfg["seed"]) if isinstance(val, torch.Generator) else val)
        for k, val in extra.items()
    }
    inputs["hidden"].grad = None
    w.grad = None
    if variant in ("chunked", "reference"):
        from hf_plugins.ops import fused_linear_loss

        kwargs = {"chunk_size": resolve_chunk(chunk_size, w.shape[0])} if variant == "chunked" else {}
        loss = fused_linear_loss(h, w, y, method, backend=variant, **kwargs, **extra)
    elif variant == "trl":
        from trl.kernels import ChunkedLogProbFunction

        logp = ChunkedLogProbFunction.apply(
            h, w, None, y, 1.0, cfg["trl_chunk_size"], None, 1.0, tuple(cfg["trl_outputs"])
        )[0]
        if method == "sft":  # TRL SFTTrainer, loss_type="nll": -log_probs.sum() / num_tokens
            loss = -logp.sum() / logp.numel()
        elif method == "dft":  # loss_type="dft": per-token NLL scaled by the detached probability
            loss = -(logp.exp().detach() * logp).sum() / logp.numel()
        else:
            raise ValueError(f"TRL has no counterpart of method {method!r}")
    else:
        raise ValueError(f"unknown variant {variant!r}")
    loss.backward()
    return float(loss.detach())


# ------------------------------------------------------------------------------------------------------- memory
def worker(spec: dict) -> dict:
    """Runs in a fresh process: set up, warm up on a few rows, reset the peak, run once, report the peak extra."""
    import torch

    import hf_plugins.losses  # noqa: F401
    import hf_plugins.ops  # noqa: F401

    cfg = spec["cfg"]
    torch.set_num_threads(spec["threads"])
    kind = spec["kind"]
    if kind == "probe":
        return probe_methods(cfg)

    method = spec.get("method")
    inputs = None
    if kind == "variant":
        inputs = make_inputs(cfg, method)
        run_variant(spec["variant"], method, inputs, cfg, spec.get("chunk_size"), rows=8)  # load code paths
        inputs["hidden"].grad = None
        inputs["weight"].grad = None
    keep = None
    with bench.PeakMemory("cpu", fresh=True) as memory:
        t0 = time.perf_counter()
        if kind == "calibrate":  # a known allocation, touched
            keep = torch.ones(spec["calibration_bytes"] // 4, dtype=torch.float32)
        elif kind == "variant":
            run_variant(spec["variant"], method, inputs, cfg, spec.get("chunk_size"))
        seconds = time.perf_counter() - t0
    del keep
    return {
        "peak_reset": memory.peak_reset,
        "malloc_trimmed": memory.malloc_trimmed,
        "before": memory.before,
        "after": memory.after,
        "peak_extra_mib": memory.extra_bytes / bench.MIB,
        "peak_extra_hwm_mib": (memory.after["hwm_kib"] - memory.before["rss_kib"]) / 1024,
        "seconds": seconds,
    }


def probe_methods(cfg: dict) -> dict:
    """Which methods of `hf_plugins.losses.METHODS` this benchmark can run (tiny call with the inputs it builds)."""
    from hf_plugins.losses import METHODS

    tiny = {**cfg, "rows": 16, "vocab": 64, "hidden": 8, "batch": 2}
    runnable, skipped = [], {}
    for name in METHODS:
        try:
            run_variant("chunked", name, make_inputs(tiny, name), tiny)
            run_variant("reference", name, make_inputs(tiny, name), tiny)
            runnable.append(name)
        except Exception as error:  # noqa: BLE001  (report and go on)
            skipped[name] = f"{type(error).__name__}: {error}"
    return {"methods": runnable, "skipped": skipped}


def spawn(spec: dict) -> dict:
    """Run `worker(spec)` in a fresh interpreter and return its result."""
    label = f"worker {spec.get('kind')} {spec.get('variant')}"
    return bench.run_worker([os.path.abspath(__file__), "--worker", json.dumps(spec)], label)


# ------------------------------------------------------------------------------------------------------- timing
def time_cases(cases, inputs_for, cfg, reps: int, warmup_rows: int | None, log) -> dict:
    """Warm each case up once (on the first `warmup_rows` rows; None: all), then `reps` rounds over all cases
    (interleaved, in a rotating order, so a burst of load from other processes hits every variant alike).
    Returns per case: wall and CPU times and the warm-up loss."""
    import torch

    results = {key: {"wall": [], "cpu": []} for key, *_ in cases}
    by_key = {key: case for key, *case in cases}
    for key, (variant, method, chunk) in by_key.items():
        t0 = time.perf_counter()
        results[key]["warmup_loss"] = run_variant(variant, method, inputs_for(method), cfg, chunk, rows=warmup_rows)
        results[key]["warmup_s"] = time.perf_counter() - t0
        log(f"  warm-up {key}: {results[key]['warmup_s']:.2f} s")

    def run(key, _):
        variant, method, chunk = by_key[key]
        gc.collect()
        c0, t0 = time.process_time(), time.perf_counter()
        run_variant(variant, method, inputs_for(method), cfg, chunk)
        t1, c1 = time.perf_counter(), time.process_time()
        return t1 - t0, c1 - c0

    def progress(rep):
        log(f"  round {rep + 1}/{reps} done (load average {os.getloadavg()[0]:.2f})")

    runs = bench.interleaved(by_key, run, reps, after_round=progress)
    threads = torch.get_num_threads()
    for key, res in results.items():
        res["wall"] += [wall for wall, _ in runs[key]]
        res["cpu"] += [cpu for _, cpu in runs[key]]
        res["median_s"] = statistics.median(res["wall"])
        res["min_s"] = min(res["wall"])
        res["median_cpu_s"] = statistics.median(res["cpu"])
        # CPU seconds per wall second per thread: ~1.0 when the threads had their cores to themselves
        res["cpu_share"] = res["median_cpu_s"] / (res["median_s"] * threads)
    return results


def check_gradients(method, inputs, cfg, chunk) -> dict:
    """Gradient agreement of chunked and TRL with the reference at the benchmark shape (one extra call each)."""
    out = {}
    run_variant("reference", method, inputs, cfg)
    ref = (inputs["hidden"].grad.clone(), inputs["weight"].grad.clone())
    for variant in ("chunked", "trl"):
        if variant == "trl" and (method not in TRL_METHODS or cfg["skip_trl"]):
            continue
        run_variant(variant, method, inputs, cfg, chunk)
        leaves = (inputs["hidden"], inputs["weight"])
        errs = [float((leaf.grad - want).abs().max() / want.abs().max()) for leaf, want in zip(leaves, ref)]
        out[variant] = {"grad_hidden_rel_err": errs[0], "grad_weight_rel_err": errs[1]}
    return out


# ------------------------------------------------------------------------------------------------------- profile
def profile_chunked(cfg: dict, chunk_size, threads: int, method: str = "sft", top: int = 12) -> dict:
    """torch.profiler on one chunked forward + backward: self CPU time per op, and per op family."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    inputs = make_inputs(cfg, method)
    run_variant("chunked", method, inputs, cfg, chunk_size)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        run_variant("chunked", method, inputs, cfg, chunk_size)
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    ops = sorted(
        ({"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3} for e in events),
        key=lambda r: -r["self_ms"],
    )
    families = {
        "matmul (mm/addmm)": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::matmul"),
        "log_softmax": ("aten::_log_softmax",),
        "exp": ("aten::exp", "aten::exp_"),
        "scale (mul_)": ("aten::mul_", "aten::mul"),
        "gather/scatter": ("aten::gather", "aten::scatter_add_"),
        "allocation/copy": ("aten::empty", "aten::empty_strided", "aten::copy_", "aten::zeros_like", "aten::zero_"),
    }
    by_family = {}
    for fam, names in families.items():
        by_family[fam] = sum(r["self_ms"] for r in ops if r["op"] in names)
    by_family["other"] = total / 1e3 - sum(by_family.values())
    return {
        "method": method,
        "threads": threads,
        "chunk_size": resolve_chunk(chunk_size, cfg["vocab"]),
        "wall_s": wall,
        # kernel time: mostly page faults of freshly allocated tiles (shows up inside the ops that allocate)
        "user_s": r1.ru_utime - r0.ru_utime,
        "sys_s": r1.ru_stime - r0.ru_stime,
        "profiled_self_ms": total / 1e3,
        "families_ms": by_family,
        "top_ops": ops[:top],
    }


# ------------------------------------------------------------------------------------------------------- reporting
def machine_info() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch
        import trl

        info["torch"] = torch.__version__
        info["trl"] = trl.__version__
        info["mkl"] = torch.backends.mkl.is_available()
    except ImportError:
        pass
    return info


def fmt(x, spec=".2f", unit=""):
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def build_rows(res: dict) -> tuple[list, list, list]:
    """Time rows (per threads x method), memory rows (per method) and sweep rows from the results dict."""
    timings, memory = res["timings"], res.get("memory", {})
    time_rows = []
    for threads, per in timings.items():
        for method in res["methods"]:
            scale = (3 + EXTRA_MATMULS.get(method, 0)) / 3
            floor, best_floor = (per.get("floor", {}).get(k) for k in ("median_s", "min_s"))
            floor, best_floor = (None if x is None else x * scale for x in (floor, best_floor))
            chunked, ref, trl = (per.get(f"{method}/{v}", {}).get("median_s") for v in ("chunked", "reference", "trl"))
            time_rows.append(
                {
                    "threads": int(threads),
                    "method": method,
                    "chunked_s": chunked,
                    "reference_s": ref,
                    "trl_s": trl,
                    "floor_s": floor,
                    "chunked_over_floor": ratio(chunked, floor),
                    "chunked_over_reference": ratio(chunked, ref),
                    "chunked_over_trl": ratio(chunked, trl),
                    "best_chunked_over_best_floor": ratio(per.get(f"{method}/chunked", {}).get("min_s"), best_floor),
                    "cpu_share": per.get(f"{method}/chunked", {}).get("cpu_share"),
                }
            )
    mem_rows = []
    for method in res["methods"]:
        get = lambda key: memory.get(key, {}).get("peak_extra_mib")  # noqa: E731
        chunked, ref, trl = get(f"{method}/chunked"), get(f"{method}/reference"), get(f"{method}/trl")
        mem_rows.append(
            {
                "method": method,
                "chunked_mib": chunked,
                "reference_mib": ref,
                "trl_mib": trl,
                "chunked_over_reference": ratio(chunked, ref),
                "chunked_over_trl": ratio(chunked, trl),
                "chunked_range_mib": [memory.get(f"{method}/chunked", {}).get(k) for k in ("min_mib", "max_mib")],
            }
        )
    sweep_rows = []
    for threads, per in timings.items():
        for key, val in per.items():
            if "/chunked@" in key:
                method, chunk = key.split("/chunked@")
                scale = (3 + EXTRA_MATMULS.get(method, 0)) / 3
                floor = per.get("floor", {}).get("median_s", 0) * scale
                sweep_rows.append(
                    {
                        "threads": int(threads),
                        "method": method,
                        "chunk_size": int(chunk),
                        "median_s": val["median_s"],
                        "over_floor": ratio(val["median_s"], floor),
                        "min_s": val["min_s"],
                        "best_over_best_floor": ratio(val["min_s"], per.get("floor", {}).get("min_s", 0) * scale),
                        "peak_extra_mib": memory.get(key, {}).get("peak_extra_mib"),
                    }
                )
    sweep_rows.sort(key=lambda r: (r["threads"], r["method"], r["chunk_size"]))
    return time_rows, mem_rows, sweep_rows


def render(res: dict, markdown: bool) -> str:
    time_rows, mem_rows, sweep_rows = build_rows(res)
    cfg = res["config"]

    def table(header, rows):
        return bench.table(header, rows, markdown)

    chunk = cfg["default_chunk_size"]
    out = [
        f"N={cfg['rows']} V={cfg['vocab']} D={cfg['hidden']} {cfg['dtype']}, chunked chunk_size={chunk} (default), "
        f"TRL chunk_size={cfg['trl_chunk_size']} outputs={tuple(cfg['trl_outputs'])}; median of {cfg['reps']} "
        "after one warm-up; forward+backward, grads for hidden and weight.",
        "",
        "Time in seconds. floor: the three matmuls of the head on preallocated buffers (scaled by 4/3 for methods "
        "with a fourth, e.g. asft's reference logits). cpu share: CPU seconds / (wall seconds x threads) of the "
        "chunked runs; well below 1 means other processes held the cores, and then best/best floor (fastest run "
        "over fastest floor) is the steadier ratio.",
        "",
        table(
            [
                "threads",
                "method",
                "chunked",
                "reference",
                "TRL",
                "floor",
                "chunked/floor",
                "chunked/ref",
                "chunked/TRL",
                "best/best floor",
                "cpu share",
            ],
            [
                [
                    str(r["threads"]),
                    r["method"],
                    fmt(r["chunked_s"]),
                    fmt(r["reference_s"]),
                    fmt(r["trl_s"]),
                    fmt(r["floor_s"]),
                    fmt(r["chunked_over_floor"], ".2f", "x"),
                    fmt(r["chunked_over_reference"], ".2f", "x"),
                    fmt(r["chunked_over_trl"], ".2f", "x"),
                    fmt(r["best_chunked_over_best_floor"], ".2f", "x"),
                    fmt(r["cpu_share"], ".2f"),
                ]
                for r in time_rows
            ],
        ),
    ]
    if res.get("memory"):
        cal = res.get("calibration", {})
        out += [
            "",
            f"Peak extra memory of one forward+backward (MiB, median of {res['memory_reps']} fresh process(es) per "
            f"variant, {res['memory_threads']} thread(s); calibration: a {cal.get('expected_mib', 0):.1f} MiB "
            "tensor measured as "
            f"{fmt(cal.get('measured_mib'), '.1f')} MiB, an empty run as {fmt(cal.get('noop_mib'), '.1f')} MiB):",
            "",
            table(
                ["method", "chunked", "(min-max)", "reference", "TRL", "chunked/ref", "chunked/TRL"],
                [
                    [
                        r["method"],
                        fmt(r["chunked_mib"], ".1f"),
                        "-".join(fmt(x, ".0f") for x in r["chunked_range_mib"]),
                        fmt(r["reference_mib"], ".1f"),
                        fmt(r["trl_mib"], ".1f"),
                        fmt(r["chunked_over_reference"], ".3f"),
                        fmt(r["chunked_over_trl"], ".3f"),
                    ]
                    for r in mem_rows
                ],
            ),
        ]
    if sweep_rows:
        out += [
            "",
            "Chunk size sweep (chunked backend):",
            "",
            table(
                [
                    "threads",
                    "method",
                    "chunk_size",
                    "time s",
                    "time/floor",
                    "best s",
                    "best/best floor",
                    "peak extra MiB",
                ],
                [
                    [
                        str(r["threads"]),
                        r["method"],
                        str(r["chunk_size"]),
                        fmt(r["median_s"]),
                        fmt(r["over_floor"], ".2f", "x"),
                        fmt(r["min_s"]),
                        fmt(r["best_over_best_floor"], ".2f", "x"),
                        fmt(r["peak_extra_mib"], ".1f"),
                    ]
                    for r in sweep_rows
                ],
            ),
        ]
    losses = []
    for threads, per in res["timings"].items():
        for method in res["methods"]:
            vals = {v: per.get(f"{method}/{v}", {}).get("warmup_loss") for v in ("chunked", "reference", "trl")}
            ref = vals["reference"]
            diffs = [abs(x - ref) / abs(ref) for k, x in vals.items() if k != "reference" and x is not None and ref]
            shown = ", ".join(f"{k} {x:.6f}" for k, x in vals.items() if x is not None)
            agree = f" (max rel. diff {max(diffs):.1e})" if diffs else ""
            losses.append(f"  {threads} thread(s), {method}: {shown}{agree}")
    if losses:
        out += ["", "Losses of the warm-up calls (same rows for every variant; they must agree):", *losses]
    if res.get("checks"):
        out += ["", "Agreement with the reference (max |grad - grad_ref| / max |grad_ref|):"]
        for method, per in res["checks"].items():
            for variant, errs in per.items():
                out.append(
                    f"  {method}/{variant}: hidden {errs['grad_hidden_rel_err']:.1e}, "
                    f"weight {errs['grad_weight_rel_err']:.1e}"
                )
    if res.get("profiles"):
        for prof in res["profiles"]:
            total = prof["profiled_self_ms"]
            out += [
                "",
                f"Profile of one chunked {prof.get('method', 'sft')} call, {prof['threads']} thread(s), "
                f"chunk_size={prof['chunk_size']}: "
                f"{prof['wall_s']:.2f} s wall ({fmt(prof.get('user_s'))} s user, "
                f"{fmt(prof.get('sys_s'))} s system CPU), "
                f"{total:.0f} ms self CPU time recorded",
                "",
                table(
                    ["op family", "self ms", "share"],
                    [[fam, f"{ms:.0f}", f"{ms / total:.0%}"] for fam, ms in prof["families_ms"].items()],
                ),
                "",
                table(
                    ["op", "calls", "self ms"],
                    [[r["op"], str(r["calls"]), f"{r['self_ms']:.0f}"] for r in prof["top_ops"]],
                ),
            ]
    if res.get("skipped_methods"):
        out += ["", "Skipped methods (inputs unknown to this benchmark):"]
        out += [f"  {name}: {why}" for name, why in res["skipped_methods"].items()]
    phases = ", ".join(f"{k[:-2].replace('_', ' ')} {v:.0f} s" for k, v in res.get("phases_s", {}).items())
    out += [
        "",
        f"Load average (1, 5, 15 min) at start / end: {res['load_start']} / {res['load_end']}.",
        f"Run time {res['elapsed_s']:.0f} s ({phases}).",
    ]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--rows", "-N", type=int, default=4096, help="supervised rows N")
    p.add_argument("--vocab", "-V", type=int, default=32000, help="vocabulary size V")
    p.add_argument("--hidden", "-D", type=int, default=256, help="hidden size D")
    p.add_argument("--batch", type=int, default=8, help="sequences B (per-sequence methods only: hidden [B, N/B, D])")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"))
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1],
        help="torch thread counts to time (1 2: both, about twice the run time)",
    )
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per case after one warm-up (median)")
    p.add_argument(
        "--warmup_rows",
        type=int,
        default=512,
        help="rows of the warm-up call of each case (loads code, starts thread pools); 0: full size",
    )
    p.add_argument("--methods", nargs="+", default=None, help="subset of hf_plugins.losses.METHODS (default: all)")
    p.add_argument("--chunk_sizes", type=int, nargs="*", default=[], help="also run the chunked backend at these")
    p.add_argument("--sweep_methods", nargs="+", default=["sft"], help="methods the --chunk_sizes sweep runs")
    p.add_argument(
        "--trl_chunk_size",
        type=int,
        default=32768,
        help="TRL's vocab tile (SFTTrainer's, trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16)",
    )
    p.add_argument(
        "--trl_outputs",
        nargs="+",
        default=["log_probs"],
        help="TRL outputs; SFTTrainer asks for: log_probs entropy is_top1",
    )
    p.add_argument("--skip_trl", action="store_true")
    p.add_argument("--skip_reference", action="store_true")
    p.add_argument("--skip_memory", action="store_true")
    p.add_argument("--check", action="store_true", help="compare chunked and TRL gradients with the reference")
    p.add_argument("--memory_threads", type=int, default=None, help="threads of the memory workers (default: max)")
    p.add_argument("--memory_reps", type=int, default=1, help="fresh workers per variant (median peak reported)")
    p.add_argument("--memory_jobs", type=int, default=2, help="memory workers run side by side")
    p.add_argument("--calibration_mb", type=int, default=500, help="size (1e6 bytes) of the calibration tensor")
    p.add_argument(
        "--profile",
        type=int,
        nargs="*",
        default=None,
        help="profile one chunked call at these chunk sizes (no value: the default chunk size)",
    )
    p.add_argument("--profile_methods", nargs="+", default=["sft"], help="methods --profile profiles, one call each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write all results to this path")
    p.add_argument(
        "--markdown",
        nargs="?",
        const="-",
        default=None,
        help="print the tables as markdown (to stdout, or to the given path)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress log on stderr")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["--device", "cuda"]:
        # The GPU benchmark (CUDA events, CUDA peak memory, triton/liger backends) lives next door
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from loss_head_gpu import main as gpu_main

        return gpu_main(argv[2:])
    args = parse_args(argv)
    if args.worker is not None:
        bench.report_result(worker(json.loads(args.worker)))
        return None

    start = time.perf_counter()
    log = (lambda msg: None) if args.quiet else bench.log
    load_start = [round(x, 2) for x in os.getloadavg()]
    cfg = {
        "rows": args.rows,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "batch": args.batch,
        "dtype": args.dtype,
        "seed": args.seed,
        "trl_chunk_size": args.trl_chunk_size,
        "trl_outputs": args.trl_outputs,
        "skip_trl": args.skip_trl,
        "reps": args.reps,
    }

    phases = {}
    mem_threads = args.memory_threads or max(args.threads)
    expected = args.calibration_mb * 1_000_000
    # 1. which methods, plus the memory calibration, in workers side by side (this process stays small until the
    #    memory workers are done)
    first = [{"kind": "probe", "cfg": cfg, "threads": 1}]
    if not args.skip_memory:
        first += [
            {"kind": "calibrate", "cfg": cfg, "threads": mem_threads, "calibration_bytes": expected},
            {"kind": "noop", "cfg": cfg, "threads": mem_threads},
        ]
    with ThreadPoolExecutor(max_workers=max(1, args.memory_jobs)) as pool:
        probe, *calibration_runs = pool.map(spawn, first)
    phases["probe_and_calibration_s"] = time.perf_counter() - start
    methods = [m for m in probe["methods"] if args.methods is None or m in args.methods]
    log(f"methods: {methods}; skipped: {list(probe['skipped'])}")

    def variants_of(method):
        out = ["chunked"]
        if not args.skip_reference:
            out.append("reference")
        if not args.skip_trl and method in TRL_METHODS:
            out.append("trl")
        return out

    sweep = [(m, c) for m in methods if m in args.sweep_methods for c in args.chunk_sizes]

    # 2. peak memory, one fresh process per variant
    memory, calibration = {}, {}
    if not args.skip_memory:
        t_phase = time.perf_counter()
        cal, noop = calibration_runs
        calibration = {
            "expected_mib": expected / bench.MIB,
            "measured_mib": cal["peak_extra_mib"],
            "measured_hwm_mib": cal["peak_extra_hwm_mib"],
            "noop_mib": noop["peak_extra_mib"],
            "peak_reset": cal["peak_reset"],
        }
        log(
            f"calibration: {expected / bench.MIB:.1f} MiB tensor -> {cal['peak_extra_mib']:.1f} MiB; "
            f"empty run {noop['peak_extra_mib']:.1f} MiB"
        )
        jobs = [(f"{m}/{v}", m, v, None) for m in methods for v in variants_of(m)]
        jobs += [(f"{m}/chunked@{c}", m, "chunked", c) for m, c in sweep]
        specs = [
            (
                key,
                {
                    "kind": "variant",
                    "cfg": cfg,
                    "threads": mem_threads,
                    "method": method,
                    "variant": variant,
                    "chunk_size": chunk,
                },
            )
            for key, method, variant, chunk in jobs
            for _ in range(args.memory_reps)
        ]
        runs = {key: [] for key, *_ in jobs}
        # peak RSS is per process, so workers may run side by side; only their speed suffers
        with ThreadPoolExecutor(max_workers=max(1, args.memory_jobs)) as pool:
            for (key, _), r in zip(specs, pool.map(spawn, [spec for _, spec in specs])):
                runs[key].append(r)
                log(f"memory {key}: {r['peak_extra_mib']:.1f} MiB (VmHWM {r['peak_extra_hwm_mib']:.1f} MiB)")
        for key, rs in runs.items():
            peaks = [r["peak_extra_mib"] for r in rs]
            memory[key] = {
                "peak_extra_mib": statistics.median(peaks),
                "min_mib": min(peaks),
                "max_mib": max(peaks),
                "runs": rs,
            }
        phases["memory_s"] = time.perf_counter() - t_phase

    # 3. timing, in this process
    import torch

    from hf_plugins.ops.chunked import default_chunk_size

    cfg["default_chunk_size"] = default_chunk_size(args.vocab)

    per_method_inputs = {}
    base = make_inputs(cfg, with_floor=True)

    def inputs_for(method):
        if method is None:
            return base
        if method not in per_method_inputs:
            gen = torch.Generator().manual_seed(cfg["seed"] + 1)
            per_method_inputs[method] = {**base, "method_inputs": method_inputs(method, cfg, gen)}
        return per_method_inputs[method]

    cases = [("floor", "floor", None, None)]
    cases += [(f"{m}/{v}", v, m, None) for m in methods for v in variants_of(m)]
    cases += [(f"{m}/chunked@{c}", "chunked", m, c) for m, c in sweep]
    timings = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        log(f"timing at {threads} thread(s): {len(cases)} cases x ({args.reps} + 1 warm-up)")
        warmup_rows = None if args.warmup_rows <= 0 else min(args.warmup_rows, args.rows)
        t_phase = time.perf_counter()
        timings[str(threads)] = time_cases(cases, inputs_for, cfg, args.reps, warmup_rows, log)
        phases[f"timing_threads_{threads}_s"] = time.perf_counter() - t_phase

    checks = {}
    if args.check:
        torch.set_num_threads(max(args.threads))
        for m in methods:
            checks[m] = check_gradients(m, inputs_for(m), cfg, None)
    # Free the inputs before profiling (the closure above keeps its names, so rebind rather than delete them)
    base, per_method_inputs = None, {}
    gc.collect()

    profiles = []
    if args.profile is not None:
        for threads in args.threads:
            for chunk in args.profile or [None]:
                for method in args.profile_methods:
                    log(f"profiling chunked {method} at {threads} thread(s), chunk_size={chunk or 'default'}")
                    profiles.append(profile_chunked(cfg, chunk, threads, method))

    res = {
        "machine": machine_info(),
        "config": cfg,
        "methods": methods,
        "skipped_methods": probe["skipped"],
        "timings": timings,
        "memory": memory,
        "memory_threads": mem_threads,
        "memory_reps": args.memory_reps,
        "calibration": calibration,
        "checks": checks,
        "profiles": profiles,
        "load_start": load_start,
        "load_end": [round(x, 2) for x in os.getloadavg()],
        "elapsed_s": time.perf_counter() - start,
        "phases_s": phases,
    }
    time_rows, mem_rows, sweep_rows = build_rows(res)
    res["summary"] = {"time": time_rows, "memory": mem_rows, "sweep": sweep_rows}
    print(render(res, markdown=args.markdown == "-"))
    if args.markdown not in (None, "-"):
        bench.write_text(args.markdown, render(res, markdown=True) + "\n")
    bench.write_json(args.json, res, indent=1)
    return res


if __name__ == "__main__":
    main()
