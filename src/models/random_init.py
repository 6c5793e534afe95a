"""A real architecture at full width with random weights, built offline: a preset's ``model.shapes`` with no
``name_or_path`` (configs/model/*_random.yaml).

The model is the checkpoint's class at the checkpoint's widths (`shapes_config`: hidden, MLP, heads, vocabulary,
vision tower, projector), its depth cut by ``model.shapes.text_layers`` / ``vision_layers``, its weights drawn by
transformers' own initialisation under ``model.shapes.seed`` (the same seed and shapes give the same weights), built
once directly in ``model.dtype`` (no second copy). The processor has the real image settings (``shapes.processor``:
LLaVA-1.5 CLIP's 336 px, mean and std, so 576 image tokens a picture; LLaVA-NeXT the same plus the grid pinpoints;
LLaVA-OneVision SigLIP's 384 px and its pinpoints; Qwen2-VL and Qwen2.5-VL their min / max pixels) through the PIL
image processors (no torchvision), and the chat templates of the tiny models (`src.models.tiny`: llava-1.5's
``USER: <image>\\n... ASSISTANT:``; ChatML for LLaVA-OneVision; ChatML with vision markers for Qwen2-VL, and with
Qwen2.5-VL's default system message for it).

What differs from the real checkpoint, besides the weights and the depth:

* the tokenizer is the project's offline byte-level BPE (`build_tokenizer`, trained on the embedded data set with
  the real vocabulary size as its target; the corpus gives about 2,200 tokens), with the family's special tokens.
  The embedding and the LM head have the real rows (32064 for LLaVA, 152064 for Qwen2-VL and Qwen2.5-VL, 152128
  for LLaVA-OneVision), of which the tokenizer uses the first ``len(tokenizer)``; the rest are never an input and
  only take part in the softmax. Texts therefore take more tokens than under the real tokenizer (the image tokens
  are exactly the real ones).
* the special token ids are the tokenizer's, not the checkpoint's: the config's ``image_token_index`` (LLaVA: 32000
  in the checkpoint; LLaVA-OneVision: 151646, and ``video_token_index`` 151647) / ``image_token_id``,
  ``video_token_id``, ``vision_start_token_id``, ``vision_end_token_id`` (Qwen-VL: 151652-151656) and the text
  config's and generation config's BOS / EOS / pad ids point at the tokenizer's tokens. Every model sees ``<s>`` as
  BOS and ``</s>`` as EOS (the Qwen-based checkpoints' tokenizers have no BOS and end a turn with ``<|im_end|>``;
  the Qwen2-VL chat template here also has no default system message).
* generation never picks the rows beyond the tokenizer (``generation_config.suppress_tokens``), which would
  decode as nothing; scoring takes the softmax over every row, as the checkpoint does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from src.models.shapes import QWEN_FAMILIES, _plain, shapes_config
from src.models.tiny import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    ONEVISION_CHAT_TEMPLATE,
    ONEVISION_SPECIAL,
    QWEN2_5_CHAT_TEMPLATE,
    QWEN_CHAT_TEMPLATE,
    QWEN_SPECIAL,
    build_tokenizer,
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tokenizer_for(shapes: Mapping[str, Any]) -> Any:
    """The project's tokenizer with the family's special tokens, grown as far as the corpus allows towards the real
    vocabulary size (every id below it)."""
    shapes = _plain(shapes)
    vocab = shapes["text"]["vocab_size"]
    special = {"llava_onevision": ONEVISION_SPECIAL} | dict.fromkeys(QWEN_FAMILIES, QWEN_SPECIAL)
    tokenizer = build_tokenizer(vocab, special.get(shapes["family"], ()))
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than model.shapes.text.vocab_size={vocab}")
    return tokenizer


def random_config(shapes: Mapping[str, Any], tokenizer: Any) -> Any:
    """`shapes_config` with the token ids set to ``tokenizer``'s (the vocabulary stays the real size)."""
    config = shapes_config(shapes)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id
    for key, value in ids.items():
        setattr(config.text_config, key, value)
    if _plain(shapes)["family"] in QWEN_FAMILIES:
        token = dict(zip(QWEN_SPECIAL, tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL)), strict=True))
        config.image_token_id = token["<|image_pad|>"]
        config.video_token_id = token["<|video_pad|>"]
        config.vision_start_token_id = token["<|vision_start|>"]
        config.vision_end_token_id = token["<|vision_end|>"]
    else:
        config.image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if _plain(shapes)["family"] == "llava_onevision":
        config.video_token_index = tokenizer.convert_tokens_to_ids("<video>")
    return config


def build_random_processor(shapes: Mapping[str, Any], tokenizer: Any = None) -> Any:
    """The processor of a ``shapes`` model: the real image settings, the project's tokenizer and chat template."""
    shapes = _plain(shapes)
    family, vision = shapes["family"], shapes["vision"]
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer_for(shapes)
    settings = dict(shapes.get("processor") or {})
    if family in QWEN_FAMILIES:
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, Qwen2VLProcessor

        from src.models.tiny import _image_only_qwen2_vl_processor

        processor, template = (
            (Qwen2VLProcessor, QWEN_CHAT_TEMPLATE)
            if family == "qwen2_vl"
            else (Qwen2_5_VLProcessor, QWEN2_5_CHAT_TEMPLATE)
        )

        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=settings.get("min_pixels", 56 * 56),
            max_pixels=settings.get("max_pixels", 28 * 28 * 1280),
            patch_size=vision.get("patch_size", 14),
            merge_size=vision.get("spatial_merge_size", 2),
            temporal_patch_size=vision.get("temporal_patch_size", 2),
        )
        return _image_only_qwen2_vl_processor(processor)(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=template
        )
    size = settings.get("size", vision["image_size"])
    common = {
        "size": {"shortest_edge": size},
        "crop_size": {"height": size, "width": size},
        "image_mean": settings.get("image_mean", CLIP_MEAN),
        "image_std": settings.get("image_std", CLIP_STD),
    }
    strategy = shapes.get("vision_feature_select_strategy", "default")
    text = {"patch_size": vision["patch_size"], "vision_feature_select_strategy": strategy}
    text |= {"chat_template": CHAT_TEMPLATE, "image_token": IMAGE_TOKEN, "num_additional_image_tokens": 1}
    if family == "llava_onevision":
        from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

        from src.models.tiny import _image_only_onevision_processor

        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": size, "width": size},
            image_grid_pinpoints=shapes["image_grid_pinpoints"],
            image_mean=common["image_mean"],
            image_std=common["image_std"],
        )
        return _image_only_onevision_processor(LlavaOnevisionProcessor)(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=ONEVISION_CHAT_TEMPLATE,
            num_image_tokens=(vision["image_size"] // vision["patch_size"]) ** 2,
            vision_feature_select_strategy=shapes.get("vision_feature_select_strategy", "full"),
            vision_aspect_ratio=shapes.get("vision_aspect_ratio", "anyres_max_9"),
        )
    if family == "llava":
        from transformers import CLIPImageProcessorPil, LlavaProcessor

        return LlavaProcessor(image_processor=CLIPImageProcessorPil(**common), tokenizer=tokenizer, **text)
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    grid = shapes["image_grid_pinpoints"]
    image_processor = LlavaNextImageProcessorPil(**common, image_grid_pinpoints=grid)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, **text)


def build_random(
    shapes: Mapping[str, Any], dtype: torch.dtype = torch.float32, attn_implementation: str | None = "sdpa"
) -> tuple[torch.nn.Module, Any]:
    """(model, processor) of ``shapes`` with random weights (seeded by ``shapes.seed``, default 0), in ``dtype``."""
    from transformers import AutoModelForImageTextToText

    tokenizer = build_tokenizer_for(shapes)
    config = random_config(shapes, tokenizer)
    seed = _plain(shapes).get("seed", 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # built in ``dtype`` directly: a 7B-wide model at two layers is ~700 M parameters, one copy only
        model = AutoModelForImageTextToText.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation or "sdpa"
        )
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    # the rows beyond the tokenizer: never generated (they would decode as nothing, and every answer be empty)
    model.generation_config.suppress_tokens = list(range(len(tokenizer), config.text_config.vocab_size))
    return model, build_random_processor(shapes, tokenizer)
