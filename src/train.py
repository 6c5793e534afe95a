"""Train a multimodal LLM by BPO or DPO: compose config -> data, model, blind answers -> fit -> save.

python src/train.py                          # BPO, tiny LLaVA, embedded data, CPU
python src/train.py experiment=dpo_tiny trainer.max_steps=10
python src/train.py -m objective.beta=0.05,0.1
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import hydra  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from src.data.records import DataError  # noqa: E402
from src.models.generation import GenerationSettings, fill_blind_answers  # noqa: E402
from src.models.module import PreferenceModule  # noqa: E402

log = logging.getLogger("train")
# the frozen reference is in eval mode on purpose
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` in a config group (callbacks, loggers)."""
    if not group:
        return []
    return [hydra.utils.instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def add_blind_answers(cfg: DictConfig, module: PreferenceModule, datamodule: Any) -> dict[str, Any]:
    """Generate (or read from cache) the reference model's image-less answers for every record."""
    device = (
        torch.device("cuda") if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else torch.device("cpu")
    )
    reference = module.reference.to(device)
    settings = GenerationSettings(**cfg.blind.generation)
    records, summary = fill_blind_answers(
        datamodule.load_records(), reference, module.processor, settings, cfg.blind.cache_dir
    )
    module.reference.to("cpu")
    datamodule.set_records(records)
    return summary


def train(cfg: DictConfig) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    container = OmegaConf.to_container(cfg, resolve=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(container))

    module = PreferenceModule(
        model=container["model"],
        objective=container["objective"],
        optim=container["optim"],
        reference_dtype=cfg.get("reference_dtype"),
    )
    datamodule = hydra.utils.instantiate(cfg.data, processor=module.processor, answers=list(module.answers))
    report: dict[str, Any] = {}
    if "blind" in module.answers:
        report["blind_answers"] = add_blind_answers(cfg, module, datamodule)
        log.info("blind answers: %s", report["blind_answers"])
    datamodule.setup("fit")
    report["data"] = datamodule.summary()
    log.info("data: %s", json.dumps(report["data"]))

    loggers = instantiate_all(cfg.get("logger"))
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=instantiate_all(cfg.get("callbacks")), logger=loggers or False
    )
    for lg in loggers:
        lg.log_hyperparams({"config": container, "data_summary": report["data"]})
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if datamodule.val_set is not None and "val/loss" not in trainer.callback_metrics:
        # stopped by max_steps before an epoch ended: still report held-out figures for sweeps
        trainer.validate(module, datamodule=datamodule, verbose=False)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    report["final_metrics"] = metrics
    if trainer.is_global_zero:
        model_dir = out_dir / "model"
        module.policy.save_pretrained(model_dir)
        module.processor.save_pretrained(model_dir)
        (out_dir / "run_summary.json").write_text(json.dumps(report, indent=2))
        skipped = sum(s["skipped"] for k, s in report["data"].items() if isinstance(s, dict) and "skipped" in s)
        log.info("saved policy and processor to %s", model_dir)
        log.info(
            "records skipped as too long: %d (%s); stand-in images: %d",
            skipped,
            {k: s["skipped_by_reason"] for k, s in report["data"].items() if isinstance(s, dict) and "skipped" in s},
            report["data"]["stand_in_images"],
        )
    return metrics


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except DataError as e:  # a data problem the user can fix: say what and where, no stack trace
        log.error("data error: %s", e)
        sys.exit(2)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
