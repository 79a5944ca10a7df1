"""The package's shape, read from its source with ast (nothing is imported).

Imports point one way, cli -> runtime -> pipelines -> convert, with no cycles; nothing in the package imports
tests/ or bench/. No source file is over 400 lines, and none holds a date, a GPU model or a tuning round: those
belong in bench/RESULTS.md and git.
"""
from __future__ import annotations

import ast
import re
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent  # the repository root is the qconv package
PACKAGE = "qconv"
LAYERS = {"convert": 0, "pipelines": 1, "runtime": 2}  # subpackages; a module at the root (cli.py) is TOP
TOP = 3
BASE = -1  # qconv/__init__.py (QconvError, __version__): importable from every layer
NOT_PACKAGE = ("tests", "bench")
MAX_LINES = 400
ORDINALS = "first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth"
HISTORY = {
    "a date": re.compile(r"\b20\d\d-\d\d-\d\d\b"),
    "a GPU model": re.compile(r"\b(?:A100|H100|H200|B200)\b"),
    "a tuning round": re.compile(rf"\b(?:{ORDINALS}) sitting\b", re.IGNORECASE),
}


def find_modules(root: Path) -> dict[str, Path]:
    """{dotted name: file} for the root's .py files and every package below it (a folder with __init__.py, as
    setup.py finds them), less tests/, bench/ and hidden folders."""
    mods: dict[str, Path] = {}

    def walk(folder: Path, prefix: str) -> None:
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or (folder == root and path.name in NOT_PACKAGE):
                continue
            if path.is_dir() and (path / "__init__.py").is_file():
                walk(path, f"{prefix}.{path.name}")
            elif path.suffix == ".py":
                mods[prefix if path.name == "__init__.py" else f"{prefix}.{path.stem}"] = path
    walk(root, PACKAGE)
    return mods


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import anywhere in the file: top level, in functions, under
    TYPE_CHECKING, and importlib.import_module / __import__ of a literal name. ``from X import y`` counts as an
    import of X.y when that is a module, else of X."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                assert node.level <= len(parts), f"{path}:{node.lineno} imports from above the package"
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in modules or _outside(sub) else base, node.lineno))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None)
                   in ("import_module", "__import__"))):
            found.append((node.args[0].value, node.lineno))
    return found


def _outside(target: str) -> bool:
    """tests/ or bench/, by their top-level or qconv-relative name."""
    parts = target.split(".")
    return parts[0] in NOT_PACKAGE or (parts[0] == PACKAGE and len(parts) > 1 and parts[1] in NOT_PACKAGE)


def rank(name: str, modules: dict[str, Path]) -> int | None:
    parts = name.split(".")[1:]
    if not parts:
        return BASE
    if len(parts) == 1 and name in modules and modules[name].name != "__init__.py":
        return TOP  # cli.py and its helpers at the root
    return LAYERS.get(parts[0])


def import_graph(root: Path) -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    """The modules and {importer: {imported module of the package: first line}}."""
    modules = find_modules(root)
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for m, path in modules.items():
        for target, line in imports_of(m, path, modules):
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                graph[m].setdefault(target, line)
    return modules, graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (or a module importing itself),
    as [a, b, ..., a]; Tarjan's algorithm, then the shortest way round from the component's first module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(_way_round(graph, comp, min(comp)) for comp in comps)


def _way_round(graph: dict[str, dict[str, int]], comp: set[str], start: str) -> list[str]:
    """The shortest import path from start back to itself inside the component: [start, ..., start]."""
    prev = {start: start}
    todo = deque([start])
    while todo:  # breadth first
        v = todo.popleft()
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return path[::-1] + [start]
            if w in comp and w not in prev:
                prev[w] = v
                todo.append(w)
    raise AssertionError(f"{start} is in a strongly connected component but no way round was found")


def _where(modules: dict[str, Path], m: str) -> str:
    return str(modules[m].relative_to(ROOT)) if m in modules else m


@pytest.fixture(scope="module")
def package():
    return import_graph(ROOT)


def test_every_module_has_a_layer(package):
    modules, _ = package
    assert [m for m in modules if rank(m, modules) is None] == [], \
        f"subpackages without a layer; add them to LAYERS ({LAYERS})"


def test_every_import_of_the_package_names_a_module(package):
    modules, graph = package
    missing = [f"{_where(modules, m)}:{line} imports {t}" for m, out in graph.items() for t, line in out.items()
               if t not in modules and not _outside(t)]
    assert missing == []


def test_no_import_cycles(package):
    modules, graph = package
    found = [" -> ".join(c) + "  (" + ", ".join(f"{_where(modules, a)}:{graph[a][b]}" for a, b in zip(c, c[1:])) + ")"
             for c in cycles(graph)]
    assert found == [], "import cycles:\n" + "\n".join(found)


def test_imports_point_down(package):
    """cli (3) -> runtime (2) -> pipelines (1) -> convert (0); qconv/__init__.py (-1) from anywhere."""
    modules, graph = package
    up = [f"{_where(modules, m)}:{line} ({rank(m, modules)}) imports {t} ({rank(t, modules)})"
          for m, out in graph.items() for t, line in out.items()
          if not _outside(t) and rank(t, modules) is not None and rank(m, modules) is not None
          and rank(t, modules) > rank(m, modules)]
    assert up == [], "upward imports:\n" + "\n".join(up)


def test_nothing_imports_tests_or_bench(package):
    modules, _ = package
    bad = [f"{_where(modules, m)}:{line} imports {t}" for m, path in modules.items()
           for t, line in imports_of(m, path, modules) if _outside(t)]
    assert bad == []


def test_no_file_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in find_modules(ROOT).values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"over {MAX_LINES} lines: {long}"


def test_no_history_in_source():
    """Source says what the code does and why; when and on which machine a number was measured goes to
    bench/RESULTS.md and git."""
    hits = [f"{p.relative_to(ROOT)}:{i}: {what}: {m.group(0)!r}" for p in find_modules(ROOT).values()
            for i, line in enumerate(p.read_text().splitlines(), 1)
            for what, rx in HISTORY.items() for m in [rx.search(line)] if m]
    assert hits == [], "\n".join(hits)


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    """The walk itself, on a planted package: convert imports runtime (upward, and relative), and two pipelines
    modules import each other, one of them only inside a function."""
    for folder in ("convert", "pipelines", "runtime"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "__init__.py").write_text("class QconvError(Exception):\n    pass\n")
    (tmp_path / "convert" / "a.py").write_text("from .. import QconvError\nfrom ..runtime.b import x\n")
    (tmp_path / "runtime" / "b.py").write_text("from ..convert import a\nx = 1\n")
    (tmp_path / "pipelines" / "c.py").write_text("from . import d\n")
    (tmp_path / "pipelines" / "d.py").write_text("def f():\n    from qconv.pipelines.c import g\n")
    modules, graph = import_graph(tmp_path)
    assert cycles(graph) == [["qconv.convert.a", "qconv.runtime.b", "qconv.convert.a"],
                             ["qconv.pipelines.c", "qconv.pipelines.d", "qconv.pipelines.c"]]
    up = [(m, t) for m, out in graph.items() for t in out if rank(t, modules) > rank(m, modules)]
    assert up == [("qconv.convert.a", "qconv.runtime.b")]
