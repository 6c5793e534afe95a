"""The source layout: the entry points share one bootstrap, every path setting is read, model configs hold only
what differs from their base (imports between floors and cycles: tests/test_layers.py)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT


def test_entry_points_set_no_path_of_their_own():
    # src/_bootstrap.py (sys.path, scripts only) and src/__init__.py (PROJECT_ROOT) are the one place for both
    entry_points = sorted(p for p in (ROOT / "src").glob("*.py") if not p.name.startswith("_"))
    assert len(entry_points) >= 7
    for path in entry_points:
        text = path.read_text()
        assert "sys.path" not in text and "PROJECT_ROOT" not in text and "noqa: E402" not in text, path.name


def test_every_path_setting_is_read():
    """A key of configs/paths that nothing reads is a setting that silently does nothing."""
    keys = [line.split(":", 1)[0] for line in (ROOT / "configs/paths/default.yaml").read_text().splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    readers = [p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "paths"]
    text = "\n".join(p.read_text() for p in readers + list((ROOT / "src").rglob("*.py")))
    assert keys and [k for k in keys if f"paths.{k}" not in text] == []


def test_model_configs_hold_only_what_differs_from_the_base():
    base = OmegaConf.load(ROOT / "configs/model/_base.yaml")
    models = sorted(p for p in (ROOT / "configs/model").glob("*.yaml") if p.name != "_base.yaml")
    assert len(models) >= 7
    names = {p.stem for p in models}
    for path in models:
        cfg = OmegaConf.load(path)
        parent, *choices, last = cfg.pop("defaults")
        # a preset starts from the base, or from another preset (the *_random ones: a checkpoint's architecture)
        assert last == "_self_" and (parent == "_base" or parent in names), path.name
        # besides, it may choose the prompt format its checkpoint was trained with (llava-1.5: Vicuna's system line)
        assert all(list(c) == ["override /prompt_format@_global_.prompt_format"] for c in choices), path.name
        start = base if parent == "_base" else OmegaConf.merge(base, OmegaConf.load(path.parent / f"{parent}.yaml"))
        assert [k for k, v in cfg.items() if k in start and v == start[k]] == [], path.name


@pytest.mark.slow  # a fresh interpreter: ~20 s of imports on a busy machine
def test_an_entry_point_run_as_a_script_from_another_folder_finds_the_repository(tmp_path):
    from tests.helpers import run_entry

    out = run_entry("compare.py", "--cfg", "job", "--resolve", cwd=tmp_path, env={"PROJECT_ROOT": None}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert OmegaConf.create(out.stdout).paths.root_dir == str(ROOT)
