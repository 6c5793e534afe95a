"""Tiny models of the real classes, built from config with no download.

`LlavaForConditionalGeneration` (small CLIP vision tower + small Llama) with a byte-level BPE tokenizer
trained offline on a fixed corpus, and a processor whose chat template renders conversations the way
llava-1.5 does (``USER: <image>\\n... ASSISTANT: ...``). The same code paths (processor, chat template,
image-token expansion, generation, save/reload) run for it as for `llava-hf/llava-1.5-7b-hf`. The other
families (`TINY_FAMILIES`) are built the same way, each with its real model and processor classes and its
family's chat template: LLaVA-NeXT (any-resolution tiles), LLaVA-OneVision (tiles over SigLIP, Qwen2, ChatML),
Idefics3 (tiles and the whole picture, image tokens among row / column marker text), Qwen2-VL and Qwen2.5-VL
(patch-merging ViTs, multimodal rotary positions, ChatML with vision markers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# llava-1.5's conversation format: roles in capitals, the image marker first in its turn, answers
# closed by EOS. An assistant turn that is being scored is rendered by the same template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}"
    "{% endfor %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Generic text that, together with the embedded data set, gives the BPE merges their statistics.
_BASE_CORPUS = (
    "USER: ASSISTANT: the of and to a in is you that it for on with as are this be at or your "
    "I can't help with that. I'm sorry, but I cannot assist. Sure, here is how. Of course. "
    "Please contact a professional, a doctor, the police or a licensed expert instead. "
    "image picture photo shown here featured person company place object building document "
    "What How Why Where When Who Can Could Would Should Please tell me about explain describe "
    "0 1 2 3 4 5 6 7 8 9 . , ! ? ; : ' \" ( ) - "
)


def _corpus() -> list[str]:
    texts = [_BASE_CORPUS]
    embedded = Path(__file__).resolve().parents[1] / "data" / "embedded" / "safety_pairs.jsonl"
    if embedded.exists():
        for line in embedded.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            texts.extend(m["content"] for m in rec["messages"])
            texts.extend([rec["chosen"], rec["rejected"]])
    return texts


def build_tokenizer(vocab_size: int = 2048, extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the fixed corpus (deterministic, a second or less)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS + list(extra_special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # like Llama's tokenizer: BOS opens every sequence encoded with special tokens
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
        model_max_length=4096,
    )


def build_tiny_llava(
    seed: int = 0,
    vocab_size: int = 2048,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    attn_implementation: str = "sdpa",
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build (model, processor); the weights depend only on ``seed`` and the sizes."""
    tokenizer = build_tokenizer(vocab_size)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    num_image_tokens = (image_size // patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_hidden_size * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden_size,
    )
    text = _tiny_llama_config(
        tokenizer, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, max_position_embeddings
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=num_image_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    model = _seeded(seed, LlavaForConditionalGeneration, config)
    _generation_ids(model, tokenizer)

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
    )
    return model, processor


# Qwen2-VL's conversation format (ChatML with vision markers), for the tiny Qwen2-VL-class model
QWEN_SPECIAL = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_llama_config(tokenizer, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, max_pos):
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_pos,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _seeded(seed: int, cls, config):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config)


def build_tiny_llava_next(
    seed: int = 0,
    vocab_size: int = 2048,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """A tiny LLaVA-NeXT (llava-v1.6 class): any-resolution tiles over a CLIP tower, Llama text model."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tokenizer = build_tokenizer(vocab_size)
    grid = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    text = _tiny_llama_config(tokenizer, hidden_size, num_layers, num_heads, 2, hidden_size * 2, 2048)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_grid_pinpoints=grid,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    model = _seeded(seed, LlavaNextForConditionalGeneration, config)
    _generation_ids(model, tokenizer)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=grid,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return model, processor


def build_tiny_qwen2_vl(
    seed: int = 0,
    vocab_size: int = 2048,
    image_size: int = 56,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """A tiny Qwen2-VL-class model: ViT with 2x2 patch merging, multimodal rotary positions, ChatML."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        Qwen2VLProcessor,
    )

    tokenizer = build_tokenizer(vocab_size, QWEN_SPECIAL)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    text = _tiny_qwen_text(tokenizer, hidden_size, num_layers, num_heads)
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": hidden_size,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    model = _seeded(seed, Qwen2VLForConditionalGeneration, config)
    _generation_ids(model, tokenizer)
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor = _image_only_qwen2_vl_processor(Qwen2VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE
    )
    return model, processor


# Qwen2.5-VL-Instruct's conversation format: ChatML with vision markers, opened by its default system message when
# the conversation has none (what its chat template renders for system, user and assistant turns of text and
# images)
QWEN2_5_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen2_5_vl(
    seed: int = 0,
    vocab_size: int = 2048,
    image_size: int = 56,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """A tiny Qwen2.5-VL-class model: ViT with window attention (full attention in its last layer), SwiGLU MLPs
    and RMSNorm, 2x2 patch merging into the language model's width, multimodal rotary positions, ChatML with
    Qwen2.5-VL's default system message."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessorPil,
    )

    tokenizer = build_tokenizer(vocab_size, QWEN_SPECIAL)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,  # 2 x 2 merged patches a window: a 56 x 112 picture has two
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    }
    config = Qwen2_5_VLConfig(
        text_config=_tiny_qwen_text(tokenizer, hidden_size, num_layers, num_heads),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    model = _seeded(seed, Qwen2_5_VLForConditionalGeneration, config)
    _generation_ids(model, tokenizer)
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor = _image_only_qwen2_vl_processor(Qwen2_5_VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_5_CHAT_TEMPLATE
    )
    return model, processor


# LLaVA-OneVision's conversation format as llava-hf's chat template renders it: ChatML, a turn's images first (each
# ``<image>`` on a line of its own), then its text; no default system message
ONEVISION_SPECIAL = ("<|im_start|>", "<|im_end|>", "<video>")
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_llava_onevision(
    seed: int = 0,
    vocab_size: int = 2048,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """A tiny LLaVA-OneVision: any-resolution tiles (up to 3 x 3, cut to at most 4 tiles' features as
    ``anyres_max_9`` cuts the real one's 6 x 6 to 9) over a SigLIP tower, Qwen2 text model, ChatML."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tokenizer = build_tokenizer(vocab_size, ONEVISION_SPECIAL)
    grid = [[image_size * i, image_size * j] for i in (1, 2, 3) for j in (1, 2, 3)]
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=grid,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_4",
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    model = _seeded(seed, LlavaOnevisionForConditionalGeneration, config)
    _generation_ids(model, tokenizer)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=grid,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = _image_only_onevision_processor(LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=ONEVISION_CHAT_TEMPLATE,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_4",
    )
    return model, processor


def _image_only_onevision_processor(base: type) -> type:
    """LLaVA-OneVision's processor without its video processor, which needs torchvision (not installed here); the
    real checkpoint loads its full processor through AutoProcessor where torchvision exists."""
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyLlavaOnevisionProcessor(base):
        def __init__(
            self,
            image_processor=None,
            tokenizer=None,
            chat_template=None,
            num_image_tokens=None,
            vision_feature_select_strategy=None,
            vision_aspect_ratio="anyres_max_9",
            **kwargs,
        ):
            self.num_image_tokens = num_image_tokens
            self.vision_feature_select_strategy = vision_feature_select_strategy
            self.vision_aspect_ratio = vision_aspect_ratio
            self.image_token, self.video_token = IMAGE_TOKEN, "<video>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyLlavaOnevisionProcessor


# Idefics3's conversation format (HuggingFaceM4/Idefics3-8B-Llama3's chat template, BOS as the tokenizer's):
# ``User:<image>...<end_of_utterance>\nAssistant: ...``; an image marker is expanded by the processor into the
# picture's tiles (``<fake_token_around_image><row_1_col_1><image>...``, a newline a row) and the whole picture
# (``<fake_token_around_image><global-img><image>...<fake_token_around_image>``)
IDEFICS3_SPECIAL = ("<fake_token_around_image>", "<end_of_utterance>", "<global-img>") + tuple(
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
)
IDEFICS3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'].capitalize() }}"
    "{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<image>{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_tiny_idefics3(
    seed: int = 0,
    vocab_size: int = 2048,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """A tiny Idefics3 (the SmolVLM class): a picture cut into tiles of ``image_size`` (up to 2 x 2) plus the whole
    picture, each through a SigLIP-like tower and a pixel-shuffle connector (scale factor 2: 4 tokens a tile), the
    tiles' image tokens among row / column marker text; Llama text model."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    tokenizer = build_tokenizer(vocab_size, IDEFICS3_SPECIAL)
    vision = Idefics3VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = _tiny_llama_config(tokenizer, hidden_size, num_layers, num_heads, 2, hidden_size * 2, 2048)
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    model = _seeded(seed, Idefics3ForConditionalGeneration, config)
    _generation_ids(model, tokenizer)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * image_size}, max_image_size={"longest_edge": image_size}
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(image_size // patch_size) ** 2 // 4,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    return model, processor


def _tiny_qwen_text(tokenizer, hidden_size: int, num_layers: int, num_heads: int) -> dict[str, Any]:
    """The text config of the tiny Qwen-VL models: Qwen2 with multimodal rotary positions (time, height, width)."""
    head_dim = hidden_size // num_heads
    quarter = head_dim // 8
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [
                head_dim // 2 - 2 * (quarter + quarter // 2),
                quarter + quarter // 2,
                quarter + quarter // 2,
            ],
        },
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _image_only_qwen2_vl_processor(base: type) -> type:
    """Qwen2-VL's processor without its video processor, which needs torchvision (not installed here).

    Real Qwen2-VL checkpoints load their full processor through AutoProcessor where torchvision exists.
    """
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2VLProcessor


def _generation_ids(model, tokenizer) -> None:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


TINY_FAMILIES = {
    "llava": "build_tiny_llava",
    "llava_next": "build_tiny_llava_next",
    "llava_onevision": "build_tiny_llava_onevision",
    "idefics3": "build_tiny_idefics3",
    "qwen2_vl": "build_tiny_qwen2_vl",
    "qwen2_5_vl": "build_tiny_qwen2_5_vl",
}


def build_tiny(family: str = "llava", **kwargs: Any) -> tuple[Any, Any]:
    """Build a tiny model of the given family from config (no download)."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"model.tiny.family must be one of {sorted(TINY_FAMILIES)}, got {family!r}")
    return globals()[TINY_FAMILIES[family]](**kwargs)
