"""What a training configuration needs per device, before any weight loads: the same overrides as train.py.

python src/plan.py experiment=bpo_llava plan.device_memory_gb=80
python src/plan.py experiment=bpo_llava model.lora.enabled=true plan.device_memory_gb=24
python src/plan.py experiment=bpo_llava trainer=deepspeed_zero3 trainer.devices=8 plan.device_memory_gb=80
"""

from __future__ import annotations

import logging
from pathlib import Path

if not __package__:  # run as a script (python src/<entry>.py), not imported as src.<entry>: see _bootstrap.py
    import _bootstrap  # noqa: F401

import hydra
from omegaconf import DictConfig

from src.errors import exit_on_setting_error, run_hydra
from src.models.memory import Plan, device_memory, plan_memory, table, write_plan
from src.settings import TRAIN, check_ranges

log = logging.getLogger("plan")


def make_plan(cfg: DictConfig) -> Plan:
    """The plan of ``cfg`` for ``plan.device_memory_gb`` (else the CUDA device's), written to plan.json."""
    check_ranges(cfg, TRAIN)
    memory = cfg.plan.get("device_memory_gb") or device_memory()
    plan = plan_memory(cfg, memory)
    out = Path(cfg.paths.output_dir) / "plan.json"
    write_plan(plan, out)
    return plan


@hydra.main(version_base="1.3", config_path="../configs", config_name="plan")
def main(cfg: DictConfig) -> None:
    with exit_on_setting_error(log):
        plan = make_plan(cfg)
    d = plan.details
    log.info(
        "memory plan per device: %s parameters (%s trainable), %s x %d, %d tokens a forward\n%s",
        f"{d['parameters']:,}",
        f"{d['trainable']:,}",
        d["strategy"],
        d["processes"],
        d["tokens_per_forward"],
        table(plan),
    )
    log.info("plan: %s", Path(cfg.paths.output_dir) / "plan.json")


if __name__ == "__main__":
    run_hydra(main)
