"""Check a preference data set with the same readers, image resolution and tokenization as training.

    python src/validate.py data=mmsafe_po data.path=train.json data.image_root=images/ [strict=true]

Prints records read, usable, skipped by reason and every problem (file, line or index, record id, what
is wrong); exits 0 when every record is usable, 1 otherwise (with strict=true, truncation skips count).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from src.data.records import DataError  # noqa: E402
from src.models.factory import load_processor  # noqa: E402

log = logging.getLogger("validate")


def validate(cfg: DictConfig) -> dict[str, Any]:
    """The data summary of `PreferenceDataModule` with every bad record described instead of raised."""
    processor = load_processor(**OmegaConf.to_container(cfg.model, resolve=True))
    datamodule = hydra.utils.instantiate(
        cfg.data,
        processor=processor,
        answers=list(cfg.answers),
        on_error="skip",
        system_prompt=cfg.model.get("system_prompt"),
    )
    try:
        datamodule.setup("fit")
    except (DataError, ValueError) as e:  # the file itself is unusable, or nothing in it is
        return {"path": str(cfg.data.path), "fatal": str(e), "ok": False}
    summary = datamodule.summary()
    skipped = {}
    for split in ("train", "val"):
        for reason, n in summary.get(split, {}).get("skipped_by_reason", {}).items():
            skipped[reason] = skipped.get(reason, 0) + n
    usable = sum(summary.get(s, {}).get("encoded", 0) for s in ("train", "val"))
    rejected = summary.get("rejected_records", 0)
    truncation_skips = sum(n for reason, n in skipped.items() if reason != "bad_record")
    summary |= {"usable": usable, "skipped": skipped, "ok": rejected == 0 and not (cfg.strict and truncation_skips)}
    return summary


def report(summary: dict[str, Any], show: int) -> str:
    if "fatal" in summary:
        return f"{summary['path']}: cannot be used: {summary['fatal']}"
    lines = [
        f"data set: {summary['path']}",
        f"records read:      {summary['records_read'] + summary.get('rejected_records', 0)}",
        f"usable:            {summary['usable']}",
        f"rejected (errors): {summary.get('rejected_records', 0)}",
        f"skipped:           {json.dumps(summary['skipped']) if summary['skipped'] else 0}",
        f"stand-in images:   {summary.get('stand_in_images', 0)}",
    ]
    for split in ("train", "val"):
        if split in summary:
            s = summary[split]
            lines.append(
                f"{split}: {s['encoded']} encoded, history dropped in {s['records_with_history_dropped']}, "
                f"{s['answers_truncated']} answers truncated"
            )
    problems = summary.get("problems", [])
    if problems:
        lines.append(f"problems ({len(problems)} shown of {summary.get('rejected_records', 0)}):")
        lines += [f"  - {p}" for p in problems[:show]]
    lines.append("OK: every record is usable" if summary["ok"] else "NOT OK: see the problems above")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../configs", config_name="validate")
def main(cfg: DictConfig) -> None:
    summary = validate(cfg)
    print(report(summary, cfg.show))
    out = Path(cfg.paths.output_dir) / "validation.json"
    out.write_text(json.dumps(summary, indent=2, default=str))
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
