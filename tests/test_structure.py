"""Structure of the package, read with ``ast``: short functions and modules, no import cycle, no outside citations.

The import graph counts every ``import`` / ``from ... import`` anywhere in a file, including imports inside
functions (a lazy import still closes a cycle when it runs), relative imports, and ``from anatomask_lab.x import
name`` where ``name`` is a submodule (an edge to that submodule). A package ``__init__`` that imports its submodules
has edges to them; a submodule does not depend on its package's ``__init__`` merely by living in it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "anatomask_lab"
MAX_FUNCTION_LINES = 150
MAX_MODULE_LINES = 500
FORBIDDEN_CITATION = re.compile(rb"shared[/\\]reference")


# ----------------------------------------------------------------------------------------------------------------
# helpers (pure functions of a source tree, so that the tests below can check them on a tree they build)
# ----------------------------------------------------------------------------------------------------------------
def package_modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``root / package`` (``__init__`` = the package)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _import_targets(module: str, path: Path, tree: ast.AST, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``module`` imports anywhere in ``tree``."""
    targets: set[str] = set()
    base_package = module if _is_package(path) else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    targets.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base_package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                source = ".".join(parts + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in known:
                    targets.add(submodule)
                elif source in known:
                    targets.add(source)
    targets.discard(module)
    return targets


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (see the module docstring for what counts)."""
    known = set(modules)
    return {
        name: _import_targets(name, path, ast.parse(path.read_text(), str(path)), known)
        for name, path in modules.items()
    }


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm (the graph has a few dozen nodes: recursion is fine)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(component, graph) for component in components]


def _cycle_through(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component (breadth-first search)."""
    members, start = set(component), component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in previous:
                    previous[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {component}")  # pragma: no cover


def long_functions(modules: dict[str, Path], root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (N lines)`` for every function or method longer than ``limit`` lines."""
    out = []
    for path in modules.values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({n} lines)")
    return out


def long_modules(modules: dict[str, Path], root: Path, limit: int = MAX_MODULE_LINES) -> list[str]:
    """``path (N lines)`` for every module longer than ``limit`` lines."""
    out = []
    for path in modules.values():
        n = len(path.read_text().splitlines())
        if n > limit:
            out.append(f"{path.relative_to(root)} ({n} lines)")
    return out


def outside_citations(root: Path, places=(PACKAGE, "docs", "README.md", "notebooks")) -> list[str]:
    """``path:line`` of every mention of the project's private reference folder in code, docs and notebooks."""
    out = []
    for place in places:
        top = root / place
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in files:
            if "__pycache__" in path.parts or ".ipynb_checkpoints" in path.parts:
                continue
            for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
                if FORBIDDEN_CITATION.search(line):
                    out.append(f"{path.relative_to(root)}:{lineno}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# the package
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    found = package_modules(ROOT)
    assert f"{PACKAGE}.masking" in found and f"{PACKAGE}.models.sparse" in found
    return found


def test_no_function_longer_than_150_lines(modules):
    offenders = long_functions(modules, ROOT)
    assert not offenders, f"functions longer than {MAX_FUNCTION_LINES} lines: " + "; ".join(offenders)


def test_no_module_longer_than_500_lines(modules):
    offenders = long_modules(modules, ROOT)
    assert not offenders, f"modules longer than {MAX_MODULE_LINES} lines: " + "; ".join(offenders)


def test_no_import_cycle_including_lazy_imports(modules):
    cycles = import_cycles(import_graph(modules))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_citation_of_files_outside_the_repository():
    offenders = outside_citations(ROOT)
    assert not offenders, "files citing the private reference folder (cite docs/ instead): " + ", ".join(offenders)


# ----------------------------------------------------------------------------------------------------------------
# the checks themselves, on a small tree that breaks every rule
# ----------------------------------------------------------------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checks_find_lazy_relative_and_submodule_cycles(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from . import a\n",
        "pkg/a.py": "from .sub import b\n",                       # a -> sub.b (from-import of a submodule)
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "def f():\n    from ..a import thing\n",  # sub.b -> a, lazily and relatively
        "pkg/c.py": "import pkg.d\n",
        "pkg/d.py": "def g():\n    from pkg import c\n",           # d -> c (from the package, c is a module)
        "pkg/e.py": "from pkg.sub import b\n",                    # no cycle: e -> sub.b only
    })
    graph = import_graph(package_modules(tmp_path, "pkg"))
    assert graph["pkg"] == {"pkg.a"}
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert graph["pkg.e"] == {"pkg.sub.b"} and graph["pkg.sub"] == set()
    cycles = import_cycles(graph)
    assert sorted(map(tuple, cycles)) == [("pkg.a", "pkg.sub.b", "pkg.a"), ("pkg.c", "pkg.d", "pkg.c")]


def test_checks_find_long_code_and_outside_citations(tmp_path):
    def function(name: str, n_lines: int, indent: str = "") -> str:
        return f"{indent}def {name}():\n" + "".join(f"{indent}    x{i} = {i}\n" for i in range(n_lines - 1))

    long_source = function("just_fits", 150) + "\n\nclass K:\n" + function("too_long", 151, "    ")
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/fits.py": "\n" * 500,
        "pkg/long.py": long_source + "\n" * (501 - long_source.count("\n")),
        "docs/x.md": "fine\nsee shared/reference/notes.md\n",
        "README.md": "fine\n",
    })
    modules = package_modules(tmp_path, "pkg")
    assert long_functions(modules, tmp_path) == ["pkg/long.py:154 too_long (151 lines)"]
    assert long_modules(modules, tmp_path) == ["pkg/long.py (501 lines)"]
    assert outside_citations(tmp_path, ("pkg", "docs", "README.md")) == ["docs/x.md:2"]
