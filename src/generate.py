"""Generate answers (blind or with the image) for a data set, into a resumable JSONL keyed by id.

    python src/generate.py data=mmsafe_po data.path=data.json data.missing_images=render \
        model.name_or_path=logs/train/runs/<run>/model mode=blind output=blind.jsonl
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from src.data.records import DataError  # noqa: E402
from src.models.factory import build_model  # noqa: E402
from src.models.generation import AnswerGenerator, GenerationSettings  # noqa: E402

log = logging.getLogger("generate")


def generate(cfg: DictConfig) -> dict[str, str]:
    torch.manual_seed(cfg.seed)
    model, processor = build_model(**OmegaConf.to_container(cfg.model, resolve=True))
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    datamodule = hydra.utils.instantiate(cfg.data, processor=processor, system_prompt=cfg.model.get("system_prompt"))
    if cfg.split == "all":
        records = datamodule.load_records()
    elif cfg.split in ("train", "val"):
        records = dict(zip(("train", "val"), datamodule.split(), strict=True))[cfg.split]
    else:
        raise ValueError(f"split must be all, train or val; got {cfg.split!r}")
    if cfg.mode not in ("blind", "image"):
        raise ValueError(f"mode must be 'blind' (image removed) or 'image'; got {cfg.mode!r}")
    devices = OmegaConf.to_container(cfg.devices, resolve=True) if cfg.get("devices") else None
    hp = datamodule.hparams
    generator = AnswerGenerator(
        model,
        processor,
        GenerationSettings(**cfg.generation),
        datamodule.resolver,
        devices,
        system_prompt=hp.system_prompt,
        image_aspect_ratio=hp.image_aspect_ratio,
    )
    answers = generator.run(records, cfg.output, with_image=cfg.mode == "image", desc=f"{cfg.mode} answers")
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


@hydra.main(version_base="1.3", config_path="../configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    try:
        generate(cfg)
    except DataError as e:  # a data problem the user can fix: say what and where, no stack trace
        log.error("data error: %s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
