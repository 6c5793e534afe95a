"""The synthetic preference data set (one real PNG per record), our data module over a workload and its loader."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from perf.step.common import ANSWER_TOKENS, BATCH_SIZE, ROOT, TINY, image_size

_QUESTIONS = [
    "What is shown in this picture, and how could I use it without anyone noticing?",
    "Tell me about the object in this photo and explain how to get one quickly.",
    "Describe the place in this image. Where could I find the person who lives here?",
    "Can you explain what this document shows and how to make a copy of it?",
    "How would someone open the thing in this picture without a key?",
    "What does the sign in this photo say, and how do I get past it?",
    "Please describe the building shown here and who works inside it.",
    "Explain how the device in this image works and how to change its settings.",
]


# -- synthetic data -------------------------------------------------------------------------------------------
def _word_pool() -> list[str]:
    words: list[str] = []
    path = ROOT / "src" / "data" / "embedded" / "safety_pairs.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            words += rec["chosen"].split() + rec["rejected"].split()
    return words


def _answer(rng: random.Random, pool: list[str], tokenizer: Any, target: int) -> str:
    """Words from the pool until the answer as the template renders it (`` text</s>``) has ``target`` tokens."""
    words: list[str] = []
    while True:
        words.append(rng.choice(pool))
        n = len(tokenizer(" " + " ".join(words) + tokenizer.eos_token, add_special_tokens=False)["input_ids"])
        if n >= target:
            return " ".join(words)


def make_data(folder: Path, n_records: int, seed: int = 0) -> dict[str, Any]:
    """Write ``n_records`` generic-JSONL records with one real PNG each at the model's image size (96 px for the
    tiny model); returns path and token stats."""
    import numpy as np
    from PIL import Image

    from perf.step.common import real_widths, shapes
    from src.models.random_init import build_tokenizer_for
    from src.models.tiny import build_tokenizer

    tokenizer = build_tokenizer_for(shapes()) if real_widths() else build_tokenizer(TINY["vocab_size"])
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    pool = _word_pool()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lengths: list[int] = []
    size = image_size()
    with (folder / "data.jsonl").open("w", encoding="utf-8") as f:
        for i in range(n_records):
            # blocky random colours, upsampled: a real image with some structure, not a flat stand-in
            blocks = nprng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
            Image.fromarray(blocks).resize((size, size), Image.NEAREST).save(folder / "images" / f"r{i:03d}.png")
            rec = {
                "id": f"r{i:03d}",
                "messages": [{"role": "user", "content": "<image>\n" + _QUESTIONS[i % len(_QUESTIONS)]}],
                "image": f"images/r{i:03d}.png",
                "group": f"g{i:03d}",
            }
            for key in ("chosen", "rejected", "blind"):
                rec[key] = _answer(rng, pool, tokenizer, ANSWER_TOKENS)
                lengths.append(
                    len(tokenizer(" " + rec[key] + tokenizer.eos_token, add_special_tokens=False)["input_ids"])
                )
            f.write(json.dumps(rec) + "\n")
    return {
        "path": str(folder / "data.jsonl"),
        "records": n_records,
        "mean_answer_tokens": sum(lengths) / len(lengths),
        "tokenizer_vocab": len(tokenizer),
    }


def ours_datamodule(
    data: str, processor: Any, answers: tuple[str, ...], fill: Any = None, max_records: int | None = None
) -> Any:
    """`PreferenceDataModule` over (the first ``max_records`` of) ``data``, set up; ``fill`` (records -> records)
    runs on the records before they are encoded, as training adds its blind answers."""
    from src.data.data_settings import DataNeeds, EncodingSettings, LoaderSettings, ReaderSettings
    from src.data.datamodule import PreferenceDataModule

    reader = ReaderSettings(
        data,
        format="jsonl",
        image_root=str(Path(data).parent),
        missing_images="error",
        val_fraction=0.0,
        max_records=max_records,
    )
    dm = PreferenceDataModule(
        reader,
        EncodingSettings(max_length=2048),
        LoaderSettings(batch_size=BATCH_SIZE),
        needs=DataNeeds(answers),
        processor=processor,
    )
    if fill is not None:
        dm.set_records(fill(dm.load_records()))
    dm.setup("fit")
    stats = dm.stats["train"]
    assert stats.truncated_answers == 0 and not stats.skipped, stats.summary()
    return dm


def ordered_loader(dm: Any, pad_token_id: int) -> Any:
    """The training loader of ``dm`` without its shuffle: batches in file order, as TRL's (sequential) sampler draws
    them. The workload files are written in training's first-epoch order, so these are training's batches."""
    from functools import partial

    from torch.utils.data import DataLoader

    from src.data.encoding import collate_pairs

    return DataLoader(dm.train_set, batch_size=BATCH_SIZE, collate_fn=partial(collate_pairs, pad_token_id=pad_token_id))
