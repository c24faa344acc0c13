"""The modules of `cola_theory` (and of `paper_repro`) import each other without a cycle.

Every import statement counts, wherever it stands (module level, inside a function, under `if TYPE_CHECKING`):
a function-local import that only postpones a cycle is still a cycle here. `from pkg import name` is an edge to
the module pkg.name when there is one, else to pkg; an edge to a module's own parent package is left out (Python
initialises the parent first, and `cola_theory/__init__` re-exports its children by design).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "cola_theory"
ROOT = Path(__file__).resolve().parents[1]


def module_files(package: str = PACKAGE, root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(package: str = PACKAGE, root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the package modules it imports (any import statement in the file)."""
    files = module_files(package, root)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package that holds this module
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {e for e in edges if e in files and e != name and e not in parents}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of the graph, or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        state[v] = 2
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state and (cycle := visit(v)):
            return cycle
    return None


@pytest.mark.parametrize("package, sample", [("cola_theory", "cola_theory.lm.backend"),
                                             ("paper_repro", "paper_repro.lm.runner")])
def test_imports_form_a_dag(package, sample):
    graph = import_graph(package)
    assert sample in graph and len(graph) > 10  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_library_never_imports_the_reproduction():
    """cola_theory <- paper_repro only, so no cycle can run through both packages."""
    bad = []
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{name} imports {m}" for m in mods if m.split(".")[0] == "paper_repro"]
    assert not bad, bad


def test_the_check_sees_cycles_function_local_and_relative_imports(tmp_path):
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from toy import a\n")  # a parent package importing its child: not a cycle
    (pkg / "a.py").write_text("import toy.b\n")
    (pkg / "b.py").write_text("def f():\n    from toy.sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import a\n")
    graph = import_graph("toy", tmp_path)
    assert graph["toy.sub.c"] == {"toy.a"} and graph["toy.b"] == {"toy.sub.c"} and graph["toy"] == {"toy.a"}
    assert find_cycle(graph) == ["toy.a", "toy.b", "toy.sub.c", "toy.a"]
    (pkg / "b.py").write_text("def f():\n    pass\n")
    assert find_cycle(import_graph("toy", tmp_path)) is None
