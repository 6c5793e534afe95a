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
    # the language model is ``language_model`` (LLaVA, Qwen-VL) or ``text_model`` (Idefics3), the vision tower
    # ``vision_tower``, ``visual`` or ``vision_model``
    scope = (
        "(language_model|text_model|vision_tower|visual|vision_model)"
        if train_vision_tower
        else "(language_model|text_model)"
    )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=rf".*{scope}.*\.({names})$",
        modules_to_save=["multi_modal_projector", "connector"] if train_projector else None,
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


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain (Hugging Face format) state dict of a LoRA-wrapped ``model`` with its active adapters merged in,
    as `merge_and_unload` would give, without copying the model: each adapted weight is merged one module at a
    time and moved to the CPU (one module's weight on the device at a time, not a second model), the projector is
    its trained copy (``modules_to_save``), and every other tensor is taken as it is (on a CPU model: the same
    storage, no copy). The model is left as it was.

    Raises NotImplementedError for adapted layers whose base weight is not a plain tensor (4-bit / 8-bit loading):
    `save_adapter_and_merged` merges those on a copy, as before."""
    from peft.utils.other import ModulesToSaveWrapper

    base = unwrap(model)
    modules = dict(base.named_modules())
    adapted = {n: m for n, m in modules.items() if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")}
    saved = {n: m for n, m in modules.items() if isinstance(m, ModulesToSaveWrapper)}
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, tensor in base.state_dict().items():
            if any(key.startswith(f"{name}.") for name in saved):
                name = next(n for n in saved if key.startswith(f"{n}."))
                rest = key[len(name) + 1 :]
                prefix = f"modules_to_save.{saved[name].active_adapter}."
                if rest.startswith(prefix):  # the trained copy, under the plain name
                    out[f"{name}.{rest[len(prefix) :]}"] = tensor.detach().cpu()
                continue  # the original (untrained) module
            name = next((n for n in adapted if key.startswith(f"{n}.")), None)
            if name is None:
                out[key] = tensor.detach().cpu()
                continue
            rest = key[len(name) + 1 :]
            if not rest.startswith("base_layer."):
                continue  # lora_A / lora_B / ...: merged below
            rest = rest[len("base_layer.") :]
            module = adapted[name]
            if rest == "weight":
                if type(module.base_layer.weight) is not torch.nn.Parameter:
                    raise NotImplementedError(f"{name}: the base weight is quantized")
                weight = module.base_layer.weight.detach().clone()
                for adapter in module.active_adapters:
                    if adapter in module.lora_A and adapter not in module.merged_adapters:
                        weight += module.get_delta_weight(adapter).to(weight.dtype)
                out[f"{name}.weight"] = weight.cpu()
                del weight
            else:
                out[f"{name}.{rest}"] = tensor.detach().cpu()
    return out


def save_adapter_and_merged(model: torch.nn.Module, processor: Any, adapter_dir: Path, merged_dir: Path) -> None:
    """Save the adapter (PEFT format) and a merged model (plain HF format). The merged weights are built module by
    module on the CPU (`merged_state_dict`): saving never holds a second copy of the model on its device (a deep
    copy did: on a GPU, a spike of the whole model's size after training). Quantized bases merge on a copy."""
    import copy

    model.save_pretrained(adapter_dir)
    processor.save_pretrained(adapter_dir)
    try:
        state = merged_state_dict(model)
    except NotImplementedError as e:
        log.warning("merging on a copy of the model (%s)", e)
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(merged_dir)
    else:
        unwrap(model).save_pretrained(merged_dir, state_dict=state)
        del state
    processor.save_pretrained(merged_dir)
