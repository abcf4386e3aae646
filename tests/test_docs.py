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


METHODS = REPO_ROOT / "docs" / "methods"
#: Method pages with a `## Example` section: its first Python block runs as written
EXAMPLE_PAGES = sorted(page.stem for page in METHODS.glob("*.md") if "\n## Example\n" in page.read_text())


def test_every_method_page_has_an_example_and_is_listed_in_the_readme():
    readme = (REPO_ROOT / "README.md").read_text()
    for page in METHODS.glob("*.md"):
        assert f"(docs/methods/{page.name})" in readme, f"README's list of pages leaves out {page.name}"
    assert {"fused_sft", "asft", "otr", "tl_training", "roste", "uds"} <= set(EXAMPLE_PAGES)


#: Pages of tools that run after training (no trainer in their example)
TOOL_PAGES = {"merging"}


@pytest.mark.parametrize("page", EXAMPLE_PAGES)
def test_method_page_example_runs_as_written(page, tmp_path, monkeypatch):
    import math

    from testing_utils import logged

    text = (METHODS / f"{page}.md").read_text()
    code = text.split("\n## Example\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__doc_example__"}
    exec(compile(code, f"docs/methods/{page}.md", "exec"), namespace)  # the RoSTE example asserts its own export
    if page in TOOL_PAGES:  # no trainer: the example loads what it wrote
        return
    trainer = namespace["trainer"]
    assert trainer.state.global_step == trainer.args.max_steps
    losses = logged(trainer)
    assert losses and all(math.isfinite(loss) for loss in losses)
    if page == "uds":
        assert logged(trainer, "uds/selected_fraction") == [0.25] * trainer.args.max_steps
