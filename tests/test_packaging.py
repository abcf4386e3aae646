"""What the package promises beyond its API: the type-checking view of the lazy exports, the optional heavy
dependencies (bitsandbytes, Liger-Kernel and Triton are never needed on the CPU path), the shipped files, and a
logger that works inside and outside a trainer."""

import ast
import importlib
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import hf_plugins
from hf_plugins.cli import main
from hf_plugins.testing import tiny_conversational_dataset


ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("bitsandbytes", "liger_kernel", "triton")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )


def type_checking_imports() -> dict[str, str]:
    """`{name: module}` of the imports under `if TYPE_CHECKING:` in `hf_plugins/__init__.py`."""
    tree = ast.parse((ROOT / "hf_plugins" / "__init__.py").read_text())
    blocks = [n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING"]
    assert len(blocks) == 1
    return {
        alias.asname or alias.name: "." * node.level + (node.module or "")
        for node in blocks[0].body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }


def test_type_checkers_see_every_lazy_export_as_what_it_is():
    imports = type_checking_imports()
    assert set(imports) == set(hf_plugins.__all__) - {"__version__"}
    for name, module in imports.items():
        assert getattr(importlib.import_module(module, "hf_plugins"), name) is getattr(hf_plugins, name), name


def test_package_files():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert (ROOT / "hf_plugins" / "py.typed").is_file()
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["hf_plugins"]
    assert pyproject["project"]["license"] == {"text": "Apache-2.0"}
    assert (ROOT / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "## Unreleased" in (ROOT / "CHANGELOG.md").read_text()


def test_heavy_backends_are_extras_that_the_tests_install():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = " ".join(project["dependencies"])
    extras = project["optional-dependencies"]
    assert "bitsandbytes" not in required and "liger-kernel" not in required
    assert any(r.startswith("bitsandbytes") for r in extras["qlora"])
    assert any(r.startswith("liger-kernel") for r in extras["gpu"])
    assert set(extras["qlora"] + extras["gpu"]) <= set(extras["all"])
    assert set(extras["qlora"] + extras["gpu"]) <= set(extras["dev"])  # CI runs the QLoRA and interpreter tests


def test_cpu_path_runs_without_the_optional_backends(tmp_path):
    """With bitsandbytes, Liger-Kernel and Triton unimportable, every public name imports and the fused SFT and ASFT
    trainers train on a CPU (the `chunked` head)."""
    result = run_python(
        f"""
        import sys
        for name in {OPTIONAL!r}:
            sys.modules[name] = None  # `import name` raises ImportError, as when it is not installed
        import hf_plugins, hf_plugins.quantization
        for name in hf_plugins.__all__:
            getattr(hf_plugins, name)
        from hf_plugins import ASFTConfig, ASFTTrainer, FusedSFTConfig, FusedSFTTrainer
        from peft import LoraConfig
        from hf_plugins.testing import CPU_TRAINING_ARGS, build_tiny_model, build_tokenizer, tiny_conversational_dataset
        tokenizer = build_tokenizer()
        for trainer_cls, config_cls in ((FusedSFTTrainer, FusedSFTConfig), (ASFTTrainer, ASFTConfig)):
            args = config_cls(output_dir={str(tmp_path)!r}, max_steps=2, **CPU_TRAINING_ARGS)
            trainer = trainer_cls(
                model=build_tiny_model(tokenizer), args=args, train_dataset=tiny_conversational_dataset(8),
                processing_class=tokenizer,
                peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'], task_type='CAUSAL_LM'),
            )
            trainer.train()
        print("trained")
        """,
        TRITON_INTERPRET="0",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "trained"


def test_load_in_4bit_without_bitsandbytes_is_one_line(capsys, monkeypatch, tiny_model_dir, tmp_path):
    data = tmp_path / "chat"
    tiny_conversational_dataset(4).save_to_disk(str(data))
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed, as far as `import` can tell
    for flag in ("--load_in_4bit", "--load_in_8bit"):
        code = main(
            [
                "sft",
                "--model_name_or_path",
                tiny_model_dir,
                "--dataset_name",
                str(data),
                "--output_dir",
                str(tmp_path),
                "--use_peft",
                "True",
                flag,
                "True",
                "--use_cpu",
                "True",
                "--bf16",
                "False",
            ]
        )
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert flag in err and "pip install 'hf-plugins[qlora]'" in err, err


def test_logger_works_before_any_accelerate_state():
    """A library function called outside a trainer logs (accelerate's own logger would raise a RuntimeError)."""
    result = run_python(
        """
        import logging
        from accelerate.state import PartialState
        from hf_plugins.utils import get_logger

        logging.basicConfig(level=logging.INFO, format="%(name)s:%(funcName)s:%(message)s")
        def caller():
            logger = get_logger("hf_plugins.example")
            logger.info("main process: %d", 1)
            logger.info("every process", main_process_only=False)
        caller()
        assert not PartialState._shared_state  # logging did not set up the distributed state
        PartialState()
        caller()
        """
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("hf_plugins.example")]
    # the records name the caller, not the logging helper; once there is a state, with accelerate's rank prefix
    assert lines == [
        "hf_plugins.example:caller:main process: 1",
        "hf_plugins.example:caller:every process",
        "hf_plugins.example:caller:[RANK 0] main process: 1",
        "hf_plugins.example:caller:[RANK 0] every process",
    ]
