"""Model factory: (model, processor) for the tiny from-config LLaVA or any HF path / hub id."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from src.models.checkpointing import enable_checkpointing
from src.models.device import DTYPE_NAMES, torch_dtype
from src.models.lora import adapter_base, apply_lora, is_adapter_folder, merge_adapter, unwrap
from src.models.random_init import build_random, build_random_processor
from src.models.source import check_model_source
from src.models.tiny import ONEVISION_CHAT_TEMPLATE, build_tiny

log = logging.getLogger(__name__)

# parameter-name fragments of each part, across LLaVA / LLaVA-NeXT / LLaVA-OneVision / Idefics3 / Qwen-VL layouts
PROJECTOR_KEYS = ("multi_modal_projector", "visual.merger", "model.connector.")
VISION_KEYS = ("vision_tower", "visual.", "vision_model")


def part_of(name: str) -> str:
    """'projector', 'vision' or 'language' for a parameter name."""
    if any(k in name for k in PROJECTOR_KEYS):
        return "projector"
    if any(k in name for k in VISION_KEYS):
        return "vision"
    return "language"


def set_trainable(model: torch.nn.Module, vision: bool, projector: bool, language: bool) -> dict[str, int]:
    """Freeze or unfreeze each part; returns trainable parameter counts per part."""
    wanted = {"vision": vision, "projector": projector, "language": language}
    counts = {"vision": 0, "projector": 0, "language": 0}
    for name, p in model.named_parameters():
        part = part_of(name)
        p.requires_grad_(wanted[part])
        if wanted[part]:
            counts[part] += p.numel()
    return counts


def build_model(
    name_or_path: str | None = None,
    tiny: dict[str, Any] | None = None,
    revision: str | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = "sdpa",
    train_vision_tower: bool = False,
    train_projector: bool = True,
    train_language_model: bool = True,
    trust_remote_code: bool = False,
    lora: dict[str, Any] | None = None,
    gradient_checkpointing: bool | str = False,
    load_in_4bit: bool = False,
    shapes: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Return (model, processor).

    ``name_or_path=None`` builds, with ``shapes`` (a real architecture, `src.models.shapes`), that architecture at
    full width with random weights and the project's tokenizer (`src.models.random_init.build_random`, which says
    what differs from the checkpoint), else the tiny LLaVA from ``tiny`` (sizes and seed); otherwise the model and
    processor load through transformers' Auto classes (local folder or hub id; set HF_HUB_OFFLINE=1 to
    forbid downloads). By default the vision tower is frozen and the projector and language model train,
    as in the BPO paper. ``lora.enabled`` wraps the language model in LoRA adapters (PEFT); a folder that
    holds a trained adapter is merged into its base first. ``load_in_4bit`` (QLoRA) needs a CUDA GPU and
    bitsandbytes. ``gradient_checkpointing`` (true / full, or selective) recomputes activations in the backward
    pass (`src.models.checkpointing`). How prompts are built is no model setting: the entry points pass the
    ``prompt_format`` config node (`src.data.prompt_format.PromptFormat`) to `PromptEncoder`.
    """
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    lora = dict(lora or {})
    use_lora = bool(lora.pop("enabled", False))
    adapter_path = None
    if is_adapter_folder(name_or_path):
        adapter_path, name_or_path = name_or_path, lora.get("base") or adapter_base(name_or_path)
    lora.pop("base", None)
    # a missing folder or uncached hub id: one line now, not transformers' traceback (or download retries)
    check_model_source(name_or_path, revision=revision)
    if load_in_4bit and not use_lora:
        raise ValueError("model.load_in_4bit trains through adapters only: set model.lora.enabled=true")
    if name_or_path is None and shapes:
        model, processor = build_random(shapes, torch_dtype(dtype), attn_implementation)
    elif name_or_path is None:
        model, processor = build_tiny(**(tiny or {}), attn_implementation=attn_implementation or "sdpa")
        model = model.to(torch_dtype(dtype))
    else:
        kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
        if revision:
            kwargs["revision"] = revision
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if load_in_4bit:
            kwargs["quantization_config"] = _four_bit_config()
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
        processor = AutoProcessor.from_pretrained(
            adapter_path if adapter_path and (Path(adapter_path) / "processor_config.json").exists() else name_or_path,
            revision=revision,
            trust_remote_code=trust_remote_code,
        )
        processor = fit_chat_template(processor)
    if adapter_path:
        model = merge_adapter(model, adapter_path)
    tok = getattr(processor, "tokenizer", processor)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    counts = set_trainable(model, train_vision_tower, train_projector, train_language_model and not use_lora)
    name = name_or_path or (f"random {shapes['family']} at full width" if shapes else "tiny-llava")
    log.info("model %s: trainable parameters by part %s", name, counts)
    if use_lora:
        if load_in_4bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = apply_lora(model, train_projector=train_projector, train_vision_tower=train_vision_tower, **lora)
    enable_checkpointing(unwrap(model), gradient_checkpointing)
    return model, processor


def load_processor(
    name_or_path: str | None = None,
    tiny: dict[str, Any] | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    shapes: dict[str, Any] | None = None,
    **_: Any,
) -> Any:
    """The processor alone (no weights loaded for a real checkpoint or built for ``shapes``), for data checks."""
    if name_or_path is None and shapes:
        return build_random_processor(shapes)
    if name_or_path is None:
        return build_tiny(**(tiny or {}))[1]
    if is_adapter_folder(name_or_path) and not (Path(name_or_path) / "processor_config.json").exists():
        name_or_path = adapter_base(name_or_path)
    check_model_source(name_or_path, revision=revision)
    processor = AutoProcessor.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    return fit_chat_template(processor)


def _answer_follows_prompt(processor: Any) -> bool:
    """Whether the chat template renders a conversation with an answer as the generation prompt followed by it."""
    user = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    answer = [{"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]
    prompt = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    return processor.apply_chat_template(user + answer, tokenize=False).startswith(prompt)


def fit_chat_template(processor: Any) -> Any:
    """A LLaVA-OneVision processor whose chat template opens an assistant turn otherwise than its generation prompt
    gets llava-hf's current one (`src.models.tiny.ONEVISION_CHAT_TEMPLATE`, ChatML).

    An earlier llava-hf template writes ``<|im_start|>assistant \\n...`` for an assistant turn (a space after every
    role) but ``<|im_start|>assistant\\n`` as the generation prompt: no prompt followed by an answer would start with
    the prompt alone, and every record would be rejected (the encoder tells an answer's tokens from its prompt's that
    way). Other processors, and one whose template agrees, are returned as they are."""
    from transformers import LlavaOnevisionProcessor

    if not isinstance(processor, LlavaOnevisionProcessor) or _answer_follows_prompt(processor):
        return processor
    log.warning(
        "LLaVA-OneVision's chat template opens an assistant turn otherwise than its generation prompt; using "
        "llava-hf's current ChatML template (src/models/tiny.py)"
    )
    processor.chat_template = ONEVISION_CHAT_TEMPLATE
    return processor


def _four_bit_config() -> Any:
    if not torch.cuda.is_available():
        raise RuntimeError("model.load_in_4bit (QLoRA) needs a CUDA GPU and the bitsandbytes package")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


# config entries that change on save/reload or with where a model came from, not with what it computes
_VOLATILE = {
    "dtype",
    "torch_dtype",
    "_name_or_path",
    "transformers_version",
    "architectures",
    "use_cache",
    "_attn_implementation_autoset",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}


def _stable(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _stable(v) for k, v in d.items() if k not in _VOLATILE}
    return d


# bytes of a tensor copied to the CPU at a time: a model on a GPU is hashed without a second copy in host memory
FINGERPRINT_CHUNK_BYTES = 64 << 20


def _tensor_chunks(t: torch.Tensor) -> Iterator[Any]:
    """The bytes of ``t`` in memory order (bfloat16 and float16 as stored, not converted), as buffers for a
    hash, at most `FINGERPRINT_CHUNK_BYTES` at a time: a tensor on a GPU comes to the CPU piece by piece (on the
    CPU the pieces are views, no copy)."""
    flat = t.detach().reshape(-1)  # a view of a contiguous tensor
    step = max(1, FINGERPRINT_CHUNK_BYTES // max(1, flat.element_size()))
    for start in range(0, flat.numel(), step):
        yield flat[start : start + step].to("cpu").view(torch.uint8).numpy()


def fingerprint(model: torch.nn.Module) -> str:
    """An identity of a model's weights: its config and every parameter and buffer in full (name, shape, dtype
    and all bytes), so any changed value gives another fingerprint.

    Keys caches (reference log-probs, blind answers, evaluation answers) so they are not reused across models;
    the same weights give the same fingerprint whether built in memory or reloaded from a saved folder. It is
    computed from the weights in memory, not from the files they were loaded from: what training, a merged
    adapter or loading in another dtype did is in it. SHA-256 reads about 2 GB/s on one CPU core (a 7B model
    in bfloat16: ~7 s); weights on a GPU are copied to the CPU 64 MB at a time.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(json.dumps(_stable(config.to_diff_dict()), sort_keys=True, default=str).encode())
    with torch.no_grad():
        tensors = [("parameter", *item) for item in model.named_parameters()]
        tensors += [("buffer", *item) for item in model.named_buffers()]
        for kind, name, t in tensors:
            # the header ends each tensor's bytes: values cannot move from one tensor to the next unnoticed
            h.update(f"\n{kind} {name} {tuple(t.shape)} {t.dtype} {t.numel() * t.element_size()}\n".encode())
            for chunk in _tensor_chunks(t):
                h.update(chunk)
    return h.hexdigest()[:16]
