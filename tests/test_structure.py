"""The shape of the code a new method relies on: one registry of the methods (`hf_plugins.trainers.TRAINERS`) behind
the command line, the demo, the exports, the docs and the examples; imports that flow one way, without cycles."""

import ast
import graphlib
import importlib
import pprint
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hf_plugins
from hf_plugins import cli
from hf_plugins.trainers import TRAINERS


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_plugins"

# ------------------------------------------------------------------------------------------------------ registry


@pytest.mark.parametrize("command", list(TRAINERS))
def test_trainer_declares_its_own_command(command):
    trainer = TRAINERS[command]
    # on the class itself: a trainer that inherited them would take over its parent's command and description
    for name in ("command", "description", "config_class"):
        assert name in vars(trainer), f"{trainer.__name__} must set `{name}` itself"
    assert trainer.command == command
    assert "\n" not in trainer.description and len(trainer.description) <= 90, "one line of `hf-plugins --help`"


def test_import_free_index_is_the_registry():
    """`hf_plugins._TRAIN_COMMANDS` names the methods without importing the trainers; it must say what they say."""
    expected = {
        command: (trainer.config_class.__name__, trainer.__name__, trainer.description)
        for command, trainer in TRAINERS.items()
    }
    assert list(hf_plugins._TRAIN_COMMANDS.items()) == list(expected.items()), (
        "hf_plugins/__init__.py: set _TRAIN_COMMANDS to\n" + pprint.pformat(expected, width=119, sort_dicts=False)
    )


def test_package_and_command_line_load_without_the_trainers():
    """`import hf_plugins`, `hf-plugins --help` and a mistyped command stay fast: no trainer, TRL or transformers."""
    code = (
        "import sys, hf_plugins, hf_plugins.cli as cli; cli.usage(); hf_plugins.__all__; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trl', 'transformers', 'torch') "
        "or m.startswith('hf_plugins.trainers')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "[]", result.stdout[:500]


@pytest.mark.parametrize("command", list(TRAINERS))
def test_every_method_has_its_export_command_and_example(command, capsys):
    trainer = TRAINERS[command]
    for cls in (trainer, trainer.config_class):
        assert cls.__name__ in hf_plugins.__all__ and getattr(hf_plugins, cls.__name__) is cls
    assert [command, trainer.description] in [line.split(maxsplit=1) for line in cli.usage().splitlines()]
    assert cli.main([command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the description
    assert f"usage: hf-plugins {command}" in out and trainer.description in out
    for example in (f"configs/{command}.yaml", f"accelerate/launch_{command}.sh"):
        assert (ROOT / "examples" / example).is_file(), f"examples/{example} is missing"


def _table_row(path: Path, needle: str) -> str:
    rows = [line for line in path.read_text().splitlines() if line.startswith("|") and needle in line]
    assert len(rows) == 1, f"{path.relative_to(ROOT)}: one table row should name {needle}, found {len(rows)}"
    return rows[0]


@pytest.mark.parametrize("command", list(TRAINERS))
def test_every_method_has_its_docs(command):
    trainer = TRAINERS[command]
    pair = f"`{trainer.__name__}` / `{trainer.config_class.__name__}`"
    # the overview table of the docs: the classes, the command and the method's page
    row = _table_row(ROOT / "docs" / "index.md", pair)
    assert f"`hf-plugins {command}`" in row, f"docs/index.md: the row of {pair} should name `hf-plugins {command}`"
    pages = re.findall(r"\]\(methods/(\w+)\.md\)", row)
    assert len(pages) == 1, f"docs/index.md: the row of {pair} should link its page docs/methods/<page>.md"
    page = ROOT / "docs" / "methods" / f"{pages[0]}.md"
    assert page.is_file() and trainer.__name__ in page.read_text(), f"{page.relative_to(ROOT)} documents {pair}"
    assert f"](docs/methods/{page.name})" in _table_row(ROOT / "README.md", pair), f"README.md links {page.name}"
    assert f"| `{command}` | {pair}" in (ROOT / "docs" / "cli.md").read_text(), "docs/cli.md's table of commands"
    reference = (ROOT / "docs" / "api" / "trainers.md").read_text()
    for cls in (trainer, trainer.config_class):
        assert f"::: hf_plugins.trainers.{cls.__name__}\n" in reference, f"docs/api/trainers.md: {cls.__name__}"


def test_demo_offers_registered_methods():
    from hf_plugins.demo.run import METHODS, build_parser

    assert {"sft", "asft", "otr"} <= set(METHODS) <= set(TRAINERS)
    assert all(METHODS[command] is TRAINERS[command] for command in METHODS)
    (method_option,) = [action for action in build_parser()._actions if action.dest == "method"]
    assert list(method_option.choices) == sorted(METHODS)


# ------------------------------------------------------------------------------------------------------ imports

#: The layers, top to bottom, each with the modules and packages of hf_plugins in it (a dotted name picks a module out
#: of its package): a module imports modules of its own layer or of the layers below, never above. (`hf_plugins` itself
#: holds the lazy top-level exports.) The fused head's entry point, `ops.dispatch`, resolves a method given by name
#: among `hf_plugins.losses`, whose methods are written against the rest of `ops` (the method interface and backends):
#: it sits above the method math, the rest of the head below it.
LAYERS = {
    "entry points": (
        "hf_plugins",
        "cli",
        "cli_checks",
        "training_script",
        "merge_command",
        "comparison",
        "demo",
        "testing",
    ),
    "trainers": ("trainers",),
    "method parts": ("data", "callbacks", "merging", "quantization", "rewards", "modeling", "chat_templates"),
    "fused loss head entry point": ("ops.dispatch",),
    "method math": ("losses",),
    "fused loss head": ("ops",),
    "utilities": ("utils",),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str | None:
    if module == "hf_plugins":
        return "entry points"
    parts = module.split(".")[1:]
    # the most specific entry first: `ops.dispatch` before `ops`
    for depth in range(len(parts), 0, -1):
        name = ".".join(parts[:depth])
        layer = next((layer for layer, members in LAYERS.items() if name in members), None)
        if layer is not None:
            return layer
    return None


def _rank(module: str) -> int:
    return list(LAYERS).index(_layer(module))


def _statements(tree, package_init: bool = False):
    """Every node, but for what is under `if TYPE_CHECKING:` (never run) and, in a package's `__init__.py`, the body
    of its module-level `__getattr__` (its lazy exports, loaded on first use: counted where they are used)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            stack.extend(node.orelse)
            continue
        if package_init and isinstance(node, ast.FunctionDef) and node.name == "__getattr__" and node in tree.body:
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _lazy_exports(package: str) -> dict[str, str]:
    """A package's lazy exports: name -> the submodule that defines it (`hf_plugins._EXPORTS`,
    `hf_plugins.ops._LAZY_EXPORTS`)."""
    if package == "hf_plugins":
        return hf_plugins._EXPORTS
    if package == "hf_plugins.ops":
        return importlib.import_module("hf_plugins.ops")._LAZY_EXPORTS
    return {}


_DYNAMIC_IMPORTS = ("importlib.import_module", "import_module", "__import__")


def _imports(module: str) -> tuple[set[str], list[str]]:
    """The hf_plugins modules `module` imports, at module level or in a function, and the dynamic imports
    (`importlib.import_module` of a name that is not a literal) it makes."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names, dynamic = [], []
    tree = ast.parse(path.read_text(), str(path))
    for node in _statements(tree, package_init=path.name == "__init__.py"):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for alias in node.names:
                # `from package import name` imports the submodule `package.name` when there is one; a lazy
                # top-level export, the module it comes from
                lazy = _lazy_exports(base)
                if alias.name in lazy:
                    names.append(f"{base}.{lazy[alias.name]}")
                else:
                    names.append(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in _DYNAMIC_IMPORTS:
            argument = node.args[0] if node.args else None
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                names.append(argument.value if not argument.value.startswith(".") else package + argument.value)
            else:
                dynamic.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    imported = set()
    for name in names:
        if name == "hf_plugins" or name.startswith("hf_plugins."):
            # importing a.b.c runs a.b's __init__ too (hf_plugins' own, which every module runs, imports nothing)
            parts = name.split(".")
            imported.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    # the module's own packages are already being imported when it runs
    return {name for name in imported if not (module == name or module.startswith(name + "."))}, dynamic


GRAPH = {module: _imports(module)[0] for module in MODULES}


def test_every_module_has_a_layer():
    assert [module for module in MODULES if _layer(module) is None] == [], "add the new module to LAYERS"


#: Modules that import the user's own code by a name given at run time (not hf_plugins modules), with why
USER_CODE_IMPORTS = {
    "hf_plugins.training_script": "`--reward_funcs my_module.my_reward`: reward functions by import path, as `trl grpo`",
}


def test_imports_are_static():
    """No import hides from the checks below: only the lazy exports of hf_plugins/__init__.py import at run time, and
    the modules of USER_CODE_IMPORTS import user code named on the command line."""
    dynamic = [
        site for module in MODULES if module != "hf_plugins" and module not in USER_CODE_IMPORTS
        for site in _imports(module)[1]
    ]  # fmt: skip
    assert dynamic == []
    assert all(_imports(module)[1] for module in USER_CODE_IMPORTS), "remove modules that no longer import user code"


def test_imports_flow_down():
    upward = [
        f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
        for module, targets in GRAPH.items()
        if _layer(module)  # the others fail test_every_module_has_a_layer
        for target in sorted(targets)
        if _layer(target) and _rank(target) < _rank(module)
    ]
    assert upward == [], "\n".join(upward)


def test_no_import_cycles():
    try:
        graphlib.TopologicalSorter(GRAPH).prepare()
    except graphlib.CycleError as error:
        # graphlib lists each module before the modules that import it
        pytest.fail(f"import cycle: {' imports '.join(reversed(error.args[1]))}")
