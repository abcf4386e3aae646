"""The harness the tests share: constants, random loss-head inputs, the value-and-gradients comparison, the tiny
trainer, its logs, checkpoints and parameters, subprocess runs, and the memory probe of the loss heads.

The offline fixtures themselves (tiny model, tokenizer, datasets, `CPU_TRAINING_ARGS`) are public, in
`hf_plugins.testing`, since docs, examples and benchmarks use them too; what is here serves the tests alone. The
test files import it as `from testing_utils import ...` (pytest puts `tests/` on `sys.path`: it has no
`__init__.py`).
"""

import json
import os
import subprocess
import sys
import tempfile
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_plugins.testing import CPU_TRAINING_ARGS, tiny_conversational_dataset
from hf_plugins.utils import interpreter_enabled


IGNORE = -100
F64 = torch.float64
#: Every backend of the fused head that runs on a CPU (Triton under its interpreter)
BACKENDS = ("chunked", "reference", "triton")
#: The trainer tests' base configuration: a tiny run on CPU, quiet, at a learning rate that moves the tiny model
CPU_ARGS = dict(**CPU_TRAINING_ARGS, learning_rate=5e-3, disable_tqdm=True)
#: LoRA dropout of TRL's CLI (`lora_dropout=0.05`). Resume tests train with it (or with the model's own dropout) as
#: well as without: with dropout on, a resumed run gives the uninterrupted run's losses only if every random draw of a
#: step (the dropout masks of every forward included) continues from the checkpoint's state.
CLI_LORA_DROPOUT = 0.05
#: The command prefix that runs a script on 2 CPU processes (gloo)
#: GRPO's replayed completions are this many tokens at most (`hf_plugins.testing.ReplayedCompletions`)
GRPO_MAX_COMPLETION = 8
#: GRPO trainers in the tests: 2 steps of 2 prompts x 2 generations. Plain SGD keeps parameter comparisons
#: meaningful (Adam turns float32 noise in TRL's near-zero gradients into full-size steps of either sign); at 0.5 the
#: ratios leave the clip range on both sides by the second step
GRPO_ARGS = dict(
    **CPU_TRAINING_ARGS,
    max_steps=2,
    per_device_train_batch_size=4,
    num_generations=2,
    max_completion_length=GRPO_MAX_COMPLETION,
    optim="sgd",
    learning_rate=0.5,
    disable_dropout=True,
    disable_tqdm=True,
)
#: What a command-line run on a CPU needs besides its own arguments: float32, no gradient checkpointing (TRL's
#: default is on), no reports, no checkpoints, data loading in the process
CLI_CPU_FLAGS = [
    "--bf16",
    "False",
    "--use_cpu",
    "True",
    "--gradient_checkpointing",
    "False",
    "--report_to",
    "none",
    "--save_strategy",
    "no",
    "--dataloader_num_workers",
    "0",
]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
ON_GPU = torch.cuda.is_available()
#: Skips a test of the Triton backend where it cannot run: it needs a GPU or Triton's interpreter (which conftest.py
#: turns on where there is no GPU)
needs_triton = pytest.mark.skipif(
    not (ON_GPU or interpreter_enabled()), reason="needs a GPU or the Triton interpreter"
)


# ------------------------------------------------------------------------------------------- random head inputs


def gen(seed):
    """A CPU generator seeded with `seed`."""
    return torch.Generator().manual_seed(seed)


def random_linear(generator, shape, V, D, *, bias=True, scale=2.0):
    """float64 hidden states [*shape, D], an lm_head weight [V, D] whose logits have a std of about `scale` (a
    non-trivial softmax) and a bias [V] (None without `bias`), drawn from `generator` in that order."""
    hidden = torch.randn(*shape, D, generator=generator, dtype=F64)
    weight = torch.randn(V, D, generator=generator, dtype=F64) * (scale / D**0.5)
    b = torch.randn(V, generator=generator, dtype=F64) if bias else None
    return hidden, weight, b


def random_labels(generator, shape, V, ignore_frac=0.25):
    """Token ids [*shape] in [0, V), about `ignore_frac` of them -100."""
    labels = torch.randint(0, V, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < ignore_frac] = IGNORE
    return labels


def as_leaves(*tensors, dtype=F64, device=None):
    """Each tensor as a leaf of `dtype` (on `device`) that requires grad; None stays None."""
    return tuple(None if t is None else t.to(device=device, dtype=dtype).requires_grad_(True) for t in tensors)


def make_inputs(
    shape, V=37, D=8, *, dtype=F64, device=None, bias=True, seed=0, ignore_frac=0.25, scale=2.0, generator=None
):
    """Leaves hidden [*shape, D], weight [V, D] and bias [V] (see `random_linear`) of `dtype` on `device`, and labels
    [*shape] (some -100, on the CPU). Drawn from `generator` when given (it goes on for the caller's own inputs),
    else from one seeded with `seed`."""
    g = gen(seed) if generator is None else generator
    hidden, weight, b = random_linear(g, shape, V, D, bias=bias, scale=scale)
    labels = random_labels(g, shape, V, ignore_frac)
    return (*as_leaves(hidden, weight, b, dtype=dtype, device=device), labels)


def leaves(*tensors):
    """The tensors that are not None (an lm_head without bias has none)."""
    return [t for t in tensors if t is not None]


def logits_of(hidden, weight, bias=None):
    """The materialised logits the fused head never builds."""
    return hidden @ weight.t() + (bias if bias is not None else 0.0)


def per_sequence_weighted_mean(logits, labels, weights):
    """TL-Training's per-sample reduction, written out: per sequence sum(w * nll) / sum(w), then the mean over
    sequences."""
    losses = []
    for b in range(labels.shape[0]):
        mask = labels[b] != IGNORE
        nll = torch.nn.functional.cross_entropy(logits[b][mask], labels[b][mask], reduction="none")
        losses.append((weights[b][mask] * nll).sum() / weights[b][mask].sum())
    return torch.stack(losses).mean()


# ------------------------------------------------------------------------------------- value and gradients


#: A loss, its gradients w.r.t. the inputs that require grad (None for one it does not depend on), and whatever else
#: the loss function returned with it
LossAndGrads = namedtuple("LossAndGrads", ["loss", "grads", "extra"])


def loss_and_grads(fn, inputs, upstream=1.0, allow_unused=False):
    """Call `fn(*inputs)` (a scalar loss, or `(loss, extra)`) and differentiate `upstream * loss` w.r.t. the inputs
    that require grad (an error where the loss does not depend on one, unless `allow_unused`: then its gradient is
    None)."""
    out = fn(*inputs)
    loss, extra = out if isinstance(out, tuple) else (out, None)
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(upstream * loss, wrt, allow_unused=allow_unused)
    return LossAndGrads(loss.detach(), grads, extra)


def float64_copies(inputs):
    """Detached float64 copies of the floating-point tensors (bf16/fp32 values upcast exactly), requiring grad where
    the originals do; everything else as it is."""
    return tuple(
        t.detach().to(F64).requires_grad_(t.requires_grad)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
        else t
        for t in inputs
    )


def assert_close_loss_and_grads(actual, expected, *, rtol, atol, grad_rtol=None, grad_atol=None):
    """`(loss, grads)` pairs agree, compared in float64 (the gradients at `grad_rtol`/`grad_atol`, by default the
    loss's tolerances)."""
    grad_tol = dict(rtol=rtol if grad_rtol is None else grad_rtol, atol=atol if grad_atol is None else grad_atol)
    torch.testing.assert_close(actual[0].detach().to(F64), expected[0].detach().to(F64), rtol=rtol, atol=atol)
    assert len(actual[1]) == len(expected[1])
    for grad, exp in zip(actual[1], expected[1]):
        torch.testing.assert_close(grad.to(F64), exp.to(F64), **grad_tol)


def assert_matches(actual_fn, expected_fn, inputs, *, rtol, atol, grad_rtol=None, grad_atol=None, upstream=1.0):
    """`actual_fn(*inputs)` equals `expected_fn` (the materialised-logits reference) run on float64 copies of
    `inputs`, in value and in the gradients w.r.t. every input that requires grad; each gradient has its input's
    dtype and shape, and no gradient reaches an input the reference does not differentiate (it detaches it).

    Each function returns the scalar loss or `(loss, extra)`. Returns the two `LossAndGrads`, actual first.
    """
    actual = loss_and_grads(actual_fn, inputs, upstream, allow_unused=True)
    expected = loss_and_grads(expected_fn, float64_copies(inputs), upstream, allow_unused=True)
    assert actual.loss.dim() == 0
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    for grad, exp, leaf in zip(actual.grads, expected.grads, wrt, strict=True):
        if exp is None:
            assert grad is None, "a gradient reached an input the loss is constant in"
        else:
            assert grad is not None and grad.dtype == leaf.dtype and grad.shape == leaf.shape
    differentiated = [(g, e) for g, e in zip(actual.grads, expected.grads) if e is not None]
    assert_close_loss_and_grads(
        (actual.loss, [g for g, _ in differentiated]),
        (expected.loss, [e for _, e in differentiated]),
        rtol=rtol,
        atol=atol,
        grad_rtol=grad_rtol,
        grad_atol=grad_atol,
    )
    return actual, expected


def one_block_per_row(monkeypatch):
    """Under Triton's interpreter, which loops in Python, vocabulary blocks of 1024, so that one block covers a row of
    the tiny model's 384 tokens: for the tests that train with the Triton backend. On a GPU the real block sizes."""
    if not ON_GPU:
        from hf_plugins.ops.triton import head

        monkeypatch.setattr(head, "DEFAULT_BLOCK_V", 1024)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op returns inside it (forward and backward, inside
    autograd Functions too): the check that a loss head never builds `[N, V]` logits. It also records the output
    shape of every matrix product (`matmul_outputs`), to count a head's matmuls, and the element count of every
    tensor an op allocates (`allocated`: outputs that share no storage with the op's inputs, so neither views nor
    in-place or `out=` results), to count a head's tile allocations.

        with LargestTensor() as tracker:
            fused_linear_loss(hidden, weight, labels, "sft").backward()
        assert tracker.largest < N * V
    """

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.matmul_outputs = []
        self.allocated = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.matmul_outputs.append(tuple(out.shape))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.untyped_storage().data_ptr() not in inputs:
                    self.allocated.append(t.numel())
        return out


# ------------------------------------------------------------------------------------------------- trainers


def tiny_lora_config(lora_dropout: float = 0.0, **overrides):
    """The LoRA adapter the tests put on the tiny model: rank 4, alpha 8, on `q_proj` and `v_proj`."""
    from peft import LoraConfig

    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return LoraConfig(**{**settings, "lora_dropout": lora_dropout, **overrides})


def make_trainer(
    trainer_cls,
    config_cls,
    model_dir,
    output_dir,
    dataset=None,
    *,
    model=None,
    tokenizer=None,
    chat_template=None,
    eval_dataset=None,
    peft_config=None,
    init_seed=None,
    trainer_kwargs=None,
    **config,
):
    """A `trainer_cls` on the tiny model, configured by `config_cls(output_dir=output_dir, **config)` over `CPU_ARGS`
    and 3 steps. Test files fix their method's defaults with `functools.partial` (or a small wrapper) over this.

    Args:
        trainer_cls, config_cls: stock TRL's, one of ours, or a `with_uds` pair.
        model_dir: the folder of the tiny model and its tokenizer (`tiny_model_dir`), loaded with `from_pretrained`
            unless `model` / `tokenizer` give them.
        dataset: the training set; by default 32 conversations.
        chat_template: set on the tokenizer (`TOOL_CHAT_TEMPLATE` for TL-Training).
        init_seed: seeds torch's global generator before the model is built, so every trainer of a test gets the
            same adapter initialisation (PEFT draws it before the Trainer applies the config's `seed`).
        trainer_kwargs: more trainer arguments (`ref_model`, `callbacks`; a `peft_config` here wins).
        **config: config fields.
    """
    args = config_cls(output_dir=str(output_dir), **{**CPU_ARGS, "max_steps": 3, **config})
    if init_seed is not None:
        torch.manual_seed(init_seed)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=tiny_conversational_dataset(32) if dataset is None else dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        **{"peft_config": peft_config, **(trainer_kwargs or {})},
    )


def logged(trainer, key: str = "loss") -> list:
    """The values of `key` in `trainer`'s per-step log history (the end-of-training summary left out)."""
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


def logged_in(output_dir, key: str = "loss") -> list:
    """The per-step values of `key` a finished run saved in `output_dir/trainer_state.json` (a CLI or script run)."""
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return [entry[key] for entry in state["log_history"] if key in entry]


def train_and_list_changed_parameters(trainer) -> set[str]:
    """Run `trainer.train()` and return the names of the parameters whose values it changed."""
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    return {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}


def train_and_resume(make_trainer, output_dir, save_steps: int = 2):
    """Train `make_trainer(output_dir, save_strategy="steps", save_steps=save_steps)` to its end, then a fresh trainer
    made the same way from its checkpoint at step `save_steps`. Returns the resumed trainer and the checkpoint's
    path; compare the resumed trainer's steps after `save_steps` with an uninterrupted run's."""
    saving = dict(save_strategy="steps", save_steps=save_steps)
    first = make_trainer(output_dir, **saving)
    first.train()
    checkpoint = os.path.join(first.args.output_dir, f"checkpoint-{save_steps}")
    resumed = make_trainer(output_dir, **saving)
    resumed.train(resume_from_checkpoint=checkpoint)
    return resumed, checkpoint


def checkpointed_with_evaluation(make_trainer, output_dir, eval_steps: int = 1):
    """A plain run and one with gradient checkpointing and evaluation every `eval_steps` steps, from
    `make_trainer(output_dir, **overrides)`; asserts that neither changes the training losses and that every
    evaluation loss is finite, and returns the second trainer."""
    import math

    plain = make_trainer(Path(output_dir) / "plain")
    plain.train()
    busy = make_trainer(
        Path(output_dir) / "busy",
        eval_dataset=tiny_conversational_dataset(8, seed=1),
        gradient_checkpointing=True,
        eval_strategy="steps",
        eval_steps=eval_steps,
    )
    busy.train()
    assert logged(busy) == pytest.approx(logged(plain), abs=1e-6)
    eval_losses = logged(busy, "eval_loss")
    assert eval_losses and all(math.isfinite(x) for x in eval_losses)
    return busy


def uninterrupted_and_resumed(make_trainer, output_dir, save_steps: int = 2):
    """The same run twice: uninterrupted in `output_dir/full`, and interrupted after `save_steps` steps then resumed
    from that checkpoint in `output_dir/run` (`train_and_resume`). Returns both trainers and the checkpoint's path."""
    full = make_trainer(Path(output_dir) / "full")
    full.train()
    resumed, checkpoint = train_and_resume(make_trainer, Path(output_dir) / "run", save_steps)
    return full, resumed, checkpoint


def assert_packed_rows(padded, packed, packing, fewer_than):
    """`packed` (packed or padding-free) holds `padded`'s tokens, none truncated; packed, in fewer than `fewer_than`
    rows, at least one of which holds several sequences."""
    rows = packed.train_dataset
    assert sum(map(len, rows["input_ids"])) == sum(map(len, padded.train_dataset["input_ids"]))  # nothing truncated
    if packing:
        assert len(rows) < fewer_than and max(len(lengths) for lengths in rows["seq_lengths"]) > 1


def assert_same_parameters(expected, actual, *, atol=1e-5, rtol=1e-4):
    """The two trainers' models hold the same parameters, in order, to the tolerances (`None`: torch's defaults for
    the dtype); `expected`'s are the reference values."""
    for (name, p_expected), p_actual in zip(expected.model.named_parameters(), actual.model.parameters(), strict=True):
        torch.testing.assert_close(p_actual, p_expected, atol=atol, rtol=rtol, msg=name)


def run_script(command, timeout=300, env=None):
    """Run `command` (its parts are made strings) with one thread per process and the variables of `env` added; a
    failure fails the test with the end of its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run([str(part) for part in command], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        # the whole of stderr too (a crash report of several processes is longer than the message's tail)
        handle, path = tempfile.mkstemp(prefix="run-script-", suffix=".stderr.log")
        with os.fdopen(handle, "w") as log:
            log.write(done.stderr)
    assert done.returncode == 0, f"{done.stderr[-3000:]}\n(whole stderr: {path if done.returncode else ''})"
    return done
