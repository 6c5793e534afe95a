"""Generate answers (blind or with the image) for a data set, into a resumable JSONL keyed by id.

    python src/generate.py data=mmsafe_po data.path=data.json data.missing_images=render \
        model.name_or_path=logs/train/runs/<run>/model mode=blind output=blind.jsonl
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

if not __package__:  # run as a script (python src/<entry>.py), not imported as src.<entry>: see _bootstrap.py
    import _bootstrap  # noqa: F401

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import src.plugins  # noqa: F401  (registers the plug-ins' picture drawers: world data's are drawn)
from src.data.datamodule import PreferenceDataModule, check_data_paths
from src.data.prompt_format import PromptFormat
from src.errors import SettingError, exit_on_setting_error, run_hydra
from src.files import write_atomic
from src.models.device import choose_device
from src.models.factory import build_model
from src.models.generation import AnswerGenerator, GenerationSettings, is_main_process, read_generations
from src.models.source import check_model_source
from src.settings import EVALUATE, check_ranges

log = logging.getLogger("generate")


def generate(cfg: DictConfig) -> dict[str, str]:
    torch.manual_seed(cfg.seed)
    # settings and paths first, in seconds: a typo must not wait for the model to load
    check_ranges(cfg, EVALUATE)
    if cfg.split not in ("all", "train", "val"):
        raise SettingError(f"split must be all, train or val; got {cfg.split!r}")
    if cfg.mode not in ("blind", "image"):
        raise SettingError(f"mode must be 'blind' (image removed) or 'image'; got {cfg.mode!r}")
    check_data_paths(cfg.data)
    prompt_format = PromptFormat.from_config(cfg.prompt_format)
    check_model_source(cfg.model.get("name_or_path"), "model.name_or_path", cfg.model.get("revision"))
    model, processor = build_model(**OmegaConf.to_container(cfg.model, resolve=True))
    model.to(choose_device(cfg.device)[0]).eval()
    datamodule = PreferenceDataModule.from_config(cfg.data, prompt_format=prompt_format, processor=processor)
    if cfg.split == "all":
        records = datamodule.load_records()
    else:
        records = dict(zip(("train", "val"), datamodule.split(), strict=True))[cfg.split]
    devices = OmegaConf.to_container(cfg.devices, resolve=True) if cfg.get("devices") else None
    generator = AnswerGenerator(
        model, processor, GenerationSettings(**cfg.generation), datamodule.resolver, devices, prompt_format
    )
    answers = generator.run(records, cfg.output, with_image=cfg.mode == "image", desc=f"{cfg.mode} answers")
    if is_main_process():  # one process writes
        write_in_record_order(Path(cfg.output), [r.id for r in records], answers)
    # blind prompts have no image: none is drawn, however many image files are missing
    drawn = f"{len(datamodule.resolver.rendered)}" if cfg.mode == "image" else "0 (mode=blind: prompts without images)"
    log.info(
        "%d answers in %s (%d generated now, %d reused); stand-in images: %s",
        len(answers),
        cfg.output,
        generator.generated,
        len(answers) - generator.generated,
        drawn,
    )
    return answers


def write_in_record_order(path: Path, ids: list[str], answers: dict[str, dict[str, Any]]) -> None:
    """Rewrite the output as users read it: one line per record in the data's order (generation appends batch by
    batch, longest prompt first), then the lines of any other record the file already held."""
    others = [line for rid, line in read_generations(path).items() if rid not in answers]
    lines = [answers[rid] for rid in ids] + others
    write_atomic(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))


@hydra.main(version_base="1.3", config_path="../configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    with exit_on_setting_error(log):  # a setting or path the user can fix: say what and where, no stack trace
        generate(cfg)


if __name__ == "__main__":
    run_hydra(main)
