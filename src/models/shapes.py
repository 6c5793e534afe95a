"""The real architectures, written out in configs (``model.shapes``): an HF config from them, with the depth cut.

A model preset's ``shapes`` block holds what a checkpoint's config.json says of its architecture, under the HF field
names: ``text`` (the language model's config), ``vision`` (the vision tower's) and the fields of the multimodal
config itself, plus ``text_layers`` and ``vision_layers``, the depth, which a setting cuts
(``model.shapes.text_layers=2 model.shapes.vision_layers=1``) so that a full-width model fits a CPU. `shapes_config`
turns the block into the config transformers builds the model from: the memory plan counts parameters from it on
the meta device (no weights), and a preset without ``name_or_path`` builds the model at those widths with random
weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from src.errors import SettingError

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def _plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def shapes_config(shapes: Mapping[str, Any]) -> Any:
    """The transformers config of the architecture ``shapes`` describes (`model.shapes` of a preset)."""
    shapes = dict(_plain(shapes))
    family = shapes.pop("family", None)
    if family not in FAMILIES:
        raise SettingError(f"model.shapes.family must be one of {FAMILIES}, got {family!r}")
    for key in ("text", "vision", "text_layers", "vision_layers"):
        if key not in shapes:
            raise SettingError(f"model.shapes.{key} is missing (family {family})")
    for key in ("text_layers", "vision_layers"):
        value = shapes[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SettingError(f"model.shapes.{key}={value!r} is out of range: it must be an integer >= 1")
    shapes.pop("processor", None)  # the image processor's settings: not the model's
    shapes.pop("seed", None)  # the seed of the random weights (src/models/random_init.py): not the architecture's
    text = dict(shapes.pop("text")) | {"num_hidden_layers": shapes.pop("text_layers")}
    vision = dict(shapes.pop("vision"))
    depth = shapes.pop("vision_layers")
    if family in QWEN_FAMILIES:
        from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

        cls = Qwen2VLConfig if family == "qwen2_vl" else Qwen2_5_VLConfig
        return cls(text_config=text, vision_config=vision | {"depth": depth}, **shapes)
    if family == "llava_onevision":
        from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

        return LlavaOnevisionConfig(
            text_config=Qwen2Config(**text),
            vision_config=SiglipVisionConfig(**vision | {"num_hidden_layers": depth}),
            **shapes,
        )
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    cls = LlavaConfig if family == "llava" else LlavaNextConfig
    return cls(
        text_config=LlamaConfig(**text),
        vision_config=CLIPVisionConfig(**vision | {"num_hidden_layers": depth}),
        **shapes,
    )


def image_tokens(shapes: Mapping[str, Any]) -> int:
    """The image tokens of one picture at the vision tower's size (LLaVA-1.5: (336 / 14)^2 = 576; LLaVA-NeXT: the
    base image's and, at most, four tiles' and their newlines; LLaVA-OneVision: `_onevision_tokens`; Qwen2-VL and
    Qwen2.5-VL: at most ``processor.max_pixels`` / (14 * 2)^2)."""
    shapes = _plain(shapes)
    family, vision = shapes["family"], shapes["vision"]
    if family in QWEN_FAMILIES:
        merge = vision.get("spatial_merge_size", 2) * vision.get("patch_size", 14)
        return int(shapes.get("processor", {}).get("max_pixels", 1280 * 28 * 28) // (merge * merge))
    side = vision["image_size"] // vision["patch_size"]
    if family == "llava":
        return side * side
    if family == "llava_onevision":
        return _onevision_tokens(shapes, side)
    # LLaVA-NeXT: the base image, then up to a 2 x 2 grid of tiles, one newline token per row of the grid
    return side * side + (2 * side) * (2 * side) + 2 * side


def _onevision_tokens(shapes: Mapping[str, Any], side: int) -> int:
    """LLaVA-OneVision's image tokens of one picture, at most: the base image's (side x side), then the tiles' of a
    grid pinpoint as a (rows x cols) feature map, cut to the picture's aspect ratio (one side shorter, any length)
    and, where its area passes 1.1^2 times N tiles' (``vision_aspect_ratio`` anyres_max_N), scaled down to about N
    tiles', one newline a row. An upper bound: at llava-onevision-qwen2-7b's shapes 8,829, where the largest a
    picture reaches (sizes searched in steps of 4 px) is 8,765, at 1156 x 948."""
    tile = shapes["vision"]["image_size"]
    cap = int(str(shapes.get("vision_aspect_ratio", "anyres_max_9")).removeprefix("anyres_max_"))

    def features(rows: int, cols: int) -> int:
        ratio = math.sqrt(rows * cols / (cap * side * side))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return rows * cols + rows

    best = 0
    for height, width in shapes["image_grid_pinpoints"]:
        rows, cols = side * (height // tile), side * (width // tile)
        best = max(
            [best, *(features(rows, c) for c in range(1, cols + 1)), *(features(r, cols) for r in range(1, rows + 1))]
        )
    return side * side + best
