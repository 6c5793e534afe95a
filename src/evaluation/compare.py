"""One table (markdown + JSON) and one plot from several evaluation reports."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from src.evaluation.report import plt, write_json
from src.evaluation.runner import headline


def natural_key(path: Path) -> list[tuple[int, int | str]]:
    """Sort key reading digit runs as numbers, so sweep job folders order 0, 1, 2, ..., 10, 11 (as labels given in
    sweep order expect), not 0, 1, 10, 11, 2 as text."""
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", str(path)) if t]


def find_reports(inputs: list[Path]) -> list[Path]:
    """report.json files named directly or found below the given folders (in job-number order)."""
    found: list[Path] = []
    for p in inputs:
        if p.is_dir():
            found += sorted(p.rglob("report.json"), key=natural_key)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such report or folder")
    if not found:
        raise FileNotFoundError(f"no report.json under {[str(p) for p in inputs]}")
    return found


# row fields that are not headline metrics
INFO = {"label", "benchmark", "judge", "n", "report", "overrides", "judge_separation"}


def _label(report: dict[str, Any], path: Path) -> str:
    model = report.get("model", {}).get("path")
    if not model:
        return path.parent.name
    parts = Path(str(model)).parts
    return "/".join(parts[-3:-1]) if parts and parts[-1] == "model" else str(model)


def compare_reports(paths: list[Path], labels: list[str] | None, out_dir: Path) -> dict[str, Any]:
    """Write comparison.{md,json,png} to ``out_dir``; returns the table."""
    reports = [json.loads(p.read_text()) for p in paths]
    if labels is not None and len(labels) != len(reports):
        raise ValueError(f"{len(labels)} labels for {len(reports)} reports")
    labels = labels or [_label(r, p) for r, p in zip(reports, paths, strict=True)]
    rows = []
    for label, report, path in zip(labels, reports, paths, strict=True):
        cal = report.get("judge_calibration") or {}
        rows.append(
            {
                "label": label,
                "benchmark": report["benchmark"]["name"],
                "judge": report["judge"],
                "n": report.get("n"),
                "judge_separation": cal.get("separation"),
                "report": str(path),
                "overrides": _overrides(path),
                **headline(report),
            }
        )
    metrics = sorted({k for r in rows for k in r} - INFO)
    head = ["model", "benchmark", "judge", "n", *metrics, "judge separation"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["label"], r["benchmark"], r["judge"], str(r["n"])] + [_fmt(r.get(m)) for m in metrics]
        lines.append("| " + " | ".join(cells + [_fmt(r["judge_separation"])]) + " |")
    md = "# Comparison\n\n" + "\n".join(lines) + "\n\nReports:\n\n" + "".join(f"- {m}\n" for m in mapping(rows))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.md").write_text(md)
    table = {"metrics": metrics, "rows": rows}
    write_json(out_dir / "comparison.json", table)
    _plot(rows, metrics, out_dir / "comparison.png")
    return table


def _overrides(report: Path) -> list[str] | None:
    """The sweep job's command-line overrides saved by Hydra beside the report (None when there are none)."""
    saved = report.parent / ".hydra" / "overrides.yaml"
    return [str(o) for o in yaml.safe_load(saved.read_text()) or []] if saved.is_file() else None


def mapping(rows: list[dict[str, Any]]) -> list[str]:
    """One line per row: its label, the report it shows and that job's overrides, to check labels against."""
    return [
        f"{r['label']}: `{r['report']}`" + (f" (overrides: {' '.join(r['overrides'])})" if r["overrides"] else "")
        for r in rows
    ]


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.4f}"
    return "" if x is None else str(x)


def _plot(rows: list[dict[str, Any]], metrics: list[str], path: Path) -> None:
    if not metrics:
        return
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(metrics) * len(rows) / 2 + 3), 4))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        values = [row.get(m, float("nan")) for m in metrics]
        ax.bar([j + i * width for j in range(len(metrics))], values, width, label=row["label"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
