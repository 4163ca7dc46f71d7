"""The package's import graph, read from the source: no cycles, and no rich/typer below the CLI.

Every `import` counts, function-local ones too (a lazy import hides a cycle from Python, not
from the design). Nothing is imported to build the graph: `ast` reads each file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "pneumoedge"
#: Where the presentation libraries may be imported: the CLI and its verbs.
PRESENTATION = ("rich", "typer")
PRESENTATION_ALLOWED = ("pneumoedge/cli.py", "pneumoedge/commands/")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule if submodule in MODULES else base, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the pneumoedge modules it imports (the nearest existing module of each import)."""
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = set()
        for imported, _ in _imports(name, path):
            while imported and imported not in MODULES:
                imported = imported.rpartition(".")[0]
            if imported.startswith("pneumoedge") and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of more than one module, as one cycle through it (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(_cycle_in(sorted(group), edges))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def _cycle_in(group: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(edges[node] & members):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    return group


def test_the_graph_is_read_from_the_source() -> None:
    edges = graph()
    assert len(MODULES) > 50
    # a function-local import and a relative-free absolute import are both seen
    assert "pneumoedge.runtime.folder" in edges["pneumoedge.export.tensors"]
    assert "pneumoedge.export.bundle_builder" in edges["pneumoedge.export.pipeline"]


def test_cycle_finder_finds_a_planted_cycle() -> None:
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(planted) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules() -> None:
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_rich_and_typer_only_in_the_cli_and_its_verbs() -> None:
    offenders = []
    for name, path in MODULES.items():
        where = path.relative_to(ROOT.parent).as_posix()
        if where.startswith(PRESENTATION_ALLOWED):
            continue
        for imported, line in _imports(name, path):
            if imported.split(".")[0] in PRESENTATION:
                offenders.append(f"{where}:{line} imports {imported}")
    assert not offenders, "presentation imported below the CLI:\n" + "\n".join(offenders)


@pytest.mark.parametrize("text, package, expected", [
    ("from . import bundle", "pneumoedge", "pneumoedge.bundle"),
    ("from ..bundle import MemberSource", "pneumoedge.export", "pneumoedge.bundle"),
    ("from .onnx_run import onnx_session", "pneumoedge.export", "pneumoedge.export.onnx_run"),
])
def test_relative_imports_are_resolved(tmp_path: Path, text: str, package: str, expected: str) -> None:
    path = tmp_path / "probe_module.py"
    path.write_text(text + "\n", encoding="utf-8")
    assert [m for m, _ in _imports(f"{package}.probe_module", path)] == [expected]
