"""Shared test settings and fixtures.

Thread settings are fixed before torch is imported: with two OpenMP threads on a two-core machine whose other core
is busy, small matmuls get hundreds of times slower.
"""

import os


os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")

import pytest  # noqa: E402
import torch  # noqa: E402


# Honour a thread count the user set (the suite must pass at 1, 2 or 4 threads: tolerances allow any reduction order)
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Without a GPU the Triton kernels run under Triton's interpreter; it must be on before any kernel module is imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def small_triton_blocks(monkeypatch):
    """Under the interpreter, vocabulary blocks of 16 so that the small test vocabularies span several blocks (the
    online log-sum-exp and the sampler's running CDF cross block boundaries); on a GPU the real block sizes."""
    if torch.cuda.is_available():
        return
    from hf_plugins.ops.triton import head

    monkeypatch.setattr(head, "DEFAULT_BLOCK_V", 16)
    monkeypatch.setattr(head, "SAMPLING_BLOCK_V", 16)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder holding a tiny Llama causal LM and its tokenizer, built offline once per test session. Its weights are
    float64, so models loaded from it train in float64: runs that reach the same numbers by different paths (another
    backend, batch split, process count or thread count) then agree to ~1e-12, where float32 rounding amplified by a
    few optimizer steps reaches 1e-5."""
    from hf_plugins.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama", dtype=torch.float64)


@pytest.fixture(scope="session")
def tiny_qwen2_model_dir(tmp_path_factory):
    """Folder holding a tiny Qwen2 causal LM and its tokenizer, built offline once per test session."""
    from hf_plugins.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2", dtype=torch.float64)


def save_sft_adapter(model_dir, folder, seed: int = 1) -> str:
    """An 'SFT' LoRA adapter on the model at `model_dir` (SRPPO's pi_SFT): random, non-zero weights, so that it
    differs from the base model (a fresh LoRA adapter is the base model exactly)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_sft_adapter_dir(tiny_model_dir, tmp_path_factory):
    """An SFT LoRA adapter on the tiny model (`save_sft_adapter`)."""
    return save_sft_adapter(tiny_model_dir, tmp_path_factory.mktemp("tiny-sft-adapter"))


@pytest.fixture
def tiny_tokenizer(tiny_model_dir):
    """A fresh tiny tokenizer per test, so changes one test makes to it (pad token, template) reach no other."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
