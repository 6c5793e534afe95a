"""Lightning strategies built from config, and gathering a sharded policy for saving."""

from __future__ import annotations

import importlib
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy


def _class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def fsdp_strategy(layer_classes: list[str], activation_checkpointing: bool = False, **kwargs: Any) -> FSDPStrategy:
    """FSDP wrapping each listed layer class (dotted import paths in config) as its own shard unit."""
    layers = {_class(p) for p in layer_classes}
    if activation_checkpointing:
        kwargs["activation_checkpointing_policy"] = layers
    return FSDPStrategy(auto_wrap_policy=layers, **kwargs)


def policy_state_dict(trainer: Any) -> dict[str, Any]:
    """The policy's full weights from whatever strategy holds them (collective: call on every rank).

    Under FSDP / DeepSpeed ZeRO-3 the module's own parameters are shards; the strategy gathers them.
    """
    state = trainer.strategy.lightning_module_state_dict()
    prefix = "policy."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
