"""Train a multimodal LLM by BPO, DPO or SFT: compose config -> data, model, blind answers -> fit -> save.

python src/train.py                          # BPO, tiny LLaVA, embedded data, CPU
python src/train.py experiment=dpo_tiny trainer.max_steps=10
python src/train.py experiment=sft_tiny      # SFT (no reference, no blind answers): a base for DPO / BPO
python src/train.py -m objective.beta=0.05,0.1
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python src/<entry>.py), not imported as src.<entry>: see _bootstrap.py
    import _bootstrap  # noqa: F401

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import src.plugins  # noqa: F401  (registers the plug-ins' picture drawers: world data's are drawn)
from src.data.datamodule import PreferenceDataModule
from src.data.prompt_format import PromptFormat
from src.environment import environment
from src.errors import exit_on_setting_error, marked_if_failed, run_hydra
from src.models.before_fit import blind_answers, reference_values
from src.models.module import PreferenceModule
from src.models.objectives import data_needs
from src.models.saving import save_trained
from src.models.training_run import (
    build_trainer,
    check_memory,
    check_optimized_metric,
    check_settings,
    heldout_ids,
    keep_earlier_metrics,
    log_run_end,
    optimized_value,
    quiet_lightning,
    wandb_run_ended,
)

log = logging.getLogger("train")
quiet_lightning()


def multirun_dir() -> str:
    """The sweep folder of a multirun's job (``-m``, Optuna), "" for a single run: the W&B group of its jobs."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return ""
    return str(HydraConfig.get().sweep.dir)


OmegaConf.register_new_resolver("multirun_dir", multirun_dir, replace=True)


def train(cfg: DictConfig) -> dict[str, Any]:
    check_settings(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    container = OmegaConf.to_container(cfg, resolve=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(container))
    check_memory(cfg, out_dir)

    module = PreferenceModule(
        model=container["model"],
        objective=container["objective"],
        optim=container["optim"],
        layout=cfg.layout,
        reference=container["reference"],
        nonfinite=cfg.get("nonfinite", "raise"),
    )
    check_optimized_metric(cfg.get("optimized_metric"), module)
    datamodule = PreferenceDataModule.from_config(
        cfg.data,
        prompt_format=PromptFormat.from_config(cfg.prompt_format),
        needs=data_needs(container["objective"]),  # the answers the objective scores, as the module resolved them
        processor=module.processor,
    )
    report: dict[str, Any] = {}
    if "blind" in module.answers:
        records, report["blind_answers"] = blind_answers(
            module,
            datamodule.load_records(),
            container["blind"],
            container["trainer"],
            datamodule.prompt_format,
        )
        datamodule.set_records(records)
        log.info("blind answers: %s", report["blind_answers"])
    datamodule.setup("fit")
    report["heldout"] = heldout_ids(datamodule, out_dir)
    report["data"] = datamodule.summary()
    log.info("data: %s", json.dumps(report["data"]))
    (out_dir / "data_summary.json").write_text(json.dumps(report["data"], indent=2))
    if module.reference_strategy == "precomputed":
        values, report["reference_logps"] = reference_values(
            module, datamodule.fit_sets(), container["reference"], container["trainer"]
        )
        datamodule.set_reference_logps(values)

    keep_earlier_metrics(out_dir)
    trainer, loggers = build_trainer(cfg)
    with wandb_run_ended(loggers):
        for lg in loggers:
            lg.log_hyperparams({"config": container, "data_summary": report["data"]})
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        if datamodule.val_set is not None and "val/loss" not in trainer.callback_metrics:
            # stopped by max_steps before an epoch ended: still report held-out figures for sweeps
            trainer.validate(module, datamodule=datamodule, verbose=False)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    report |= {"final_metrics": metrics, "optimizer_steps": trainer.global_step, "environment": environment()}
    model_dir = save_trained(trainer, module, out_dir, datamodule.prompt_format)
    if model_dir is not None:  # the process that saved (global rank 0)
        (out_dir / "run_summary.json").write_text(json.dumps(report, indent=2))
        log_run_end(report, model_dir)
    return metrics


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # a run that does not finish is marked (FAILED in its folder); a setting or path the user can fix: one line
    with marked_if_failed(cfg.paths.output_dir, log), exit_on_setting_error(log):
        metrics = train(cfg)
    return optimized_value(cfg.get("optimized_metric"), metrics)


if __name__ == "__main__":
    run_hydra(main)
