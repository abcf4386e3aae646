"""What every benchmark in this folder shares: clocks and device synchronisation, the paired interleaved timing loop
and its ratios, peak memory, a step timer for `Trainer.train()`, one way to build the timed trainers and the tiny
model they train, the loss head's random inputs and matmul floor, fresh worker processes, JSON and table output.

The scripts stay small and say only what they compare. How to read what they measure: docs/benchmarks.md.

Nothing here imports torch, transformers or the library at module level: `loss_head.py` starts its memory workers
before it allocates anything large (a child's peak RSS starts at its parent's), so importing this module must stay
cheap.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


MIB = 1024 * 1024
GIB = 1024**3


# ------------------------------------------------------------------------------------------------ clocks and setup
def setup(threads: int, quiet: bool = True):
    """Pin torch to `threads` threads (and OpenMP, unless the caller set it: it reads its variable when torch is first
    imported), stay offline, and with `quiet` silence transformers' warnings; returns the torch module."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(threads)
    if quiet:
        from transformers.utils import logging

        logging.set_verbosity_error()
    return torch


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    """Wait for the GPU's queued work (no-op without CUDA), so that a clock read afterwards includes it."""
    if cuda_available():
        import torch

        torch.cuda.synchronize()


def clock() -> float:
    """Wall time on GPU; on CPU the process's CPU time, which a busy shared machine does not inflate when it
    deschedules us (the benchmarks run one thread by default, so CPU time is the work done)."""
    return time.perf_counter() if cuda_available() else time.process_time()


def timed(fn, clock=clock):
    """`(seconds, fn())`: `fn` timed on `clock` with the GPU synchronised before and after."""
    sync()
    start = clock()
    out = fn()
    sync()
    return clock() - start, out


def cuda_times(fn, reps: int, before=None):
    """`(seconds of each of `reps` calls of fn, last result)`, timed by CUDA events around each call; `before` runs
    ahead of each call, outside the timed region (e.g. clearing gradients)."""
    import torch

    times, out = [], None
    for _ in range(reps):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return times, out


def device_label(threads: int) -> str:
    """The GPU's name, or the CPU and its thread count, for the header line of a result."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {threads} thread(s)"


def log(*parts) -> None:
    """Progress on stderr, so that stdout holds only results."""
    print(*parts, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- paired, interleaved timing
def interleaved(
    names, run, rounds: int, batches: int = 1, warmup: bool = False, rotate: bool = True, after_round=None
) -> dict:
    """`{name: [run(name, index), ...]}`: every batch index runs on every variant back to back, `rounds` times.

    The order rotates with the round and the batch (with `rotate`), so a burst of load from other processes lands on
    all variants alike and each variant's result can be paired with the others' on the same batch and round (see
    `paired_ratio`). `warmup` first runs each variant once on batch 0, untimed (first calls allocate and pick
    kernels); `after_round(round_index)` is called after each round (progress).
    """
    names = list(names)
    if warmup:
        for name in names:
            run(name, 0)
    results = {name: [] for name in names}
    for round_index in range(rounds):
        for index in range(batches):
            shift = (round_index + index) % len(names) if rotate else 0
            for name in names[shift:] + names[:shift]:
                results[name].append(run(name, index))
        if after_round is not None:
            after_round(round_index)
    return results


def paired_ratio(times: dict, numerator: str, denominator: str) -> float:
    """Median over (batch, round) of `numerator`'s time over `denominator`'s on the same batch and round: slow drifts
    of the machine's load cancel."""
    return statistics.median(n / d for n, d in zip(times[numerator], times[denominator]))


def ratio_table(times: dict, baseline: str, width: int = 12, paired: bool = True, header: bool = True) -> list[str]:
    """Rows of median seconds, throughput relative to `baseline` (its median over the variant's) and, with `paired`,
    the paired ratio (`paired_ratio(times, baseline, name)`), one per variant."""
    base = statistics.median(times[baseline])
    lines = []
    if header:
        lines.append(
            f"{'variant':<{width}}{'median s':>10}{'throughput vs ' + baseline:>{width + 10}}"
            + (f"{'paired ratio':>14}" if paired else "")
        )
    for name, values in times.items():
        median = statistics.median(values)
        row = f"{name:<{width}}{median:>10.4f}{base / median:>{width + 9}.3f}x"
        if paired:
            row += f"{paired_ratio(times, baseline, name):>13.3f}x"
        lines.append(row)
    return lines


# ------------------------------------------------------------------------------------------------------ memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0) so the next peak measures only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> bool:
    """Give freed heap memory back to the kernel (glibc), so that the run cannot reuse pages the setup left resident
    and the peak counts everything the run itself touches."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def rss_snapshot() -> dict:
    return {
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,  # KiB on Linux
        "hwm_kib": _status_kib("VmHWM"),
        "rss_kib": _status_kib("VmRSS"),
    }


class PeakMemory:
    """Peak memory of the code in a `with PeakMemory(device) as memory:` block.

    On `"cuda"`: `torch.cuda.max_memory_allocated()` (the GPU synchronised and the cache emptied first); `extra_bytes`
    is the peak above what was allocated on entry. On `"cpu"`: the process's peak resident set size (`ru_maxrss`,
    which CPU torch offers in place of `max_memory_allocated`), with snapshots in `before` / `after`; with `fresh`,
    entering first collects garbage, hands freed heap pages back (`malloc_trimmed`) and resets the peak
    (`peak_reset`), so that the peak measures only the block.
    """

    def __init__(self, device: str = "cpu", fresh: bool = False):
        self.device, self.fresh = device, fresh
        self.malloc_trimmed = self.peak_reset = False

    def __enter__(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            if self.fresh:
                gc.collect()
                self.malloc_trimmed = malloc_trim()
                self.peak_reset = reset_peak_rss()
            self.before = rss_snapshot()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            import torch

            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.after = rss_snapshot()

    @property
    def peak_bytes(self) -> int:
        return self.peak if self.device == "cuda" else self.after["ru_maxrss_kib"] * 1024

    @property
    def extra_bytes(self) -> int:
        if self.device == "cuda":
            return self.peak - self.base
        return (self.after["ru_maxrss_kib"] - self.before["ru_maxrss_kib"]) * 1024


# ---------------------------------------------------------------------------------------------- trainer steps
def step_timer(sync_gpu: bool = False):
    """A `TrainerCallback` whose `times` collects the wall seconds of every optimizer step of `Trainer.train()`;
    with `sync_gpu` the GPU is synchronised before the step's end is read."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            if sync_gpu:
                sync()
            self.times.append(time.perf_counter() - self.start)

    return StepTimer()


def tiny_model_folder(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int = 0):
    """`(folder, tokenizer, vocabulary size)`: the offline test tokenizer and a tiny model of these shapes, saved to a
    fresh folder that every variant loads its own copy from.

    `vocab` larger than the tokenizer's pads the lm_head (and embeddings) to that many rows: rows the data never uses
    still cost what a real vocabulary costs in the head. The padding is seeded, so every run builds the same model.
    """
    import torch

    from hf_plugins.testing import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_tiny_model(
        tokenizer,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=intermediate,
    )
    if vocab and vocab > len(tokenizer):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.resize_token_embeddings(vocab, mean_resizing=False)
    folder = tempfile.mkdtemp(prefix="bench-model-")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer, model.get_output_embeddings().weight.shape[0]


def make_trainer(
    trainer_cls, model, dataset, tokenizer=None, *, config_cls=None, peft_config=None, seed=None, **config
):
    """A trainer of a timed benchmark.

    Its config (`config_cls`, default `trainer_cls.config_class`) takes `hf_plugins.testing.CPU_TRAINING_ARGS` (fast,
    quiet, reproducible, on CPU), learning rate 1e-4, no progress bar, no printed logs and a fresh output folder, then
    `config`. `model` is a model or a folder (loaded in float32; the tokenizer then defaults to the folder's); `seed`
    seeds torch first (LoRA's adapter initialisation); `peft_config` goes to the trainer.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

    from hf_plugins.testing import CPU_TRAINING_ARGS

    if seed is not None:
        torch.manual_seed(seed)
    if isinstance(model, (str, os.PathLike)):
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model)
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    config_cls = config_cls if config_cls is not None else trainer_cls.config_class
    args = config_cls(
        **{
            **CPU_TRAINING_ARGS,
            "learning_rate": 1e-4,
            "disable_tqdm": True,
            "output_dir": tempfile.mkdtemp(prefix=f"bench-{trainer_cls.__name__}-"),
            **config,
        }
    )
    extra = {} if peft_config is None else {"peft_config": peft_config}
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, **extra)
    # no log dicts on stdout, which holds the results (the trainer's log_history keeps them)
    trainer.remove_callback(PrinterCallback)
    return trainer


def lora_config():
    """The LoRA setup the LoRA benchmarks time: rank 8 on every linear layer."""
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")


def add_step_arguments(parser, vocab: int = 0, batch_size: bool = True) -> None:
    """The model, data and timing options of the `training_step` benchmarks (otr_step.py, poft_step.py, uds.py)."""
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--vocab", type=int, default=vocab, help="pad the lm_head to this many rows (0: the tokenizer's)"
    )
    if batch_size:
        parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batches", type=int, default=6, help="distinct batches, each timed on every variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)


def step_data(args, batch_size: int):
    """The model folder (hidden `--hidden`, 4 heads, 2 KV heads, MLP 4 x hidden), its tokenizer and vocabulary size,
    and `--batches` batches of `batch_size` conversations, built once and shared by every variant."""
    from hf_plugins.testing import tiny_conversational_dataset

    folder, tokenizer, vocab = tiny_model_folder(args.hidden, args.layers, 4, 2, 4 * args.hidden, args.vocab)
    return folder, tokenizer, vocab, tiny_conversational_dataset(batch_size * args.batches, seed=1)


def step_trainer(trainer_cls, args, folder, tokenizer, dataset, batch_size: int, **config):
    """A trainer whose `training_step` the step benchmarks time: full fine-tuning on the GPU when there is one."""
    return make_trainer(
        trainer_cls,
        folder,
        dataset,
        tokenizer,
        use_cpu=not cuda_available(),
        per_device_train_batch_size=batch_size,
        max_length=args.max_length,
        assistant_only_loss=True,
        **config,
    )


def first_batches(trainer, count: int, prepare: bool = False) -> list:
    """The first `count` batches of `trainer`'s training dataloader (with `prepare`, through `_prepare_inputs`)."""
    loader = iter(trainer.get_train_dataloader())
    batches = [next(loader) for _ in range(count)]
    return [trainer._prepare_inputs(batch) for batch in batches] if prepare else batches


def supervised_tokens(batch) -> int:
    """The tokens the loss is taken over (labels shifted by one, not ignored): `num_items_in_batch` of a step."""
    return int((batch["labels"][:, 1:] != -100).sum())  # -100: the label transformers' losses ignore


def timed_step(trainer, batch, num_items) -> float:
    """Seconds (`clock`) of one forward + backward of `trainer` on `batch`, the part of a step the loss changes (the
    optimizer update is the same for every variant and would only dilute a ratio)."""
    elapsed, _ = timed(lambda: trainer.training_step(trainer.model, batch, num_items))
    trainer.model.zero_grad(set_to_none=True)
    return elapsed


# ------------------------------------------------------------------------------------------------- loss head
def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[name]


def head_inputs(
    rows: int, vocab: int, hidden: int, dtype="float32", seed: int = 0, scale: float | None = None, device: str = "cpu"
):
    """`({"hidden": [N, D], "weight": [V, D], "labels": [N]}, generator)`: random inputs of a loss head.

    hidden and weight are leaves that require grad, drawn in that order (then the labels) from one generator seeded
    `seed` on `device`, which is returned so the caller can draw further inputs from the same stream. The weight is
    scaled by `scale` (default `D ** -0.5`: logits ~N(0, 1)) in place, which keeps the setup's transient peak low.
    """
    import torch

    dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    scale = hidden**-0.5 if scale is None else scale
    generator = torch.Generator(device=device).manual_seed(seed)
    inputs = {
        "hidden": torch.randn(rows, hidden, device=device, generator=generator).to(dtype).requires_grad_(),
        "weight": torch.randn(vocab, hidden, device=device, generator=generator)
        .mul_(scale)
        .to(dtype)
        .requires_grad_(),
        "labels": torch.randint(0, vocab, (rows,), device=device, generator=generator),
    }
    return inputs, generator


def head_buffers(rows: int, vocab: int, hidden: int, dtype, device: str = "cpu") -> dict:
    """Preallocated outputs of the three matmuls of a loss head (`head_matmuls`)."""
    import torch

    return {
        "logits": torch.empty(rows, vocab, device=device, dtype=dtype),
        "grad_hidden": torch.empty(rows, hidden, device=device, dtype=dtype),
        "grad_weight": torch.empty(vocab, hidden, device=device, dtype=dtype),
    }


def head_matmuls(hidden, weight, grad_logits, logits, grad_hidden, grad_weight) -> None:
    """The floor of a loss head: its three matmuls done bare into preallocated buffers (`logits = h @ W.T`,
    `grad_hidden = G @ W`, `grad_weight = G.T @ h`), with `grad_logits` standing for G."""
    import torch

    torch.mm(hidden, weight.t(), out=logits)
    torch.mm(grad_logits, weight, out=grad_hidden)
    torch.mm(grad_logits.t(), hidden, out=grad_weight)


# ----------------------------------------------------------------------------------------- workers and output
RESULT = "RESULT "


def report_result(result: dict) -> None:
    """The last line of a worker process: its result, for `run_worker`."""
    print(RESULT + json.dumps(result), flush=True)


def run_worker(argv: list, label: str, env: dict | None = None) -> dict:
    """Run `python argv...` in a fresh interpreter and return the result it reported (`report_result`)."""
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{label} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT) :])


def write_json(path: str | None, data, indent: int = 2) -> str:
    """`data` as JSON text; also written to `path` when one is given."""
    text = json.dumps(data, indent=indent)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    return text


def write_text(path: str | None, text: str) -> None:
    if path:
        with open(path, "w") as f:
            f.write(text)


def table(header: list, rows: list, markdown: bool = True, align: str | None = None) -> str:
    """A table of strings: markdown (`align`: one letter a column, `r` right-aligns it) or plain, right-justified."""
    if markdown:
        rule = ["---:" if align and align[i] == "r" else "---" for i in range(len(header))]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- evidence scripts (*_quality.py)
def add_evidence_arguments(parser, threads: int = 1, plot: bool = True) -> None:
    """The arguments every evidence script takes: the model, the seed, the thread count, the JSON (and PNG) outputs."""
    parser.add_argument("--model", default=None, help="local folder or Hub id; default: the demo's SmolLM2-135M")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--output", default=None, help="also write the JSON result here")
    if plot:
        parser.add_argument("--plot", default=None, help="write the PNG figure here")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed); matplotlib is the `bench` extra."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, title: str) -> None:
    """Title the figure, lay it out and write it as a PNG."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_evidence(args, run, plot=None) -> dict:
    """An evidence script's run: `run(args)` gives the results, which are written with the settings, the machine and
    the wall time as JSON (to `--output`, and printed), and drawn by `plot(report, path)` when `--plot` is given.
    Returns the report."""
    setup(args.threads, quiet=True)
    started = time.time()
    results = run(args)
    report = {
        "config": vars(args),
        "device": device_label(args.threads),
        "model_name": "SmolLM2-135M-Instruct" if args.model is None else args.model,
        "wall_seconds": time.time() - started,
        "results": results,
    }
    print(write_json(args.output, report))
    if plot is not None and getattr(args, "plot", None):
        plot(report, args.plot)
    return report
