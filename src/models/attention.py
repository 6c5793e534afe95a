"""Attention of the padding-free packed layout under sdpa: several records in one row, each attending to itself.

The packed layout puts every record of a batch into one row, back to back, so no token of the batch is padding
(`src.models.logprobs.packed_rows` with ``one_row=True``). The linear layers, norms and MLPs of the decoder run on
that row as they would on any other; only attention must not cross records. Flex attention does that with a
``BlockMask`` (blocks that no query may see are skipped, the GPU path). sdpa would need a dense (T, T) mask over
the whole row and would compute every (query, key) pair of it, records times more attention work than the records
need. So under sdpa the row's attention runs record by record: transformers passes the keyword argument
``packed_records`` (a `RecordSpans`) from the model's forward down to every attention call, and the ``sdpa`` entry
of transformers' attention registry, wrapped here, then runs sdpa once per record span, with that record's own
(L, L) mask (its prompt and answer blocks, `_attends`), and concatenates the outputs.

The wrapper changes nothing for a call without ``packed_records`` (generation, other models, the vision tower,
whose attention layers have another config than the one the spans name): it calls transformers' sdpa as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

KWARG = "packed_records"


@dataclass(frozen=True, eq=False)
class RecordSpans:
    """Where each record lies in the packed row: ``starts[r]``, ``lengths[r]`` (tokens). ``config``: the text
    config of the attention layers that use the spans (the decoder's; the vision tower's layers have their own)."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    config: Any

    @property
    def total(self) -> int:
        return self.starts[-1] + self.lengths[-1] if self.starts else 0


def _by_record(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa, per record span when ``packed_records`` names this layer's config.

    ``query`` (1, H, T, D), ``key``/``value`` (1, H_kv, T, D), ``attention_mask`` (R, 1, L, L): record r's mask in
    its top-left (lengths[r], lengths[r]) corner. Returns (1, T, H, D) as transformers' sdpa does."""
    spans: RecordSpans | None = kwargs.pop(KWARG, None)
    if spans is None or getattr(module, "config", None) is not spans.config:
        return _SDPA(module, query, key, value, attention_mask, *args, **kwargs)
    if query.shape[0] != 1 or query.shape[2] != spans.total or attention_mask is None:
        raise ValueError(
            f"packed records: expected one row of {spans.total} tokens with per-record masks, got query "
            f"{tuple(query.shape)} and mask {None if attention_mask is None else tuple(attention_mask.shape)}"
        )
    outputs = []
    for r, (start, length) in enumerate(zip(spans.starts, spans.lengths, strict=True)):
        s = slice(start, start + length)
        mask = attention_mask[r : r + 1, :, :length, :length]
        out, _ = _SDPA(module, query[:, :, s], key[:, :, s], value[:, :, s], mask, *args, **kwargs)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


_SDPA = ALL_ATTENTION_FUNCTIONS["sdpa"]
if getattr(_SDPA, "__wrapped_by__", None) == __name__:  # imported twice (e.g. reloaded): do not wrap the wrapper
    _SDPA = _SDPA.__wrapped__
_by_record.__wrapped__ = _SDPA  # type: ignore[attr-defined]
_by_record.__wrapped_by__ = __name__  # type: ignore[attr-defined]
AttentionInterface.register("sdpa", _by_record)
