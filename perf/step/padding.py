"""Padding shares: the fraction of the token positions a forward pass runs that are padding, over an epoch's batches.

Ours before the padding-free layout: one row per record, ``[prompt | answer 1 | ... | answer K]``, padded on the
right to the batch's longest (`packed_rows(one_row=False)`). Ours as trained: the rows `build_rows` gives the model
(`padding_share`; under sdpa or flex one row, the records back to back). TRL: the rows its collator builds (one per
(pair, answer), padded to the batch's longest), counted on the batches its trainer draws.
"""

from __future__ import annotations

from typing import Any


def packed_padding(batch: dict[str, Any], pad_token_id: int) -> tuple[int, int]:
    """(pad positions, all positions) of one packed row per record of ``batch`` (B rows of width T)."""
    from src.models.logprobs import packed_rows

    rows = packed_rows(batch, pad_token_id)
    return rows.padding_tokens, rows.inputs["input_ids"].numel()


def ours_padding_share(loader: Any, pad_token_id: int, model: Any = None) -> float:
    """Share of pad positions over every batch of ``loader``: in one packed row per record (``model=None``), or in
    the rows ``model`` trains on (`build_rows`)."""
    from src.models.logprobs import build_rows

    pads = total = 0
    for batch in loader:
        if model is None:
            p, t = packed_padding(batch, pad_token_id)
        else:
            rows = build_rows(model, batch, pad_token_id, "packed")
            p, t = rows.padding_tokens, rows.inputs["input_ids"].numel()
        pads, total = pads + p, total + t
    return pads / total


class CountingCollator:
    """Wraps TRL's collator; counts the pad positions (``attention_mask == 0``) of every batch it builds."""

    def __init__(self, collator: Any):
        self.collator, self.pads, self.total = collator, 0, 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.collator(examples)
        mask = out["attention_mask"]  # (2B, T): chosen rows then rejected rows
        self.pads += int((mask == 0).sum())
        self.total += mask.numel()
        return out

    @property
    def share(self) -> float | None:
        return self.pads / self.total if self.total else None
