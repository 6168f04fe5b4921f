"""The house style's structural rules, checked on the source: sizes, the package layering, no import cycles.

Imports are read from the AST, function-level ones included (a lazy import that closes a cycle is still a
cycle); imports under ``if TYPE_CHECKING:`` are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fedrun", "unet", "slurm", "evaluation")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# Which packages each package may import. Only the CLI (the composition root) imports all four.
ALLOWED = {
    "unet": set(),
    "fedrun": {"unet"},
    "slurm": {"fedrun", "unet"},
    "evaluation": {"fedrun", "unet"},
}
COMPOSITION_ROOTS = {"fedrun.cli", "fedrun.__main__"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = list(f.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_pkg: bool) -> set[str]:
    """Every module of ours this one imports when it runs (absolute names)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in child.names)  # `from pkg import module`
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = _imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_modules_and_functions_are_small():
    """In the packages, and in the benchmarks and tests that go with them."""
    over = []
    extra = [f for d in ("benchmarks", "tests") for f in sorted((REPO / d).rglob("*.py"))]
    for path in [*_modules().values(), *extra]:
        src = path.read_text()
        if src.count("\n") > MAX_MODULE_LINES:
            over.append(f"{path.relative_to(REPO)}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    over.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not over, "over the house style's sizes:\n" + "\n".join(over)


def test_packages_import_only_downwards():
    bad = []
    for name, deps in _graph().items():
        if name in COMPOSITION_ROOTS:
            continue
        pkg = name.split(".")[0]
        for d in sorted(deps):
            other = d.split(".")[0]
            if (other != pkg and other not in ALLOWED[pkg]) or d in COMPOSITION_ROOTS:
                bad.append(f"{name} imports {d}")
    assert not bad, (
        "imports against the layering (unet <- fedrun <- slurm, evaluation <- fedrun.cli; "
        "nothing imports the CLI):\n" + "\n".join(bad)
    )


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles: list[list[str]] = []

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for d in sorted(graph[node]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                dfs(d, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    "src, module, expected",
    [
        ("from fedrun.methods import GROUPS\n", "fedrun.loop", {"fedrun.methods", "fedrun.methods.GROUPS"}),
        ("def f():\n    import evaluation.fid\n", "fedrun.x", {"evaluation.fid"}),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import slurm\n",
            "fedrun.x",
            {"typing", "typing.TYPE_CHECKING"},
        ),
        ("from . import dist\n", "fedrun.loop", {"fedrun", "fedrun.dist"}),
        ("from .layout import cuts\n", "fedrun.exchange", {"fedrun.exchange.layout", "fedrun.exchange.layout.cuts"}),
    ],
)
def test_import_reader(src, module, expected):
    """The reader the checks above rely on: function-level imports count, TYPE_CHECKING ones do not, and
    relative imports resolve against the module (or, for a package's __init__, the package itself)."""
    assert _imports(ast.parse(src), module, is_pkg=module == "fedrun.exchange") == expected
