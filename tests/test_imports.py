"""The library's modules import each other without cycles, counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


def module_files() -> dict[str, Path]:
    """{dotted module name: file} of every module under pipeline/ (a package is its __init__.py)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The library modules `name` imports anywhere in its file (module level and inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            stem = ".".join(base + ([node.module] if node.module else []))
            # `from .x import y` reads x, and y too when y is a module of its own.
            targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # Importing a.b.c runs a and a.b first.
            parts = target.split(".")
            found.update(".".join(parts[:end]) for end in range(1, len(parts) + 1))
    # A package's own __init__ runs before any of its modules, whoever imports them: not an edge.
    ancestors = {".".join(name.split(".")[:end]) for end in range(1, len(name.split(".")))}
    return (found & known) - {name} - ancestors


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_sees_a_function_level_cycle(tmp_path):
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import x\n")
    known = {"pipeline.a", "pipeline.b"}
    graph = {
        "pipeline.a": imported_modules("pipeline.a", tmp_path / "a.py", known),
        "pipeline.b": imported_modules("pipeline.b", tmp_path / "b.py", known),
    }
    assert cycles(graph) == [["pipeline.a", "pipeline.b"]]


def test_no_import_cycles_in_the_library():
    modules = module_files()
    graph = {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}
    assert graph["pipeline.stages.report"] >= {"pipeline.results", "pipeline.report_render"}  # the parser sees imports
    assert cycles(graph) == []


def test_the_library_never_imports_a_stage_definition():
    """Stage modules (pipeline/stages/) are loaded by name by the runner; what others call lives in the library."""
    modules = module_files()
    library = {name: path for name, path in modules.items() if not name.startswith("pipeline.stages")}
    importers = {
        name: sorted(found)
        for name, path in library.items()
        if (
            found := {
                module for module in imported_modules(name, path, set(modules)) if module.startswith("pipeline.stages")
            }
        )
    }
    assert importers == {}
