"""Reference log-probs computed once before training and cached on disk.

The reference model is the initial policy and never changes, so log pi_ref(y|x) of every (record, answer)
is a constant of the data set. Computing it once (batched, in the packed layout) removes the reference
forward from every training step and the frozen copy from memory.

The cache is a JSON file per model fingerprint, layout and image fitting (crop | pad), keyed by record id
and a hash of the exact prompt and answer tokens, so it is invalidated by a different model or image
preprocessing, and per entry by changed data, answers, system prompt, truncation or tokenization.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from src.data.encoding import EncodedPair, collate_pairs
from src.models.factory import fingerprint
from src.models.logprobs import answer_logprobs

log = logging.getLogger(__name__)

# none: no reference at all, for objectives that do not take one (sft)
STRATEGIES = ("precomputed", "frozen_copy", "adapters_disabled", "none")


def entry_key(pair: EncodedPair, k: int) -> str:
    tokens = json.dumps([pair.prompt_ids, pair.answer_ids[k]])
    return f"{pair.id}:{hashlib.sha256(tokens.encode()).hexdigest()[:20]}"


def cache_path(cache_dir: str | Path, model: torch.nn.Module, layout: str, image_aspect_ratio: str) -> Path:
    return Path(cache_dir) / f"reference-logps-{fingerprint(model)}-{layout}-{image_aspect_ratio}.json"


def _load(path: Path) -> dict[str, float]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s: unreadable reference cache; recomputing", path)
        return {}


def _save(path: Path, values: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(values))
    os.replace(tmp, path)  # atomic: a reader never sees a half-written cache


@torch.no_grad()
def precompute_reference_logps(
    model: torch.nn.Module,
    datasets: list[Any],
    pad_token_id: int,
    cache_dir: str | Path,
    layout: str = "packed",
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Fill ``reference_logps`` of every pair in ``datasets`` from the cache, computing what is missing.

    ``model`` must hold the reference weights (the initial policy). Returns counts for the run summary.
    """
    # the entry keys hold tokens, not pixels: how the datasets' encoder fits images to the model keys the file
    path = cache_path(cache_dir, model, layout, "-".join(sorted({d.encoder.image_aspect_ratio for d in datasets})))
    cached = _load(path)
    todo: list[tuple[Any, int]] = []
    reused = 0
    for dataset in datasets:
        for index, pair in enumerate(dataset.pairs):
            keys = [entry_key(pair, k) for k in range(len(pair.answer_ids))]
            if all(key in cached for key in keys):
                pair.reference_logps = [cached[key] for key in keys]
                reused += 1
            else:
                todo.append((dataset, index))
    if todo:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        loader = DataLoader(
            [dataset[index] for dataset, index in todo],
            batch_size=batch_size,
            collate_fn=partial(collate_pairs, pad_token_id=pad_token_id),
        )
        amp = (
            torch.autocast(device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        offset = 0
        with amp:
            for batch in tqdm(loader, desc="reference log-probs"):
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                logps = answer_logprobs(model, batch, pad_token_id, layout).cpu().tolist()
                for row in logps:
                    dataset, index = todo[offset]
                    pair = dataset.pairs[index]
                    pair.reference_logps = row
                    for k, value in enumerate(row):
                        cached[entry_key(pair, k)] = value
                    offset += 1
        model.train(was_training)
        _save(path, cached)
    summary = {"computed": len(todo), "reused": reused, "cache": str(path)}
    log.info("reference log-probs: %s", summary)
    return summary
