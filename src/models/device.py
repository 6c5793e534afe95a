"""Where a model runs and in which dtype: the one place that decides what ``device="auto"`` / ``dtype="auto"`` mean.

It lives in src/models/, the lowest floor whose modules handle devices, so that every user may import it: the
training and generation code here, the local language models of src/llm/, the evaluation runner and the entry
points. torch is imported when a choice is made, not with this module: the data builder checks its settings
against `DTYPE_CHOICES` without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")
# the settings a judge or rephraser accepts for its model's dtype
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name in `DTYPE_NAMES`; ``ValueError`` for any other."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, name)


def choose_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for the settings: ``"auto"`` is cuda when available, else cpu; a dtype of ``"auto"`` is
    bfloat16 on cuda (half the memory, the precision models are trained in) and float32 elsewhere (CPUs run
    bfloat16 slowly or not at all). Raises ``ValueError`` for a dtype not in `DTYPE_CHOICES`."""
    import torch

    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {dtype!r}")
    chosen = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dtype == "auto":
        return chosen, torch.bfloat16 if chosen.type == "cuda" else torch.float32
    return chosen, torch_dtype(dtype)
