"""The real architectures written out in the model presets (`model.shapes`) are the checkpoints' own: built on the
meta device (no weights), each has its checkpoint's exact parameter count; the depth is cut by a setting."""

from __future__ import annotations

import pytest
import torch

from src.errors import SettingError
from src.models.shapes import image_tokens, shapes_config
from tests.helpers import compose_config

# parameter counts of the checkpoints on the Hugging Face hub, and the image tokens of one picture at most
REAL = {
    "llava_1_5_7b": (7_063_427_072, 576),  # llava-hf/llava-1.5-7b-hf
    "llava_1_5_13b": (13_351_494_656, 576),  # llava-hf/llava-1.5-13b-hf
    "llava_next_7b": (7_063_431_168, 2928),  # llava-hf/llava-v1.6-vicuna-7b-hf: base 576 + 2 x 2 tiles + newlines
    "qwen2_vl_7b": (8_291_375_616, 16384),  # Qwen/Qwen2-VL-7B-Instruct at its max_pixels
    "qwen2_5_vl_7b": (8_292_166_656, 16384),  # Qwen/Qwen2.5-VL-7B-Instruct at its max_pixels
    # llava-hf/llava-onevision-qwen2-7b-ov-hf (8.03 B): the base 729 + a cut grid's tiles and newlines, an upper bound
    "llava_onevision_7b": (8_030_807_584, 8829),
}


def meta_model(shapes):
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(shapes_config(shapes))


@pytest.mark.parametrize("preset", sorted(REAL))
def test_each_preset_is_its_checkpoints_architecture(preset):
    shapes = compose_config("train", [f"model={preset}"]).model.shapes
    params, tokens = REAL[preset]
    assert sum(p.numel() for p in meta_model(shapes).parameters()) == params
    assert image_tokens(shapes) == tokens


def test_the_depth_is_cut_by_a_setting_and_the_widths_stay():
    full = compose_config("train", ["model=llava_1_5_7b"]).model.shapes
    cut = compose_config("train", ["model=llava_1_5_7b", "model.shapes.text_layers=2", "model.shapes.vision_layers=1"])
    model = meta_model(cut.model.shapes)
    config = model.config
    assert config.text_config.num_hidden_layers == 2 and config.vision_config.num_hidden_layers == 1
    assert config.text_config.hidden_size == 4096 and config.text_config.vocab_size == 32064
    # a decoder layer of llava-1.5-7b: 4 x 4096^2 attention + 3 x 4096 x 11008 MLP + 2 norms
    layer = 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096
    vision_layer = 4 * (1024**2 + 1024) + 2 * 1024 * 4096 + 4096 + 1024 + 4 * 1024
    full_count = REAL["llava_1_5_7b"][0]
    assert sum(p.numel() for p in model.parameters()) == full_count - 30 * layer - 23 * vision_layer
    assert full.text_layers == 32


@pytest.mark.parametrize(
    ("change", "message"),
    [({"family": "gpt"}, "model.shapes.family"), ({"text_layers": 0}, "model.shapes.text_layers=0")],
)
def test_bad_shapes_are_named(change, message):
    shapes = dict(compose_config("train", ["model=llava_1_5_7b"]).model.shapes) | change
    with pytest.raises(SettingError, match=message):
        shapes_config(shapes)


def test_onevision_image_tokens_bound_what_pictures_reach():
    """The bound holds over pictures of many sizes, as transformers' own processor counts their tokens."""
    from transformers import LlavaOnevisionProcessor

    shapes = compose_config("train", ["model=llava_onevision_7b"]).model.shapes
    bound = image_tokens(shapes)
    processor = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)  # the counting needs no tokenizer
    processor.image_processor = type("Grid", (), {"image_grid_pinpoints": list(shapes.image_grid_pinpoints)})()
    processor.num_image_tokens, processor.vision_aspect_ratio = 729, shapes.vision_aspect_ratio
    counts = [
        processor._get_number_of_features(h, w, 384, 384) for h in range(100, 2500, 52) for w in range(100, 2500, 52)
    ]
    assert max(counts) <= bound < max(counts) * 1.02
    assert processor._get_number_of_features(1156, 948, 384, 384) == 8765 < bound
