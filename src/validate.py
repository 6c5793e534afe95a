"""Check a preference data set with the same readers, image resolution and tokenization as training.

    python src/validate.py data=mmsafe_po data.path=train.json data.image_root=images/ [strict=true]

Prints where every record of the file went, each counted once (records read = usable + rejected +
skipped), every problem (file, line or index, record id, what is wrong) and every skipped record; the same
figures go to validation.json. Exits 0 when no record is rejected, 1 otherwise (with strict=true, truncation
skips count too).
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
        return {"path": str(cfg.data.path), "fatal": str(e), "problems": datamodule.problems, "ok": False}
    summary = datamodule.summary(limit=None)
    summary["ok"] = summary["rejected_records"] == 0 and not (cfg.strict and summary["skipped"])
    return summary


def _listed(title: str, items: list[str], show: int) -> list[str]:
    if not items:
        return []
    return [f"{title} ({min(show, len(items))} shown of {len(items)}):"] + [f"  - {p}" for p in items[:show]]


def report(summary: dict[str, Any], show: int) -> str:
    if "fatal" in summary:
        problems = _listed("problems", summary.get("problems") or [], show)
        return "\n".join([f"{summary['path']}: cannot be used: {summary['fatal']}", *problems])
    by_reason = f" {json.dumps(summary['skipped_by_reason'])}" if summary["skipped"] else ""
    lines = [f"data set: {summary['path']}", f"records in file:   {summary['records_in_file']}"]
    not_selected = summary["not_selected"]
    if not_selected:  # left out on purpose by data.ids_file / data.max_records
        lines.append(f"not selected:      {sum(not_selected.values())} {json.dumps(not_selected)}")
    lines += [
        f"records read:      {summary['records_read']} (= usable + rejected + skipped)",
        f"usable:            {summary['usable']}",
        f"rejected (errors): {summary['rejected_records']}",
        f"skipped:           {summary['skipped']}{by_reason}",
        f"stand-in images:   {summary['stand_in_images']} (usable records drawn as a stand-in, image file missing)",
    ]
    for split in ("train", "val"):
        if split in summary:
            s = summary[split]
            lines.append(
                f"{split}: {s['encoded']} encoded, history dropped in {s['records_with_history_dropped']}, "
                f"{s['answers_truncated']} answers truncated"
            )
    lines += _listed("problems", summary["problems"], show)
    lines += _listed("skipped", summary["skipped_records"], show)
    if summary["rejected_records"]:
        lines.append("NOT OK: see the problems above")
    elif not summary["ok"]:
        lines.append("NOT OK (strict=true): records were skipped, see above")
    else:
        lines.append("OK: every record is usable" if not summary["skipped"] else "OK: no bad record (some skipped)")
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
