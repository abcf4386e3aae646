"""The documentation site builds in strict mode: every warning (a broken link or anchor, a page missing from the nav,
a docstring the API reference cannot parse) fails the build, as it does in CI."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason='mkdocs is not installed: install the docs extra (pip install -e ".[docs]") to build the documentation',
)
def test_docs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about its successor, not a warning
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"`mkdocs build --strict` failed (exit {result.returncode}):\n{output}"
    assert (tmp_path / "site" / "index.html").is_file(), output
    for page in ("api/trainers", "api/ops", "methods/asft", "loss_head", "benchmarks"):
        assert (tmp_path / "site" / page / "index.html").is_file(), f"{page} was not built:\n{output}"
