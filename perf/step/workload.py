"""The benchmark's workloads: the 200 real MMSafe-PO records (``mmsafe``, the default) or the synthetic one.

Both are written as the generic JSONL the workers read (TRL's side and ours read the same file). The records are
written in the order of training's first-epoch shuffle (`EpochShuffle`, seed 0, epoch 0) and both sides read the
file without shuffling, so they see the same batches, and the batches mix lengths as training's do.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from perf.step.common import ROOT, image_size

WORKLOADS = ("mmsafe", "synthetic")
SHARED_DATA_ENV = "MLLM_BPO_SHARED_DATA"  # as tests/conftest.py: a folder holding data/, or "none" (absent)
MMSAFE_FILE = "mmsafe_po_test_200.json"


def default_mmsafe_path() -> tuple[Path | None, str]:
    """(the shared MMSafe-PO file, or None where hidden; where it was looked for, for the error message)."""
    shared = os.environ.get(SHARED_DATA_ENV) or str(ROOT.parent / "shared")
    if shared == "none":
        return None, f"{SHARED_DATA_ENV}=none"
    path = Path(shared) / "data" / MMSAFE_FILE
    return path, str(path)


def epoch_order(n: int) -> list[int]:
    """Training's visiting order of ``n`` records in its first epoch (`PreferenceDataModule.train_dataloader`)."""
    from src.data.dataset import EpochShuffle

    return list(EpochShuffle(n, seed=0, epoch_fn=lambda: 0))


def make_mmsafe(source: Path, folder: Path, n_records: int | None = None) -> dict[str, Any]:
    """Write the first ``n_records`` (all: None) MMSafe-PO records of ``source`` as generic JSONL; returns the path.

    The records are read by the project's `mmsafe_po` reader (``USER:`` / ``ASSISTANT:`` stripped, history turns
    kept), so prompts and answers are the text training sees. Each image is the stand-in a user with
    ``data.missing_images=render`` gets (the real images are not shipped), drawn at the model's image size and
    saved as PNG (lossless: the same pixels). The blind answer of record i (source order) is the chosen answer of
    record (i + 1) % N: a real answer of the same length distribution, unrelated to the prompt, as a blind answer is.
    """
    from src.data.images import ImageResolver
    from src.data.readers import read_records

    records = read_records(source, "mmsafe_po")[:n_records]
    # no image root: the stand-in is drawn wherever the named file is missing (it is, as on a fresh clone)
    resolver = ImageResolver(None, "render", image_size(), default_root=source.parent)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    n = len(records)
    with (folder / "data.jsonl").open("w", encoding="utf-8") as f:
        for i in epoch_order(n):
            record = records[i]
            image = f"images/{i:04d}.png"
            resolver(record).save(folder / image)
            line = {
                "id": record.id,
                "messages": record.messages(),  # content lists: the image stays in its turn
                "image": image,
                "chosen": record.chosen,
                "rejected": record.rejected,
                "blind": records[(i + 1) % n].chosen,
            }
            line |= {k: record.meta[k] for k in ("group", "entity") if k in record.meta}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return {"path": str(folder / "data.jsonl"), "records": n, "stand_ins": len(resolver.rendered)}


def token_stats(dm: Any) -> dict[str, dict[str, float]]:
    """min / median / mean / max of the prompt and of each answer in tokens, as training encodes them (the prompt
    with its image tokens, each answer with its end of turn), over the data module's training pairs."""
    pairs = dm.train_set.pairs
    columns = {"prompt": [len(p.prompt_ids) for p in pairs]}
    for k, key in enumerate(dm.answers):
        columns[key] = [len(p.answer_ids[k]) for p in pairs]

    def stats(xs: list[int]) -> dict[str, float]:
        return {"min": min(xs), "median": statistics.median(xs), "mean": sum(xs) / len(xs), "max": max(xs)}

    return {key: stats(xs) for key, xs in columns.items()}


def describe(stats: dict[str, dict[str, float]]) -> str:
    """One line per column: ``prompt  min 600  median 612  mean 613.4  max 650``."""
    return "\n".join(
        f"  {key:<9} " + "  ".join(f"{s} {v:.1f}" if s == "mean" else f"{s} {v:g}" for s, v in st.items())
        for key, st in stats.items()
    )


def prepare(args: Any, folder: Path) -> dict[str, Any]:
    """Write ``args.workload`` into ``folder``; print its token statistics on stderr; return its path, the statistics,
    the blind answers' ``max_new_tokens`` (see `perf.step.endtoend`) and our padding shares."""
    import sys

    from perf.step.common import build_policy
    from perf.step.data import make_data, ordered_loader, ours_datamodule
    from perf.step.padding import ours_padding_share
    from src.models.objectives import ANSWERS

    if args.workload == "mmsafe":
        data = make_mmsafe(Path(args.mmsafe_path), folder, args.records)
        source = f"{data['records']} MMSafe-PO records of {args.mmsafe_path}, stand-in images ({data['stand_ins']})"
    else:
        data = make_data(folder, args.records)
        source = f"{data['records']} synthetic records, 1 PNG image each"
    model, processor = build_policy()  # sdpa, as our rows train
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    shares = {}
    for objective in ("dpo", "bpo"):
        dm = ours_datamodule(data["path"], processor, ANSWERS[objective])
        shares[objective] = ours_padding_share(ordered_loader(dm, pad), pad, model)
    shares["before"] = ours_padding_share(ordered_loader(dm, pad), pad)  # BPO, one row per record
    stats = token_stats(dm)  # the BPO data module: chosen, rejected, blind
    real = (stats["chosen"]["mean"] + stats["rejected"]["mean"]) / 2  # the same count of each
    print(f"workload {args.workload}: {source}; tokens per record:\n{describe(stats)}", file=sys.stderr)
    return data | {
        "workload": args.workload,
        "widths": args.widths,
        "text_layers": args.text_layers if args.widths != "tiny" else None,
        "token_stats": stats,
        "mean_answer_tokens": real,
        "blind_max_new_tokens": round(real),
        "tokenizer_vocab": len(tok),
        "padding_share_before": shares["before"],
        "padding_share": shares["bpo"],
        "padding_share_dpo": shares["dpo"],
    }
