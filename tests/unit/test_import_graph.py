"""No two modules of the project import each other, directly or through others.

The graph is read from the source (AST), not by importing: every `import` and
`from ... import` anywhere in a module counts, at module level, inside a
function (a lazy import still ties the two modules together) or under
`if TYPE_CHECKING:`. An edge goes to the deepest project module that the
import names (`from modeling.config import ModelConfig` -> modeling.config;
`from modeling.costs import flops` -> modeling.costs.flops). The implicit
import of a parent package's `__init__` is not an edge, as in Python itself.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "modeling", "pipeline", "sharding", "launch", "benchmarks")


def module_files(root: Path = REPO, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _deepest(name: str, modules) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its source)."""
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                # `from pkg import mod` names the module pkg.mod; `from mod import name` names mod.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            deps.update(d for d in (_deepest(t, modules) for t in targets) if d and d != name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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


def test_the_project_has_no_import_cycle():
    modules = module_files()
    assert {"modeling.config", "pipeline.training.run", "common.config_loading"} <= set(modules)
    graph = import_graph(modules)
    assert sum(map(len, graph.values())) > 200, "the graph lost its edges"
    assert cycles(graph) == [], "modules that import each other (directly or through others)"


@pytest.mark.parametrize("files, expected", [
    # A function-local import still closes a circle.
    ({"a/__init__.py": "", "a/x.py": "from a.y import f\n", "a/y.py": "def f():\n    from a.x import g\n"},
     [["a.x", "a.y"]]),
    # Through a third module, with a relative import and `from package import module`.
    ({"a/__init__.py": "", "a/x.py": "from . import y\n", "a/y.py": "import a.z\n", "a/z.py": "from a.x import k\n"},
     [["a.x", "a.y", "a.z"]]),
    # A one-way chain and a parent package's __init__ are not circles.
    ({"a/__init__.py": "from a.x import f\n", "a/x.py": "from a.y import g\n", "a/y.py": "import os\n"}, []),
])
def test_the_cycle_finder_finds_what_it_should(tmp_path, files, expected):
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert cycles(import_graph(module_files(tmp_path, ("a",)))) == expected
