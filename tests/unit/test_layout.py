"""The shape of the code: no import cycle between modules, and the README's layout table names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("trainer", "cluster", "data_prep")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = f.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of ours that ``name`` imports anywhere (function-level imports too: they run too), except
    under ``if TYPE_CHECKING:``, which never runs."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            targets.add(module)
            targets.update(f"{module}.{a.name}" for a in node.names)
    found = set()
    for target in targets:
        while target and target not in known:  # "trainer.data.X" (a name in a package) -> trainer.data
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle() -> None:
    known = _modules()
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_lazy_circle() -> None:
    # checkpoint -> elastic inside a function, elastic -> checkpoint at the top: a circle all the same.
    graph = {"a.checkpoint": {"a.elastic"}, "a.elastic": {"a.checkpoint"}, "a.main": {"a.checkpoint"}}
    assert _cycles(graph) == [["a.checkpoint", "a.elastic"]]


def _layout_rows() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `")]


def test_the_readme_layout_table_names_every_module() -> None:
    """Each module is named in a row by its path (``trainer/step.py``), or in the row of its package
    directory (``trainer/data/``) by its name in backticks (``reading``)."""
    rows = _layout_rows()
    missing = []
    for path in _modules().values():
        if path.name == "__init__.py":
            continue
        rel = path.relative_to(REPO).as_posix()
        folder, stem = rel.rsplit("/", 1)[0] + "/", path.stem
        named = any(f"`{rel}`" in row for row in rows) or any(
            row.split("|")[1].strip().startswith(f"`{folder}`") and re.search(rf"`{re.escape(stem)}`", row)
            for row in rows
        )
        if not named:
            missing.append(rel)
    assert missing == [], f"modules missing from the README's layout table: {missing}"
