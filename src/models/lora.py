"""LoRA through PEFT: adapters on the language model, the reference as the same weights with adapters off.

With LoRA the reference model needs no second copy in memory: it is the policy with its adapters
disabled. When the starting checkpoint is itself a trained adapter, that adapter is merged into the base
first, so the reference is the adapted model (the model training starts from), not the bare base.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_adapter_folder(path: str | None) -> bool:
    return bool(path) and (Path(str(path)) / "adapter_config.json").is_file()


def adapter_base(path: str) -> str:
    """The base model an adapter folder was trained on (from its adapter_config.json)."""
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path}/adapter_config.json names no base_model_name_or_path; set model.lora.base")
    return str(base)


def merge_adapter(model: torch.nn.Module, adapter_path: str) -> torch.nn.Module:
    """Load a trained adapter onto ``model`` and merge it into the weights (the new starting point)."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    log.info("merged the starting adapter %s into the base weights: the reference is the adapted model", adapter_path)
    return merged


def apply_lora(
    model: torch.nn.Module,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: list[str] | None = None,
    train_projector: bool = True,
    train_vision_tower: bool = False,
) -> torch.nn.Module:
    """Wrap ``model`` in LoRA adapters on the language model's linear layers.

    The vision tower stays frozen unless ``train_vision_tower`` (then it gets adapters too); the
    projector is trained in full when ``train_projector`` (PEFT ``modules_to_save``).
    """
    from peft import LoraConfig, get_peft_model

    names = "|".join(target_modules or DEFAULT_TARGETS)
    scope = "(language_model|vision_tower|visual)" if train_vision_tower else "language_model"
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=rf".*{scope}.*\.({names})$",
        modules_to_save=["multi_modal_projector"] if train_projector else None,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA r=%d on /%s/: %d of %d parameters trainable", r, config.target_modules, trainable, total)
    return peft_model


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The reference view of a LoRA policy (adapters off); a no-op for a plain model."""
    if is_peft(model):
        with model.disable_adapter():
            yield model
    else:
        yield model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected in its modules)."""
    return model.get_base_model() if is_peft(model) else model


def save_adapter_and_merged(model: torch.nn.Module, processor: Any, adapter_dir: Path, merged_dir: Path) -> None:
    """Save the adapter (PEFT format) and a merged model (plain HF format); merging happens on a copy."""
    import copy

    model.save_pretrained(adapter_dir)
    processor.save_pretrained(adapter_dir)
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(merged_dir)
    processor.save_pretrained(merged_dir)
