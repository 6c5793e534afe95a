"""Activation checkpointing of the decoder layers: ``full`` or ``selective``.

``full`` keeps only each layer's input and reruns the whole layer in the backward pass (least memory, the
forward cost again). ``selective`` reruns the layer too, but keeps the outputs of its matrix products and of
attention from the forward pass: only the cheap element-wise work (norms, rotary embedding, activation
function, residual adds) is recomputed, so it costs a few per cent of step time and still frees the
element-wise activations, which outnumber the matmul outputs.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

MODES = (False, True, "full", "selective")
_aten = torch.ops.aten
# ops whose outputs `selective` keeps: every op that costs FLOPs in proportion to the weights or the sequence
_EXPENSIVE = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten.convolution.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}


def _keep_expensive(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _EXPENSIVE else CheckpointPolicy.PREFER_RECOMPUTE


def enable_checkpointing(model: torch.nn.Module, mode: bool | str) -> None:
    """Checkpoint every decoder layer of a transformers model (``mode`` in `MODES`; False does nothing)."""
    if mode not in MODES:
        raise ValueError(f"model.gradient_checkpointing must be one of false, true, full, selective; got {mode!r}")
    if mode is False:
        return
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_expensive)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers also makes the output of every input-embedding layer require grad (needed only by reentrant
    # checkpointing); on a frozen vision tower that would run a useless backward pass through it
    if getattr(model, "_require_grads_hooks", None):
        model.disable_input_require_grads()
