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


@pytest.fixture
def unfused_flex(monkeypatch):
    """Flex attention through torch's unfused implementation (the same rule over materialised scores) instead of
    the torch.compile'd kernel transformers builds, which takes ~30 s per new input shape on CPU."""
    import transformers.integrations.flex_attention as hf_flex
    from torch.nn.attention.flex_attention import flex_attention

    def unfused(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", unfused)
