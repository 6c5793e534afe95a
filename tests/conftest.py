from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The one switch for the shared data (200 real MMSafe-PO records, not in the repository): unset, it is looked for in
# ../shared next to the checkout; a folder names another place; "none" hides it, as on a fresh clone, so that CI
# proves the suite passes without it. Tests that read it take the `mmsafe_path` fixture (skipped when absent).
SHARED_DATA_ENV = "MLLM_BPO_SHARED_DATA"
_SHARED_DATA = os.environ.get(SHARED_DATA_ENV) or str(ROOT.parent / "shared")
SHARED_MMSAFE = None if _SHARED_DATA == "none" else Path(_SHARED_DATA) / "data" / "mmsafe_po_test_200.json"

os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# file digests of weight folders (src.models.source.file_digests): a file per test session, not logs/cache
os.environ.setdefault("MLLM_BPO_DIGEST_CACHE", str(Path(tempfile.mkdtemp(prefix="digests-")) / "file-digests.json"))


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of the default tiny LLaVA; tests must not train it in place."""
    from src.models.tiny import build_tiny_llava

    model, processor = build_tiny_llava(seed=0)
    model.eval()
    return model, processor


@pytest.fixture(scope="session")
def mmsafe_path() -> Path:
    """The shared MMSafe-PO records; the test is skipped, with the reason, where they are hidden or absent."""
    if SHARED_MMSAFE is None:
        pytest.skip(f"shared data hidden ({SHARED_DATA_ENV}=none)")
    if not SHARED_MMSAFE.is_file():
        if os.environ.get(SHARED_DATA_ENV):  # a folder named on purpose but wrong: an error, not a quiet skip
            pytest.fail(f"{SHARED_DATA_ENV}={_SHARED_DATA}: no {SHARED_MMSAFE.relative_to(_SHARED_DATA)} there")
        pytest.skip(f"shared MMSafe-PO records not found at {SHARED_MMSAFE} (set {SHARED_DATA_ENV} to their folder)")
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
