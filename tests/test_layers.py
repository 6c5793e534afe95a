"""Imports run one way, floor by floor, and no modules import each other (read from the source with `ast`).

    0  src/errors.py, src/files.py, src/settings.py,   the errors every floor raises, files written whole,
       src/environment.py,            setting ranges, what a run ran on, finished runs reused;
       src/finished_runs.py, src/data records, readers, images, encoding
    1  src/models                     model factory, log-probs, objectives, generation, devices
    2  src/llm                        language-model clients shared by judges and the data builder
    3  src/evaluation, src/databuilder  side by side: neither imports the other
    4  src/world                      a benchmark built on evaluation's items, judges and metrics
    5  src/*.py                       the entry points

A module imports from its own package, from the floors below and from top-level modules of its own floor, never
from a floor above nor from another package of its own floor (what two such packages share belongs below them).
Imports inside functions count too: they are dependencies all the same, only later.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE_FLOORS = {"data": 0, "models": 1, "llm": 2, "evaluation": 3, "databuilder": 3, "world": 4}
MODULE_FLOORS = {
    "src.errors": 0,
    "src.files": 0,
    "src.settings": 0,
    "src.environment": 0,
    "src.finished_runs": 0,
}  # a top-level module that is no entry point
ENTRY_FLOOR = 5

# Found here and not fixed yet: this set may only shrink (the test fails on an entry that no longer occurs, so it
# is removed once fixed). Each entry is ("up" or "side", importer, imported) or ("cycle", modules...).
KNOWN: set[tuple[str, ...]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def src_modules() -> dict[str, Path]:
    """Every module under src/ by dotted name."""
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def package(module: str) -> str | None:
    """The package under src/ that holds ``module`` (``data`` for src.data.readers); None for src/*.py."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (SRC / parts[-1]).is_dir() else None


def floor(module: str) -> int | None:
    """The module's floor; None for a package not placed in `PACKAGE_FLOORS`."""
    name = package(module)
    return PACKAGE_FLOORS.get(name) if name is not None else MODULE_FLOORS.get(module, ENTRY_FLOOR)


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The src modules that ``module`` imports, anywhere in the file (``from src.x import y`` names module
    ``src.x.y`` when that is a module, else ``src.x``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
    return {name for name in found if name in modules and name != module}


def import_graph() -> dict[str, set[str]]:
    modules = src_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer_breaches(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """("up", a, b) for a module ``a`` importing ``b`` from a floor above; ("side", a, b) from another package of
    its own floor. Modules of unplaced packages are left to `test_every_src_module_has_a_floor`."""
    found = set()
    for a, targets in graph.items():
        for b in targets:
            low, high = floor(a), floor(b)
            if low is None or high is None:
                continue
            if high > low:
                found.add(("up", a, b))
            elif high == low and None not in (package(a), package(b)) and package(a) != package(b):
                found.add(("side", a, b))
    return found


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The strongly connected groups of more than one module (Tarjan), each as ("cycle", sorted names...)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[tuple[str, ...]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.add(("cycle", *sorted(group)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(problem: tuple[str, ...]) -> str:
    kind, *names = problem
    if kind == "cycle":
        return "import cycle: " + " -> ".join(names) + f" -> {names[0]}"
    importer, imported = names
    path = src_modules()[importer].relative_to(ROOT) if importer in src_modules() else importer
    where = "a floor above" if kind == "up" else "another package of its floor"
    return f"{path} (floor {floor(importer)}) imports {imported} (floor {floor(imported)}): {where}"


def test_every_src_module_has_a_floor():
    # a new package under src/ must be placed on a floor before its imports can be checked
    unplaced = sorted(m for m in src_modules() if floor(m) is None)
    assert not unplaced, f"modules of packages without a floor in tests/test_layers.py PACKAGE_FLOORS: {unplaced}"


def test_no_import_goes_up_or_sideways_and_no_modules_import_each_other():
    graph = import_graph()
    problems = layer_breaches(graph) | cycles(graph)
    new = sorted(problems - KNOWN)
    assert not new, "imports against the layering:\n" + "\n".join(describe(p) for p in new)
    fixed = sorted(KNOWN - problems)
    assert not fixed, "fixed, so remove from KNOWN in tests/test_layers.py: " + "; ".join(map(describe, fixed))


def test_evaluation_never_names_the_world():
    """What the world adds to evaluation it registers from above (src/plugins.py): src/evaluation does not name it,
    not even in a comment or a docstring (the same as `grep -il world src/evaluation/*.py` printing nothing)."""
    named = [
        str(p.relative_to(ROOT)) for p in sorted((SRC / "evaluation").rglob("*.py")) if "world" in p.read_text().lower()
    ]
    assert not named, f"src/evaluation names the world: {named}; register what it adds from src/world instead"


def test_the_checks_catch_what_they_look_for():
    graph = {
        "src.data.a": {"src.models.b"},
        "src.models.b": {"src.data.a"},
        "src.evaluation.c": {"src.databuilder.d", "src.llm.e"},
        "src.databuilder.d": set(),
        "src.llm.e": set(),
        "src.train": {"src.data.a", "src.errors"},
        "src.errors": set(),
    }
    assert layer_breaches(graph) == {
        ("up", "src.data.a", "src.models.b"),
        ("side", "src.evaluation.c", "src.databuilder.d"),
    }
    assert cycles(graph) == {("cycle", "src.data.a", "src.models.b")}
    assert (floor("src.errors"), floor("src.train"), floor("src.llm.local_lm"), floor("src.llm")) == (0, 5, 2, 2)
