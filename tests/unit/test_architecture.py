"""The package's import graph has no cycles, function-local imports included.

Every module's imports are read from its syntax tree (all ``import`` /
``from ... import`` statements anywhere in the file, so an import hidden in a
function counts), resolved to modules of ``nbsmt_onnx``, and the strongly
connected components of that graph are computed. A component with more than
one module is a cycle; so is a module importing the package root (whose
``__init__`` imports the public API).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nbsmt_onnx"


def _module_names(root: Path) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in the file)."""
    modules = _module_names(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    targets.append(full if full in modules else source)
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_detector_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_detector_sees_function_local_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text("from pkg import two\n")
    (pkg / "two.py").write_text("def f():\n    from pkg.one import g\n    return g\n")
    assert cycles(import_graph(pkg)) == [["pkg.one", "pkg.two"]]


def test_package_has_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 30, "the package was not found"
    found = cycles(graph)
    assert not found, f"import cycles (function-local imports included): {found}"


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("nbsmt_onnx.evaluate", "nbsmt_onnx.api"),
        ("nbsmt_onnx.html_report", "nbsmt_onnx.evaluate"),
        ("nbsmt_onnx.api", "nbsmt_onnx.cli"),
        ("nbsmt_onnx.search", "nbsmt_onnx.cli"),
        # config validates names against the strategy registry, so the registry reads no config
        ("nbsmt_onnx.calibration.strategies", "nbsmt_onnx.config"),
    ],
)
def test_layers(lower: str, upper: str) -> None:
    """Scoring sits below the API, the API below the CLI; nothing imports upwards."""
    graph = import_graph()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        return False

    assert not reaches(lower, upper), f"{lower} imports {upper} (directly or not)"
