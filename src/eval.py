"""Evaluate a model on a safety benchmark: generate -> judge -> metrics -> report.

    python src/eval.py model.path=logs/train/runs/<run>/model benchmark=mmsafe_po \
        benchmark.path=mmsafe_po_test.json benchmark.missing_images=render judge=keyword
    python src/eval.py -m model.path=base,dpo/model,bpo/model ...      # then: python src/compare.py ...
    python src/eval.py model.path=<model> benchmark=world judge=world world.seed=3   # grounded-safety world
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python src/<entry>.py), not imported as src.<entry>: see _bootstrap.py
    import _bootstrap  # noqa: F401

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import src.plugins  # noqa: F401  (registers the plug-ins' benchmarks, drawers and comparison parts)
from src.environment import environment
from src.errors import exit_on_setting_error, marked_if_failed, run_hydra
from src.evaluation.judges import JudgeError
from src.evaluation.report import log_to_wandb, markdown, plot, write_json
from src.evaluation.runner import Evaluator, headline

log = logging.getLogger("eval")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.paths.output_dir)
    evaluator = Evaluator(cfg, out_dir)
    report = evaluator.run() | {"environment": environment()}
    evaluator.write_generations()
    write_json(out_dir / "report.json", report)
    # the scenarios this judge judges by its own criteria (keyword: category_phrases, openai: category_criteria)
    special = [*(cfg.judge.get("category_phrases") or {}), *(cfg.judge.get("category_criteria") or {})]
    (out_dir / "report.md").write_text(markdown(report, special_criteria=special, benchmark=evaluator.benchmark))
    plot(report, out_dir / "report.png", evaluator.benchmark)
    scalars = headline(report)
    wandb_dir = log_to_wandb(report, evaluator.lines, out_dir, OmegaConf.to_container(cfg.wandb, resolve=True), scalars)
    log.info("figures: %s", {k: round(v, 4) for k, v in scalars.items()})
    log.info("report: %s%s", out_dir / "report.md", f"; W&B run: {wandb_dir}" if wandb_dir else "")
    return report


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    # a setting or path the user can fix (data, model, judge): one line, exit 2; a run that does not finish: FAILED
    with marked_if_failed(cfg.paths.output_dir, log), exit_on_setting_error(log):
        try:
            evaluate(cfg)
        except JudgeError as e:  # no judge, no figures: one line saying why, and no report that looks finished
            log.error("%s", e)
            sys.exit(1)


if __name__ == "__main__":
    run_hydra(main)
