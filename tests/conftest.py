from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MMSAFE = ROOT.parent / "shared" / "data" / "mmsafe_po_test_200.json"

os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of the default tiny LLaVA; tests must not train it in place."""
    from src.models.tiny import build_tiny_llava

    model, processor = build_tiny_llava(seed=0)
    model.eval()
    return model, processor


@pytest.fixture(scope="session")
def mmsafe_path() -> Path:
    if not SHARED_MMSAFE.is_file():
        pytest.skip(f"shared MMSafe-PO records not found at {SHARED_MMSAFE} (only present on build machines)")
    return SHARED_MMSAFE
