"""The source layout: imports within src/data form no cycle, and the entry points share one bootstrap."""

from __future__ import annotations

import ast

from tests.conftest import ROOT


def src_imports(path) -> set[str]:
    """The src.* modules a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("src."):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("src.")}
    return names


def test_src_data_modules_import_no_cycle():
    graph = {f"src.data.{p.stem}": src_imports(p) for p in (ROOT / "src" / "data").glob("*.py")}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for name in graph.get(start, ()):
            if name == goal or (name not in seen and reaches(name, goal, seen | {name})):
                return True
        return False

    assert [m for m in graph if reaches(m, m, {m})] == []


def test_entry_points_set_no_path_of_their_own():
    # src/_bootstrap.py (sys.path, scripts only) and src/__init__.py (PROJECT_ROOT) are the one place for both
    entry_points = sorted(p for p in (ROOT / "src").glob("*.py") if not p.name.startswith("_"))
    assert len(entry_points) >= 7
    for path in entry_points:
        text = path.read_text()
        assert "sys.path" not in text and "PROJECT_ROOT" not in text and "noqa: E402" not in text, path.name
