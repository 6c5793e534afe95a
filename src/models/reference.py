"""Reference log-probs computed once before training and cached on disk.

The reference model is the initial policy and never changes, so log pi_ref(y|x) of every (record, answer)
is a constant of the data set. Computing it once (batched, in the packed layout) removes the reference
forward from every training step and the frozen copy from memory.

A cached value is reused only when everything that changes it is the same. The file is one per model
fingerprint (weights, config, parameter dtypes), layout actually used, compute dtype (the autocast dtype
of the run's precision, else the weights') and attention kernel; an entry is keyed by record id, the exact
prompt and answer token ids (so template, system prompt, truncation and tokenizer count) and a hash of the
exact pixel inputs the answer is scored under (so another image file, a stand-in, its size, other processor
settings or, for ``chosen_corrupted``, other corruption settings count).

Records are streamed: images are loaded and processed a batch at a time, so memory is bounded by the
batch, not by the data set (pixel tensors of a 336 px image take ~1.35 MB).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from src.data.encoding import EncodedPair, collate_pairs, inputs_digest
from src.files import locked, write_atomic
from src.models.factory import fingerprint
from src.models.logprobs import answer_logprobs, attn_implementation, resolve_layout

log = logging.getLogger(__name__)

# none: no reference at all, for objectives that do not take one (sft)
STRATEGIES = ("precomputed", "frozen_copy", "adapters_disabled", "none")


def entry_key(pair: EncodedPair, k: int, image: str | None) -> str:
    """Key of answer ``k`` of ``pair`` whose image inputs have digest ``image`` (`inputs_digest`)."""
    tokens = json.dumps([pair.prompt_ids, pair.answer_ids[k], image])
    return f"{pair.id}:{hashlib.sha256(tokens.encode()).hexdigest()[:20]}"


def cache_path(
    cache_dir: str | Path, model: torch.nn.Module, layout: str, compute_dtype: torch.dtype | None = None
) -> Path:
    """One file per (weights, layout used, compute dtype, attention kernel)."""
    dtype = str(compute_dtype or next(model.parameters()).dtype).removeprefix("torch.")
    layout = resolve_layout(model, layout)
    name = f"reference-logps-{fingerprint(model)}-{layout}-{dtype}-{attn_implementation(model)}.json"
    return Path(cache_dir) / name


def _read(path: Path) -> dict[str, float] | None:
    """The cached values, {} for no file, None for a damaged one."""
    if not path.exists():
        return {}
    try:
        values = json.loads(path.read_text())
    except ValueError:  # not JSON, or not even text (UnicodeDecodeError is a ValueError too)
        values = None
    return values if isinstance(values, dict) else None


def _load(path: Path) -> dict[str, float]:
    values = _read(path)
    if values is None:  # damaged: recomputed and rewritten, not a crash
        log.warning("%s: unreadable reference cache; recomputing", path)
        return {}
    return values


def _save(path: Path, values: dict[str, float]) -> None:
    # merged with the file as it is now, so entries a writer that does not take the lock (an older version of this
    # code) saved meanwhile are kept; a damaged file is replaced
    on_disk = _read(path) or {}
    write_atomic(path, json.dumps(on_disk | values))  # a reader never sees a half-written cache


@torch.no_grad()
def precompute_reference_logps(
    model: torch.nn.Module,
    datasets: list[Any],
    pad_token_id: int,
    cache_dir: str | Path,
    layout: str = "packed",
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[list[list[list[float]]], dict[str, Any]]:
    """The reference log-probs of every answer of every item in ``datasets``, from the cache, computing what is
    missing: ``values[d][i]`` holds those of item ``i`` of dataset ``d``, one per answer; and counts for the run
    summary. Nothing is written into the datasets (the data module takes the values).

    ``model`` must hold the reference weights (the initial policy); ``autocast_dtype`` is the compute dtype
    of the training run (so reference and policy compute alike). Items are read a batch at a time: at most
    ``2 * batch_size`` items' image inputs are held at once.

    The cache file is locked from reading to saving: a job of a sweep launched in parallel waits, then reuses
    what this one computed. Under DDP every process calls this before fitting; no collective runs while the
    lock is held (the model is not yet wrapped by the strategy), so a process waiting for it cannot stall the
    others, and the ones that wait reuse the values of the first.
    """
    path = cache_path(cache_dir, model, layout, autocast_dtype)
    with locked(path):  # re-read once the lock is held: a job that held it may have filled the file
        cached = _load(path)
        device = next(model.parameters()).device
        collate = partial(collate_pairs, pad_token_id=pad_token_id)
        amp = (
            torch.autocast(device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        counts = {"computed": 0, "reused": 0}
        values: list[list[Any]] = [[None] * len(d) for d in datasets]
        pending: list[tuple[dict[str, Any], list[str], list[Any], int]] = []  # items still to score: keys, slot

        def flush() -> None:
            batch = collate([item for item, *_ in pending])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with amp:
                logps = answer_logprobs(model, batch, pad_token_id, layout).cpu().tolist()
            for (_, keys, slots, i), row in zip(pending, logps, strict=True):
                slots[i] = row
                cached.update(zip(keys, row, strict=True))
            counts["computed"] += len(pending)
            pending.clear()

        was_training = model.training
        model.eval()
        total = sum(len(d) for d in datasets)
        with tqdm(total=total, desc="reference log-probs") as bar:
            for dataset, slots in zip(datasets, values, strict=True):
                start = 0
                for items in DataLoader(dataset, batch_size=batch_size, collate_fn=list):
                    for i, item in enumerate(items, start):
                        pair = item["pair"]
                        # each answer is keyed by the image it is scored under: the corrupted one for
                        # chosen_corrupted
                        digests = [
                            inputs_digest(item["image_inputs"]),
                            inputs_digest(item.get("corrupted_image_inputs")),
                        ]
                        answer_image = item.get("answer_image") or [0] * len(pair.answer_ids)
                        keys = [entry_key(pair, k, digests[answer_image[k]]) for k in range(len(pair.answer_ids))]
                        if all(key in cached for key in keys):
                            slots[i] = [cached[key] for key in keys]
                            counts["reused"] += 1
                        else:
                            pending.append((item, keys, slots, i))
                    start += len(items)
                    if len(pending) >= batch_size:
                        flush()
                    bar.update(len(items))
            if pending:
                flush()
        model.train(was_training)
        if counts["computed"]:
            _save(path, cached)
    summary = counts | {"cache": str(path)}
    log.info("reference log-probs: %s", summary)
    return values, summary
