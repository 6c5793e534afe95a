"""Gather evaluation reports into one comparison table and plot.

python src/compare.py 'inputs=[logs/eval/multiruns/2026-01-01_00-00-00]'
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python src/<entry>.py), not imported as src.<entry>: see _bootstrap.py
    import _bootstrap  # noqa: F401

import hydra
from omegaconf import DictConfig

import src.plugins  # noqa: F401  (registers the plug-ins' benchmarks, drawers and comparison parts)
from src.errors import run_hydra, task_started
from src.evaluation.comparison import CompareError, compare_reports, find_reports, mapping, print_written

log = logging.getLogger("compare")


@hydra.main(version_base="1.3", config_path="../configs", config_name="compare")
def main(cfg: DictConfig) -> dict[str, Any]:
    task_started()
    out = Path(cfg.paths.output_dir)
    try:
        paths = find_reports([Path(p) for p in cfg.inputs])
        table = compare_reports(paths, list(cfg.labels) if cfg.labels else None, out)
    except (CompareError, FileNotFoundError) as e:  # a setting to change: one line, no stack trace
        log.error("compare: %s", e)
        sys.exit(2)
    log.info("compared %d reports; label -> report:\n%s", len(paths), "\n".join(mapping(table["rows"])))
    if table["differs"]:
        log.warning(
            "the reports differ in %s: rows are marked by setup (%s), see comparison.md",
            ", ".join(table["differs"]),
            "; ".join(f"{m}: {s}" for m, s in table["setups"].items()),
        )
    print_written(out)
    return table


if __name__ == "__main__":
    run_hydra(main)
