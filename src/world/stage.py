"""The world's part of a reproduction (src/reproduce.py with ``world`` set): the files its runs train on, written
once into ``<out>/world``; the settings every evaluation gets, so that it draws the same held-out items; and the
check that an evaluation asked exactly those items."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from src.data.readers import read_records
from src.errors import SettingError
from src.world.world import World, WorldSettings

log = logging.getLogger("reproduce")

# the world's training files a base can learn from (base.world_data)
FILES = ("train", "helpful")


class WorldStage:
    """The world of ``settings`` (the ``world`` config node, resolved) for a comparison written in ``out``; a setting
    or folder to change raises ``error`` (a `SettingError`)."""

    def __init__(self, settings: dict[str, Any], out: Path, error: type[SettingError] = SettingError) -> None:
        self.config, self.folder, self.error = settings, out / "world", error
        self.summary: dict[str, Any] = {}
        self.heldout_ids: set[str] = set()

    def settings(self) -> WorldSettings:
        """The world's settings; settings that cannot make a world fail here, before any training."""
        try:
            return WorldSettings.from_config(self.config)
        except ValueError as e:
            raise self.error(str(e)) from None

    def data_overrides(self, file: str = "train") -> list[str]:
        """``world/<file>.jsonl`` as a run's data, its pictures drawn at world.image_size (null: the model's input
        size, as in the evaluation). ``train``: the training pairs; ``helpful``: the same requests, each answered
        with help (a base that complies whatever the picture)."""
        if file not in FILES:
            raise self.error(f"base.world_data={file!r} must be one of {list(FILES)}")
        size = self.config.get("image_size")
        size = "null" if size is None else str(size)
        return ["data=jsonl", f"data.path={self.folder / f'{file}.jsonl'}", f"data.stand_in_size={size}"]

    def write(self) -> dict[str, Any]:
        """The world's train.jsonl / heldout.jsonl / world.json; returns its settings, which every evaluation gets as
        ``world.*``. A folder holding a world of other settings is refused: its runs trained on that world."""
        settings = self.settings()
        world = World(settings)
        if (self.folder / "world.json").is_file():
            before = json.loads((self.folder / "world.json").read_text())["settings"]
            if before != world.summary()["settings"]:
                raise self.error(
                    f"{self.folder} holds a world of other settings ({before}); start the comparison in a new folder"
                )
        world.write(self.folder)
        self.summary = world.summary()
        self.heldout_ids = {r.id for r in read_records(self.folder / "heldout.jsonl", "jsonl")}
        log.info(
            "world %s: %d training pairs, %d held-out items in %s",
            settings.key(),
            settings.train_size,
            settings.heldout_size,
            self.folder,
        )
        return self.summary["settings"]

    def check_items(self, eval_dir: Path) -> None:
        """The evaluation asked about exactly the written held-out items (its item ids are ``<record id>[/...]``)."""
        lines = (eval_dir / "generations.jsonl").read_text().splitlines()
        asked = {json.loads(line)["id"].split("/", 1)[0] for line in lines if line.strip()}
        if asked != self.heldout_ids:
            raise self.error(
                f"{eval_dir}: the evaluation's items are not the world's held-out items in {self.folder} "
                f"({len(asked - self.heldout_ids)} not written, {len(self.heldout_ids - asked)} not asked)"
            )
