"""The rehearsal: BPO end to end at llava-1.5-7b's widths on CPU, measured against the memory plan.

    make rehearse ARGS=--quick     # 1, 2 and 3 decoder layers, precomputed reference, no checkpointing (~15 min)
    make rehearse                  # + each reference strategy and gradient checkpointing off / on / selective

Each run is `src/train.py model=llava_1_5_7b_random` (random weights at full width, `model.shapes.text_layers` cut)
on the shared MMSafe-PO records with stand-in pictures (576 image tokens at 336 px), `data.max_length=768`, batch 2
x accumulation 4, bf16-mixed, BPO end to end (blind answers with a small token cap, the reference, two optimizer
steps), run as a user runs it, in its own process. Per run, one JSON line: the process's peak resident memory
(imports included; Lightning's checkpoint is off, whose `torch.save` would peak above training), the plan's figure,
seconds per optimizer step (the fit's wall time over its steps), tokens per second (``train/tokens``, prompt +
answer tokens trained, over the fit's wall time), and the caches' size on disk. The last line fits
the measured peaks of 1 and 2 layers as a line in the plan's figure and predicts 3 layers from it: ``plan_error``
is that prediction's error against the measured peak.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HIDDEN_SIZE = 4096  # llava-1.5-7b's
STEPS, BATCH, ACCUMULATE = 2, 2, 4
WRAPPER = (
    "import os, resource, runpy, sys\n"
    "sys.argv = sys.argv[1:]\n"
    "sys.path.insert(0, os.path.dirname(sys.argv[0]))\n"
    "try:\n"
    "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "finally:\n"
    "    print(f'PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr)\n"
)
_TIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def shared_data() -> Path:
    folder = os.environ.get("MLLM_BPO_SHARED_DATA") or str(ROOT.parent / "shared")
    path = Path(folder) / "data" / "mmsafe_po_test_200.json"
    if not path.is_file():
        sys.exit(f"rehearse: the shared MMSafe-PO records are not at {path} (set MLLM_BPO_SHARED_DATA)")
    return path


def overrides(layers: int, reference: str, checkpointing: str, data: Path, out: Path) -> list[str]:
    records = STEPS * BATCH * ACCUMULATE
    args = [
        "model=llava_1_5_7b_random",
        f"model.shapes.text_layers={layers}",
        "model.shapes.vision_layers=1",
        f"model.gradient_checkpointing={checkpointing}",
        "data=mmsafe_po",
        f"data.path={data}",
        "data.missing_images=render",
        "data.max_length=768",
        f"data.batch_size={BATCH}",
        f"data.max_records={records}",
        "data.val_fraction=0",
        f"trainer.accumulate_grad_batches={ACCUMULATE}",
        f"trainer.max_steps={STEPS}",
        "trainer.precision=bf16-mixed",
        "+trainer.enable_checkpointing=false",
        "blind.generation.max_new_tokens=16",
        "logger=csv",
        "~callbacks",
        f"paths.cache_dir={out}/cache",
        f"hydra.run.dir={out}",
    ]
    if reference == "adapters_disabled":  # LoRA: the reference is the policy with its adapters off
        args += ["model.lora.enabled=true", "reference.strategy=adapters_disabled"]
    else:
        args.append(f"reference.strategy={reference}")
    return args


def _seconds(line: str) -> float | None:
    match = _TIME.search(line)
    return datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() if match else None


def tokens_trained(out: Path) -> int | None:
    """The last ``train/tokens`` of the run's metrics.csv (prompt + answer tokens trained), or None if absent."""
    values = [
        row["train/tokens"]
        for path in out.rglob("metrics.csv")
        for row in csv.DictReader(path.open(encoding="utf-8"))
        if row.get("train/tokens")
    ]
    return int(float(values[-1])) if values else None


def run(layers: int, reference: str, checkpointing: str, data: Path, root: Path) -> dict[str, Any]:
    out = root / f"layers{layers}-{reference}-{checkpointing}"
    args = [sys.executable, "-c", WRAPPER, str(ROOT / "src" / "train.py")]
    args += overrides(layers, reference, checkpointing, data, out)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    text = done.stdout + done.stderr
    if done.returncode != 0:
        return {"text_layers": layers, "reference": reference, "checkpointing": checkpointing, "error": text[-1500:]}
    peak_kb = int(next(x for x in reversed(done.stderr.splitlines()) if x.startswith("PEAK_RSS_KB")).split()[1])
    plan = json.loads((out / "plan.json").read_text())
    lines = text.splitlines()
    # the fit: from the line that ends the reference precompute (or the data summary) to the saved model
    start = next((_seconds(x) for x in lines if "reference log-probs:" in x), None) or next(
        _seconds(x) for x in lines if "- data: " in x
    )
    end = next(_seconds(x) for x in lines if "saved policy and processor" in x)
    cache = sum(f.stat().st_size for f in (out / "cache").rglob("*") if f.is_file())
    tokens = tokens_trained(out)
    return {
        "text_layers": layers,
        "hidden_size": plan["details"]["hidden_size"],
        "parameters": plan["details"]["parameters"],
        "reference": reference,
        "checkpointing": checkpointing,
        "peak_gb": round(peak_kb / 2**20, 2),
        "plan_gb": plan["total_gb"],
        "seconds_per_step": round((end - start) / STEPS, 1),
        "tokens": tokens,
        "tokens_per_s": None if tokens is None else round(tokens / (end - start), 1),
        "cache_kb": round(cache / 2**10, 1),
    }


def plan_error(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The plan fitted on the 1- and 2-layer runs (measured = a + b * plan) predicts the 3-layer run's peak."""
    plain = [
        r for r in results if "error" not in r and (r["reference"], r["checkpointing"]) == ("precomputed", "false")
    ]
    by_layers = {r["text_layers"]: r for r in plain}
    if not {1, 2, 3} <= set(by_layers):
        return {"plan_error": None, "why": "the 1, 2 and 3 layer runs did not all finish"}
    (x1, y1), (x2, y2) = [(by_layers[n]["plan_gb"], by_layers[n]["peak_gb"]) for n in (1, 2)]
    slope = (y2 - y1) / (x2 - x1)
    predicted = y1 + slope * (by_layers[3]["plan_gb"] - x1)
    measured = by_layers[3]["peak_gb"]
    return {
        "hidden_size": HIDDEN_SIZE,
        "fit": {"intercept_gb": round(y1 - slope * x1, 3), "slope": round(slope, 3)},
        "predicted_3_layers_gb": round(predicted, 2),
        "measured_3_layers_gb": measured,
        "plan_error": round((predicted - measured) / measured, 3),
        "unfitted_plan_error": round((by_layers[3]["plan_gb"] - measured) / measured, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1-3 layers, precomputed reference, no checkpointing")
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "rehearse" / stamp, help="folder for the runs")
    args = parser.parse_args()
    data = shared_data()
    plan = [(n, "precomputed", "false") for n in (1, 2, 3)]
    if not args.quick:
        plan += [(2, ref, "false") for ref in ("frozen_copy", "adapters_disabled")]
        plan += [(2, "precomputed", mode) for mode in ("true", "selective")]
    results = []
    for layers, reference, checkpointing in plan:
        result = run(layers, reference, checkpointing, data, args.out)
        results.append(result)
        print(json.dumps(result), flush=True)
    summary = plan_error(results)
    print(json.dumps(summary), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rehearse.json").write_text(json.dumps({"runs": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
