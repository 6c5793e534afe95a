"""A tiny LLaVA of the real class, built from config with no download.

`LlavaForConditionalGeneration` (small CLIP vision tower + small Llama) with a byte-level BPE tokenizer
trained offline on a fixed corpus, and a processor whose chat template renders conversations the way
llava-1.5 does (``USER: <image>\\n... ASSISTANT: ...``). The same code paths (processor, chat template,
image-token expansion, generation, save/reload) run for it as for `llava-hf/llava-1.5-7b-hf`.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def build_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the fixed corpus (deterministic, a second or less)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
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
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id

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
