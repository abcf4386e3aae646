"""The README's quickstart is two command lines, and CI runs its test line exactly as a user types it."""

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quickstart_has_a_demo_line_and_a_test_line():
    demo, tests = quickstart_commands()
    assert demo.startswith("python3.11 -m venv .venv") and demo.endswith("hf-plugins demo")
    assert tests.startswith("python3.11 -m venv .venv") and tests.endswith("python -m pytest")


def test_ci_runs_the_readme_test_line_as_typed():
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert quickstart_commands()[1] in ci_lines
    # nothing in CI's own environment that a user would not have: the suite sets its defaults itself (conftest.py)
    assert not any(line.startswith("export ") for line in ci_lines)


def test_ci_lints_before_the_tests_with_the_pinned_ruff():
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    lint = next(i for i, line in enumerate(ci_lines) if "ruff check ." in line and "ruff format --check ." in line)
    assert lint < ci_lines.index(quickstart_commands()[1])
    pinned = re.search(r'"(ruff==[0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f'"{pinned}"' in ci_lines[lint]
    hook = re.search(r"ruff-pre-commit\n\s+rev: v([0-9.]+)", (ROOT / ".pre-commit-config.yaml").read_text()).group(1)
    assert pinned == f"ruff=={hook}"
