"""The random full-width presets (configs/model/*_random.yaml): the real architecture at the checkpoint's widths,
depth cut, random weights, the project's tokenizer, the real image processor settings, built offline.

One real build at llava-1.5-7b's widths (1 text layer, 1 vision layer: 500 M parameters, 2 GB in float32, ~6 s)
serves the module; LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL at real widths are checked on the meta
device (config and processor), their real builds are slow tests."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from src.data.datamodule import check_max_length
from src.data.encoding import PromptEncoder
from src.data.prompt_format import PromptFormat
from src.data.readers import read_jsonl
from src.errors import SettingError
from src.models.factory import build_model, fingerprint, load_processor
from src.models.random_init import random_config
from tests.helpers import compose_config

EMBEDDED = Path(__file__).resolve().parents[1] / "src" / "data" / "embedded" / "safety_pairs.jsonl"
ONE_LAYER = ["model.shapes.text_layers=1", "model.shapes.vision_layers=1"]


def model_cfg(preset: str, *overrides: str) -> dict:
    return OmegaConf.to_container(compose_config("train", [f"model={preset}", *overrides]).model, resolve=True)


def image_id(config) -> int:
    return config.image_token_id if hasattr(config, "image_token_id") else config.image_token_index


def count(ids, token_id) -> int:
    return sum(int(i) == token_id for i in ids)


def prompt(processor, image) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(images=image, text=text, return_tensors="pt")


@pytest.fixture(scope="module")
def llava():
    return build_model(**model_cfg("llava_1_5_7b_random", *ONE_LAYER))


def test_llava_widths_are_the_checkpoints(llava):
    model, processor = llava
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_attention_heads) == (4096, 11008, 32)
    assert (text.vocab_size, text.num_hidden_layers, vision.num_hidden_layers) == (32064, 1, 1)
    assert (vision.hidden_size, vision.image_size, vision.patch_size) == (1024, 336, 14)
    assert model.config.vision_feature_layer == -2 and model.config.projector_hidden_act == "gelu"
    assert model.get_input_embeddings().weight.shape == (32064, 4096)
    assert model.get_output_embeddings().weight.shape == (32064, 4096)
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    # the project's tokenizer: every id an embedding row, its image token the model's
    tok = processor.tokenizer
    assert len(tok) < 32064 and max(tok.get_vocab().values()) < 32064
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_index
    assert model.generation_config.eos_token_id == tok.eos_token_id == model.config.text_config.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    ip = processor.image_processor
    assert ip.crop_size["height"] == ip.crop_size["width"] == 336 and ip.size["shortest_edge"] == 336
    assert list(ip.image_mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])


@pytest.mark.parametrize("aspect", ["crop", "pad"])
def test_llava_576_image_tokens_a_picture(llava, aspect):
    model, processor = llava
    encoder = PromptEncoder(processor, max_length=768, prompt_format=PromptFormat(image_aspect_ratio=aspect))
    record = read_jsonl(EMBEDDED)[0]
    for size in [(336, 336), (1000, 300)]:  # a stand-in at the tower's size, and a wide one
        image = Image.new("RGB", size, (200, 30, 30))
        assert encoder.image_inputs(image)["pixel_values"].shape == (1, 3, 336, 336)
        ids = encoder.prompt_ids(record, image)
        assert count(ids, model.config.image_token_index) == 576
        assert max(ids) < 32064
        pair = encoder.encode(record, image)
        assert not isinstance(pair, str) and len(pair.prompt_ids) + max(map(len, pair.answer_ids)) <= 768


def test_llava_forward_gives_logits_over_the_real_vocabulary(llava):
    model, processor = llava
    inputs = prompt(processor, Image.new("RGB", (336, 336), (10, 120, 200)))
    assert count(inputs["input_ids"][0], model.config.image_token_index) == 576
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], 32064)
    assert torch.isfinite(logits).all()


def test_generation_stays_within_the_tokenizer(llava):
    model, processor = llava
    inputs = prompt(processor, Image.new("RGB", (336, 336), (10, 120, 200)))
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert new and max(new) < len(processor.tokenizer)  # the unused rows beyond it are never picked


def test_max_length_768_leaves_room_and_256_does_not(llava):
    _, processor = llava
    data = compose_config("train", ["model=llava_1_5_7b_random", "data.max_length=768"]).data
    check_max_length(data, processor)
    data.max_length = 256
    with pytest.raises(SettingError, match="data.max_length=256"):
        check_max_length(data, processor)


def test_load_processor_is_the_models_without_weights(llava):
    _, processor = llava
    alone = load_processor(**model_cfg("llava_1_5_7b_random"))
    image = Image.new("RGB", (336, 336))
    assert alone.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert torch.equal(prompt(alone, image)["input_ids"], prompt(processor, image)["input_ids"])


def small(preset: str, *overrides: str) -> dict:
    """A preset at small widths: the builder's seed, dtype and attention settings, cheaply."""
    small_widths = [
        "model.shapes.text.hidden_size=64",
        "model.shapes.text.intermediate_size=128",
        "model.shapes.text.num_attention_heads=4",
        "model.shapes.text.num_key_value_heads=4",
        "model.shapes.vision.hidden_size=32",
        "model.shapes.vision.intermediate_size=64",
        "model.shapes.vision.num_attention_heads=2",
        "model.shapes.vision.projection_dim=32",
        "model.shapes.text.vocab_size=4096",
    ]
    return model_cfg(preset, *ONE_LAYER, *small_widths, *overrides)


def test_weights_follow_the_seed_and_dtype_and_attention_are_honoured():
    first = fingerprint(build_model(**small("llava_1_5_7b_random"))[0])
    assert fingerprint(build_model(**small("llava_1_5_7b_random"))[0]) == first
    assert fingerprint(build_model(**small("llava_1_5_7b_random", "model.shapes.seed=1"))[0]) != first
    model, _ = build_model(**small("llava_1_5_7b_random", "model.dtype=bfloat16", "model.attn_implementation=eager"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"


META = {  # preset: (hidden, vocabulary, image tokens of a 640 x 480 picture)
    "llava_next_7b_random": (4096, 32064, 2340),  # base 576 + the best grid's tiles, unpadded, and row newlines
    "qwen2_vl_7b_random": (3584, 152064, 391),  # (644 / 28) x (476 / 28) within min / max pixels
    "qwen2_5_vl_7b_random": (3584, 152064, 391),
    "llava_onevision_7b_random": (3584, 152128, 2929),  # base 729 + the best grid's tiles, unpadded, and row newlines
}


@pytest.mark.parametrize("preset", sorted(META))
def test_real_widths_on_the_meta_device(preset):
    from transformers import AutoModelForImageTextToText

    hidden, vocab, tokens = META[preset]
    cfg = model_cfg(preset)
    processor = load_processor(**cfg)
    config = random_config(cfg["shapes"], processor.tokenizer)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert model.config.text_config.hidden_size == hidden
    assert model.get_input_embeddings().weight.shape == (vocab, hidden)
    assert model.get_output_embeddings().weight.shape == (vocab, hidden)
    tok = processor.tokenizer
    assert max(tok.get_vocab().values()) < vocab
    assert tok.convert_tokens_to_ids(processor.image_token) == image_id(config)
    if preset.startswith("qwen"):
        size = processor.image_processor.size  # min / max pixels
        assert (size["shortest_edge"], size["longest_edge"]) == (3136, 12845056)
        assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    else:
        assert processor.image_processor.image_grid_pinpoints == cfg["shapes"]["image_grid_pinpoints"]
    inputs = prompt(processor, Image.new("RGB", (640, 480), (90, 90, 90)))
    assert count(inputs["input_ids"][0], image_id(config)) == tokens


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(META))
def test_real_build_at_one_layer(preset):
    """LLaVA-NeXT (500 M parameters), LLaVA-OneVision and Qwen2-VL / Qwen2.5-VL (1.1 to 1.4 B, of which 1.09 B the
    embedding and LM head) at one layer each, in bfloat16 (1 to 2.8 GB): built, and a forward pass over one prompt
    with a picture."""
    hidden, vocab, _ = META[preset]
    model, processor = build_model(**model_cfg(preset, *ONE_LAYER, "model.dtype=bfloat16"))
    inputs = prompt(processor, Image.new("RGB", (336, 336), (10, 120, 200)))
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], vocab)
    assert torch.isfinite(logits.float()).all()
    assert rss_gb() < 8
