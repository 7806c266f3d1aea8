"""core/ has no import cycles, counting imports inside functions too, and never imports the layers above it.

A function-level import that only hides a cycle still couples the two modules both ways; one kept for
start-up time or an optional install is fine, and is counted here like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO


def import_graph(package: Path) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}`` for every .py under ``package``, from
    every import statement anywhere in the file (module level, functions, ``if`` blocks)."""
    name = package.name
    modules = {
        ".".join(p.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in package.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        mod = ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from core import checkpoint` imports core.checkpoint; `from core.x import y` core.x
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.ImportFrom):  # relative: from the package that holds mod
                pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                stem = ".".join([*pkg[: len(pkg) - node.level + 1], *([node.module] if node.module else [])])
                targets = [f"{stem}.{a.name}" for a in node.names] + [stem]
            else:
                continue
            for t in targets:
                if t.split(".")[0] != name:
                    continue
                while t not in modules and "." in t:  # `core.x.func` -> core.x
                    t = t.rsplit(".", 1)[0]
                if t in modules and t != mod and t != name:
                    deps.add(t)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return [*path[path.index(d) :], d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_core_has_no_import_cycle():
    graph = import_graph(REPO / "core")
    assert {"core.train", "core.launch", "core.modeling", "core.quant"} <= graph.keys()
    assert "core.checkpoint" in graph["core.train"]  # `from core import checkpoint as ckpt` is seen
    assert "core.quant" in graph["core.modeling"]  # so is the import inside load_model
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in core/: " + " -> ".join(cycle)


def test_core_never_imports_prefect_tasks_or_flows():
    above = {"prefect", "tasks", "flows"}
    found = []
    for path in sorted((REPO / "core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in above]
    assert not found, found


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path: Path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from pkg.high import g  # hides the cycle\n    return g\n")
    (pkg / "high.py").write_text("from pkg import low\n\ndef g():\n    return low\n")
    (pkg / "other.py").write_text("import pkg.low as low\nfrom . import high\n")
    graph = import_graph(pkg)
    assert graph == {
        "pkg": set(),
        "pkg.low": {"pkg.high"},
        "pkg.high": {"pkg.low"},
        "pkg.other": {"pkg.low", "pkg.high"},
    }
    assert find_cycle(graph) in (["pkg.high", "pkg.low", "pkg.high"], ["pkg.low", "pkg.high", "pkg.low"])
    (pkg / "low.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(pkg)) is None
