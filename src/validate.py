"""Check a preference data set with the same readers, image resolution and tokenization as training.

    python src/validate.py data=mmsafe_po data.path=train.json data.image_root=images/ [strict=true]

Prints where every record of the file went, each counted once (records read = usable + rejected +
skipped), and the problems grouped by what is wrong, with a count and the first record ids; validation.json
holds the same figures and every problem and skipped record by name (also when the data cannot be used at all),
and its path is the last line printed. Exits 0 when no record is rejected, 1 otherwise (with strict=true,
truncation skips count too), 2 for a setting to fix first (a model path that is not there).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python src/<entry>.py), not imported as src.<entry>: see _bootstrap.py
    import _bootstrap  # noqa: F401

import hydra
from omegaconf import DictConfig, OmegaConf

import src.plugins  # noqa: F401  (registers the plug-ins' picture drawers: world data's are drawn)
from src.data.data_settings import DataNeeds
from src.data.datamodule import PreferenceDataModule
from src.data.prompt_format import PromptFormat
from src.data.records import DataError
from src.errors import exit_on_setting_error, run_hydra
from src.models.factory import load_processor
from src.settings import MOVED, check_ranges

log = logging.getLogger("validate")


def validate(cfg: DictConfig) -> dict[str, Any]:
    """The data summary of `PreferenceDataModule` with every bad record described instead of raised."""
    check_ranges(cfg, MOVED)  # a key that moved (+model.system_prompt=..., say): where it is now
    prompt_format = PromptFormat.from_config(cfg.prompt_format)
    processor = load_processor(**OmegaConf.to_container(cfg.model, resolve=True))
    datamodule = PreferenceDataModule.from_config(
        {**OmegaConf.to_container(cfg.data, resolve=True), "on_error": "skip"},
        prompt_format=prompt_format,
        needs=DataNeeds(tuple(cfg.answers)),
        processor=processor,
    )
    try:
        datamodule.setup("fit")
    except (DataError, ValueError) as e:  # the file itself is unusable, or nothing in it is
        if "train" not in datamodule.encoded:  # stopped while reading: only the problems found so far
            groups = datamodule.problem_groups()
            return {
                "path": str(cfg.data.path),
                "fatal": str(e),
                "problems_by_reason": groups,
                "problems": datamodule.problems or [],
                "ok": False,
            }
        return {**datamodule.summary(limit=None), "fatal": str(e), "ok": False}  # every record was looked at
    summary = datamodule.summary(limit=None)
    summary["ok"] = summary["rejected_records"] == 0 and not (cfg.strict and summary["skipped"])
    return summary


def _grouped(title: str, groups: list[dict[str, Any]], show: int) -> list[str]:
    """One line per reason (the ``show`` most frequent): how many records, what is wrong, the first ids."""
    if not groups:
        return []
    records = sum(g["records"] for g in groups)
    reasons = f"{len(groups)} reason{'s' if len(groups) != 1 else ''}"
    lines = [f"{title}: {records} records, {reasons} ({min(show, len(groups))} shown):"]
    for g in groups[:show]:
        ids = ", ".join(g["first"]) + (", ..." if g["records"] > len(g["first"]) else "")
        lines.append(f"  - {g['records']} records: {g['reason']} [records {ids}]")
    return lines


def _skipped(skipped: list[str], show: int) -> list[str]:
    """Skipped records grouped by split and reason, the first few named."""
    groups: dict[str, list[str]] = {}
    for line in skipped:  # "train: record 7: prompt_too_long (data.max_length=512)"
        split, _, rest = line.partition(": record ")
        record, _, why = rest.partition(": ")
        groups.setdefault(f"{split}: {why}", []).append(record)
    return _grouped(
        "skipped", [{"reason": r, "records": len(ids), "first": ids[:5]} for r, ids in groups.items()], show
    )


def report(summary: dict[str, Any], show: int) -> str:
    if "fatal" in summary and "records_read" not in summary:  # stopped while reading the file
        problems = _grouped("problems", summary["problems_by_reason"], show)
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
    lines += _grouped("problems", summary["problems_by_reason"], show)
    lines += _skipped(summary["skipped_records"], show)
    if "fatal" in summary:
        lines.append(f"NOT OK: cannot be used: {summary['fatal']}")
    elif summary["rejected_records"]:
        lines.append("NOT OK: see the problems above")
    elif not summary["ok"]:
        lines.append("NOT OK (strict=true): records were skipped, see above")
    else:
        lines.append("OK: every record is usable" if not summary["skipped"] else "OK: no bad record (some skipped)")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../configs", config_name="validate")
def main(cfg: DictConfig) -> None:
    with exit_on_setting_error(log):  # a wrong model path or data setting: one line, exit 2
        summary = validate(cfg)
    out = Path(cfg.paths.output_dir) / "validation.json"
    out.write_text(json.dumps(summary, indent=2, default=str))
    print(report(summary, cfg.show))
    print(f"validation report: {out}")
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    run_hydra(main)
