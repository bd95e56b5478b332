"""No import circles in the package (docs/architecture.md): a static walk of every import, function-level ones too.

Edges: ``import a.b`` -> ``a.b``; ``from a import x`` -> ``a.x`` when that is a module of the walked packages, else
``a``; relative imports are resolved against the importing module's package. A cycle is a strongly connected
component of more than one module (or a module importing itself by name).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedml_pfedmoap", "benchmark_suite")


def module_files(root: Path, packages=PACKAGES) -> Dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under the packages (``pkg/__init__.py`` -> ``pkg``)."""
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def import_graph(modules: Dict[str, Path]) -> Dict[str, Set[str]]:
    """module -> the modules of ``modules`` it imports (anywhere in the file)."""
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            graph[mod].update(t for t in targets if t in modules and t != mod)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted, sorted by first name."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_walker_finds_relative_function_level_and_package_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from . import b\n",  # `from pkg import b`: an edge to the module pkg.b
        "b.py": "def f():\n    from .sub.c import g\n",  # function-level, relative two levels
        "sub/__init__.py": "from .c import g\n",
        "sub/c.py": "import pkg.a\nfrom .. import d\n",
        "d.py": "from pkg import VALUE\n",  # a name, not a module: an edge to the package, no cycle
        "e.py": "import os\nfrom pkg.sub import c\n",  # leaf
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(module_files(tmp_path, ("pkg",)))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.a", "pkg.d"} and graph["pkg.d"] == {"pkg"} and graph["pkg.e"] == {"pkg.sub.c"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


def test_no_import_cycles():
    found = cycles(import_graph(module_files(ROOT)))
    assert not found, "import cycles (strongly connected components):\n" + "\n".join(
        f"  {len(c)}: {' <-> '.join(c)}" for c in found)
