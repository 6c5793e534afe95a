"""How a record becomes the prompt a model sees, beyond its own text: one value, read from one config node.

`PromptFormat` is what training, blind answers, reference log-probs, validation samples, generation, scoring and
evaluation must agree on, since a model answers the prompts it was trained on. Each entry point builds it once
from its ``prompt_format`` config node (`PromptFormat.from_config`) and passes it down as the value; a trained
model's folder keeps it in ``prompt_format.json`` (`PromptFormat.write` / `PromptFormat.read`) so that an
evaluation can check it builds prompts the same way.

The config node's defaults are this class's own: importing this module registers them as the config group
option ``prompt_format=default`` (Hydra's config store), so they are written once, here. Other options (the
Vicuna system line of LLaVA-1.5) are YAML files in ``configs/prompt_format/``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from src.data.images import mean_colour, pad_to_square
from src.errors import SettingError

# how a non-square image reaches the model: the processor's resize and centre crop, which cuts the long side's
# edges | first padded to a square with the processor's mean colour, as LLaVA-1.5 was trained
ASPECT_RATIOS = ("crop", "pad")
# written beside a trained model: the prompt format it was trained with
PROMPT_FORMAT_FILE = "prompt_format.json"


@dataclass(frozen=True)
class PromptFormat:
    """The prompt format of a model: what every prompt of its training and evaluation is built with.

    ``system_prompt``: the system message of records that bring none (None: no system message, the chat
    template's own default; LLaVA-1.5 was trained with Vicuna's system line). ``image_aspect_ratio``: how a
    non-square image reaches the model, one of `ASPECT_RATIOS`.

    What it does not hold, on purpose: the chat template is always the processor's own (the one saved with the
    model), there is no choice of it to record; the colour ``pad`` fills with is the image processor's
    normalisation mean (`pad_colour`), a property of the model's processor rather than a setting, so it is
    derived where an image is fitted and not stored.
    """

    system_prompt: str | None = None
    image_aspect_ratio: str = "crop"

    def __post_init__(self) -> None:
        if self.image_aspect_ratio not in ASPECT_RATIOS:
            choices = " or ".join(ASPECT_RATIOS)
            raise SettingError(f"prompt_format.image_aspect_ratio must be {choices}, got {self.image_aspect_ratio!r}")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise SettingError(f"prompt_format.system_prompt must be text or null, got {self.system_prompt!r}")

    # -- images ----------------------------------------------------------------------------------
    @staticmethod
    def pad_colour(image_processor: Any) -> tuple[int, int, int]:
        """The colour ``pad`` fills a square with: the processor's normalisation mean, which normalises to ~0."""
        return mean_colour(image_processor)

    def fit_image(self, image: Image.Image, image_processor: Any) -> Image.Image:
        """``image`` as it goes to the image processor: unchanged for ``crop`` (the processor crops), padded to a
        square of `pad_colour` for ``pad``."""
        if self.image_aspect_ratio == "pad":
            return pad_to_square(image, self.pad_colour(image_processor))
        return image

    # -- stored ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{system_prompt, image_aspect_ratio}``: the keys of ``prompt_format.json`` and of the config node."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "prompt_format") -> PromptFormat:
        """From a mapping of these keys (a config node, a ``prompt_format.json``); a key left out takes its
        default, a key this class does not hold is a `SettingError` naming ``where``."""
        values = dict(values)
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise SettingError(f"{where}.{unknown[0]} is not a prompt format setting {[f.name for f in fields(cls)]}")
        return cls(**values)

    @classmethod
    def from_config(cls, node: DictConfig | Mapping[str, Any] | None) -> PromptFormat:
        """From an entry point's ``prompt_format`` config node (None: the defaults)."""
        if node is None:
            return cls()
        if isinstance(node, DictConfig):
            node = OmegaConf.to_container(node, resolve=True)
        return cls.from_dict(node)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = PROMPT_FORMAT_FILE) -> PromptFormat:
        values = json.loads(text)
        if not isinstance(values, dict):
            raise SettingError(f"{where}: a prompt format is a JSON object, got {type(values).__name__}")
        return cls.from_dict(values, where)

    def write(self, model_dir: str | Path) -> Path:
        """``<model_dir>/prompt_format.json``, written beside a trained model."""
        path = Path(model_dir) / PROMPT_FORMAT_FILE
        path.write_text(self.to_json())
        return path

    @classmethod
    def read(cls, model_dir: str | Path) -> PromptFormat | None:
        """The prompt format a model folder of this project was trained with; None when it holds none (a hub id,
        a model from elsewhere)."""
        path = Path(str(model_dir)) / PROMPT_FORMAT_FILE
        if not path.is_file():
            return None
        return cls.from_json(path.read_text(), str(path))


# the config group option prompt_format=default: these defaults, written once (above); a plain mapping, so that
# other options and overrides merge into it
ConfigStore.instance().store(group="prompt_format", name="default", node=PromptFormat().to_dict())
