"""Every data file under src/ is listed in pyproject's package-data, so a non-editable install ships it."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def test_data_files_under_src_are_package_data() -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = [
        p
        for p in (ROOT / "src").rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    ]
    assert any(p.name == "wordlists.yaml" for p in files)  # the check below has something to look at
    missing = []
    for p in files:
        rel = p.relative_to(ROOT)
        # a glob of the nearest package above the file, relative to that package
        covered = any(
            fnmatch(str(rel.relative_to(*parent.parts)), pattern)
            for parent in rel.parents
            if (ROOT / parent / "__init__.py").is_file()
            for pattern in package_data.get(".".join(parent.parts), [])
        )
        if not covered:
            missing.append(str(rel))
    assert not missing, f"not in [tool.setuptools.package-data] of pyproject.toml: {missing}"
