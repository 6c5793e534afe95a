"""The GPU check: what only a CUDA device can show, in one short run (a few minutes on one H100), one JSON line.

    bash perf/gpu_check.sh              # on a machine with a CUDA device
    bash perf/gpu_check.sh --dry-run    # anywhere: compose and check every configuration it would run

1. The tiny LLaVA on CUDA under sdpa, flex attention and eager: the packed layout's answer log-probs equal the
   padded layout's under bf16 autocast (the largest difference is reported), and one training step of
   `src/train.py` each (bf16-mixed).
2. llava-1.5-7b's architecture at full width with 4 decoder layers and random weights
   (`model=llava_1_5_7b_random`): one BPO step of `src/train.py` at the paper's 768 tokens and batch 2, its step
   time, and its peak CUDA memory against the memory plan's (`plan_error`).

``--dry-run`` composes each run's configuration, checks its settings' ranges and computes the plan of the
full-width run: nothing is built or loaded, no device is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ATTENTIONS = ("sdpa", "flex_attention", "eager")
TINY = ["trainer=gpu", "trainer.max_steps=1", "data.max_records=16", "blind.generation.max_new_tokens=8", "logger=csv"]
FULL_WIDTH = [
    "model=llava_1_5_7b_random",
    "model.shapes.text_layers=4",
    "model.shapes.vision_layers=1",
    "trainer=gpu",
    "trainer.max_steps=1",
    "data.max_length=768",
    "data.batch_size=2",
    "data.max_records=8",
    "data.val_fraction=0",
    "blind.generation.max_new_tokens=8",
    "logger=csv",
    "~callbacks",
    "+trainer.enable_checkpointing=false",
]


def runs() -> dict[str, list[str]]:
    """Every training run of the check, by name: its overrides of train.yaml."""
    out = {f"tiny_{attn}": [*TINY, f"model.attn_implementation={attn}"] for attn in ATTENTIONS}
    out["llava_1_5_7b_4_layers"] = FULL_WIDTH
    return out


def compose(overrides: list[str], out_dir: Path) -> Any:
    from tests.helpers import compose_config

    return compose_config("train", [*overrides, f"paths.cache_dir={out_dir}/cache"], out_dir)


def dry_run(out_dir: Path) -> dict[str, Any]:
    """Every configuration composed and range-checked, and the full-width run's plan on an 80 GB device."""
    from src.models.memory import plan_memory
    from src.settings import TRAIN, check_ranges

    checked = []
    for name, overrides in runs().items():
        cfg = compose(overrides, out_dir / name)
        check_ranges(cfg, TRAIN)
        checked.append(name)
    plan = plan_memory(compose(FULL_WIDTH, out_dir / "plan"), 80.0)
    return {"dry_run": True, "configs_checked": checked, "plan_total_gb": round(plan.total_gb, 2), "fits": plan.fits}


def layout_difference(attn: str) -> float:
    """The largest |packed - padded| of answer log-probs of the tiny LLaVA under bf16 autocast on CUDA."""
    import torch

    from src.data.encoding import PromptEncoder, collate_pairs
    from src.data.images import render_stand_in
    from src.data.records import PreferenceRecord, Turn
    from src.models.logprobs import answer_logprobs
    from src.models.tiny import build_tiny_llava

    model, processor = build_tiny_llava(seed=0, attn_implementation=attn)
    model = model.cuda().eval()
    encoder = PromptEncoder(processor, max_length=512)
    records = [
        PreferenceRecord(f"r{i}", (Turn("user", f"What is in picture {i}?"),), 0, "x.png", "No." * (i + 1), "Yes.")
        for i in range(4)
    ]
    items = []
    for r in records:
        image = render_stand_in(r.id, 32)
        inputs = dict(processor.image_processor(images=image, return_tensors="pt"))
        items.append({"pair": encoder.encode(r, image, ("chosen", "rejected")), "image_inputs": inputs})
    batch = collate_pairs(items, processor.tokenizer.pad_token_id)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed = answer_logprobs(model, batch, pad, layout="packed")
        padded = answer_logprobs(model, batch, pad, layout="padded")
    return float((packed - padded).abs().max())


def train_once(name: str, overrides: list[str], out_dir: Path) -> dict[str, Any]:
    """One run of `src.train.train`: seconds, optimizer steps, peak CUDA memory and the plan's figure."""
    import torch

    from src.train import train

    torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    train(compose(overrides, out_dir / name))
    seconds = time.monotonic() - start
    plan = json.loads((out_dir / name / "plan.json").read_text())
    peak = torch.cuda.max_memory_allocated() / 2**30
    tensors = plan["total_gb"] - plan["parts"]["overhead"]  # the allocator's figure counts tensors only
    return {
        "seconds": round(seconds, 1),
        "peak_gb": round(peak, 2),
        "plan_tensors_gb": round(tensors, 2),
        "plan_error": round((tensors - peak) / peak, 3) if peak else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="compose and check every configuration; run nothing")
    parser.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    if args.dry_run:
        print(json.dumps(dry_run(out_dir)))
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (run with --dry-run to check the configurations only)")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for attn in ATTENTIONS:
        result[f"tiny_{attn}_packed_vs_padded_max_abs"] = layout_difference(attn)
    for name, overrides in runs().items():
        result[name] = train_once(name, overrides, out_dir)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
