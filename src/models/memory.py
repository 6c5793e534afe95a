"""What a training configuration needs per device, computed from the config before any weight loads.

Parameters are counted exactly: the architecture (``model.shapes``, or the config.json of a local checkpoint) is
built on the meta device, which allocates nothing. From the counts and the settings (dtype, precision, what trains,
LoRA rank, 4-bit loading, reference strategy, strategy and device count) follow the weights, gradients, optimizer
states and reference; activations follow from the widths, the depth, the longest batch the data settings allow and
gradient checkpointing, by the tensors a decoder layer keeps for its backward pass (`ACTIVATION_BYTES`). The plan's
figures are GiB per device; docs/scaling.md says how far they were checked.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from src.errors import SettingError
from src.models.objectives import data_needs

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
# bytes a decoder layer keeps per token for its backward pass, in units of the compute dtype's size (2 under
# bf16-mixed), per hidden unit and per MLP unit. Measured at llava-1.5-7b's widths (torch 2.13, CPU, sdpa, autocast
# bf16) by counting the storage a LlamaDecoderLayer saves for backward at 256 and 512 tokens: 228,557 bytes a token
# at (4096, 11008), 173,261 at (4096, 4096), 158,515 at (2048, 11008), which 2 x (17.15 h + 4 i) reproduces within
# 0.2%. The hidden units: the fp32 residual stream and norm inputs, the bf16 normed inputs, q / k / v after rotary,
# the attention output and the o_proj input; the MLP units: gate, up, their product's inputs and the down_proj input.
# sdpa's kernels keep no (T, T) score matrix.
ACTIVATION_UNITS = {"hidden": 17.15, "mlp": 4}
# gradient checkpointing: "full" keeps only each layer's input (1 hidden unit a token) and recomputes one layer at a
# time; "selective" keeps matmul and attention outputs, recomputing the element-wise work (about 2/3 of the above)
CHECKPOINT_SHARE = {"selective": 2 / 3}
CUDA_OVERHEAD_GB = 1.0  # the CUDA context, cuBLAS / cuDNN workspaces
FRAGMENTATION = 0.10  # the caching allocator's slack over the tensors it holds
ADAM_STATES = 2  # exp_avg and exp_avg_sq, in the parameter's dtype


@dataclass
class Counts:
    """Parameters by part of the model, and the shapes the activation estimate needs."""

    vision: int
    projector: int
    language: int
    embeddings: int  # of which: input embeddings and the output head
    lora: int  # LoRA parameters added (0 without LoRA)
    hidden_size: int
    intermediate_size: int
    text_layers: int
    vocab_size: int
    image_tokens: int

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.language


@dataclass
class Plan:
    # GiB per device, by part; the total is the peak: the parts that live throughout plus the larger of the
    # forward / backward pass and the optimizer step (not every part at once)
    parts: dict[str, float]
    total_gb: float
    device_memory_gb: float | None
    fits: bool | None  # None: no device memory to compare with
    suggestions: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "total_gb": round(self.total_gb, 2),
            "device_memory_gb": self.device_memory_gb,
            "fits": self.fits,
            "parts": {k: round(v, 3) for k, v in self.parts.items()},
            "suggestions": self.suggestions,
            "details": self.details,
        }


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def architecture(model: Any) -> Any:
    """The transformers config of ``model`` (the ``model`` config group): the config.json of a local checkpoint
    folder (what will load), else its ``shapes``, else the config.json of a hub id in the local cache; a
    `SettingError` when none is there."""
    from src.models.shapes import shapes_config

    name = model.get("name_or_path")
    local = Path(str(name)).expanduser() / "config.json" if name else None
    if model.get("shapes") and not (local is not None and local.is_file()):
        return shapes_config(model.shapes)
    if name is None and model.get("tiny"):
        from src.models.tiny import build_tiny

        return build_tiny(**_plain(model.tiny))[0].config
    path = Path(str(name)).expanduser() / "config.json" if name else None
    if path is None or not path.is_file():
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError

        try:
            cached = try_to_load_from_cache(str(name), "config.json") if name else None
        except HFValidationError:  # neither a folder here nor a hub id
            cached = None
        path = Path(cached) if isinstance(cached, str) else None
    if path is None:
        raise SettingError(
            f"the memory plan needs the architecture of {name}: give model.shapes (the presets llava_1_5_7b, "
            "llava_1_5_13b, llava_next_7b, llava_onevision_7b, qwen2_vl_7b and qwen2_5_vl_7b have it) or a local "
            "folder with its config.json"
        )
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path.parent))


def count_parameters(model: Any, config: Any | None = None) -> Counts:
    """`Counts` of the model the ``model`` config group builds, from its architecture on the meta device."""
    from transformers import AutoModelForImageTextToText

    from src.models.factory import part_of
    from src.models.lora import DEFAULT_TARGETS
    from src.models.shapes import image_tokens

    config = config if config is not None else architecture(model)
    with torch.device("meta"):
        meta = AutoModelForImageTextToText.from_config(config)
    parts = {"vision": 0, "projector": 0, "language": 0}
    for name, p in meta.named_parameters():
        parts[part_of(name)] += p.numel()
    embeddings = meta.get_input_embeddings().weight.numel() + meta.get_output_embeddings().weight.numel()
    lora = 0
    settings = _plain(model.get("lora")) or {}
    if settings.get("enabled"):
        targets = tuple(settings.get("target_modules") or DEFAULT_TARGETS)
        for name, module in meta.named_modules():
            if isinstance(module, torch.nn.Linear) and part_of(name) == "language" and name.endswith(targets):
                lora += settings.get("r", 16) * (module.in_features + module.out_features)
    text = config.get_text_config()
    shapes = model.get("shapes")
    tokens = image_tokens(shapes) if shapes else int(getattr(config, "image_seq_length", 0) or 576)
    return Counts(
        **parts,
        embeddings=embeddings,
        lora=lora,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        text_layers=text.num_hidden_layers,
        vocab_size=text.vocab_size,
        image_tokens=tokens,
    )


def _strategy(trainer: Any) -> tuple[str, int, bool]:
    """(ddp | fsdp | zero2 | zero3, processes sharing the work, whether optimizer states live on the CPU)."""
    devices = trainer.get("devices", 1)
    count = devices if isinstance(devices, int) else len(devices) if isinstance(devices, (list, tuple)) else 1
    count *= trainer.get("num_nodes", 1) or 1
    strategy = _plain(trainer.get("strategy"))
    if isinstance(strategy, dict):
        target = str(strategy.get("_target_", ""))
        if "DeepSpeed" in target:
            stage = strategy.get("stage", 2)
            offload = bool(strategy.get("offload_optimizer")) or bool(strategy.get("offload_parameters"))
            return (f"zero{stage}", count, offload)
        if "fsdp" in target.lower():
            return ("fsdp", count, False)
    return ("ddp", count, False)


def _tokens_per_batch(cfg: Any, answers: int, image_tokens: int, layout: str) -> tuple[int, int]:
    """(tokens a forward holds at the config's longest batch, of which answer tokens): a prompt of at least the
    image and a short template (P) with answers filling ``data.max_length``; packed, a record holds the prompt once
    and its K answers, P + K (max_length - P) at most; padded, K rows of max_length."""
    max_length, batch = cfg.data.max_length, cfg.data.batch_size
    prompt = min(max_length - 1, image_tokens + 32)
    answer = max_length - prompt
    if layout == "padded":
        return batch * answers * max_length, batch * answers * answer
    return batch * (prompt + answers * answer), batch * answers * answer


def plan_memory(cfg: Any, device_memory_gb: float | None, counts: Counts | None = None) -> Plan:
    """The plan for the training config ``cfg`` (train.yaml composed) on devices of ``device_memory_gb``."""
    counts = counts or count_parameters(cfg.model)
    model = cfg.model
    param_bytes = DTYPE_BYTES.get(str(model.get("dtype", "float32")), 4)
    precision = str(cfg.trainer.get("precision", "32-true"))
    compute_bytes = 2 if precision.startswith(("bf16", "16")) else 4
    lora_on = bool((_plain(model.get("lora")) or {}).get("enabled"))
    four_bit = bool(model.get("load_in_4bit"))
    strategy, processes, offload = _strategy(cfg.trainer)

    trainable = counts.lora if lora_on else 0
    if model.get("train_projector", True):
        trainable += counts.projector
    if model.get("train_vision_tower", False) and not lora_on:
        trainable += counts.vision
    if model.get("train_language_model", True) and not lora_on:
        trainable += counts.language
    sharded = strategy in ("zero3", "fsdp")
    if strategy.startswith("zero") and compute_bytes < param_bytes:
        # DeepSpeed under bf16 holds the parameters in bf16 and fp32 master weights beside the optimizer states
        param_bytes, master_bytes = compute_bytes, 4
    else:
        master_bytes = 0
    frozen_weights = counts.total * param_bytes
    if four_bit:  # the language model's matrices in 4 bits (+ a scale per 64), the rest as loaded
        frozen_weights = (counts.language - counts.embeddings) * 0.53 + (counts.total - counts.language) * param_bytes
        frozen_weights += counts.embeddings * param_bytes
    weights = frozen_weights + (counts.lora + (counts.projector if lora_on else 0)) * param_bytes
    grads = trainable * param_bytes
    optimizer = ADAM_STATES * trainable * max(param_bytes, master_bytes)
    master = master_bytes * trainable
    # autocast's compute-dtype copy of every weight a forward uses, held to its end (and, where the backward needs
    # it, to the backward): the size of the model again in bf16. Sharded, the layer gathered in the compute dtype is
    # that copy (counted with the weights); 4-bit weights are dequantized layer by layer
    copies = 0.0
    if compute_bytes < param_bytes and not four_bit and not sharded:
        copies = counts.total * compute_bytes
    if sharded:
        weights, grads, optimizer, master = (x / processes for x in (weights, grads, optimizer, master))
        weights += counts.total * compute_bytes / max(1, counts.text_layers)  # one layer gathered at a time
    elif strategy == "zero2":
        grads, optimizer, master = (x / processes for x in (grads, optimizer, master))
    if offload:
        optimizer, master = 0.0, 0.0

    reference = 0.0
    ref = _plain(cfg.get("reference")) or {}
    if ref.get("strategy") == "frozen_copy":
        ref_bytes = DTYPE_BYTES.get(str(ref.get("dtype") or model.get("dtype", "float32")), 4)
        reference = counts.total * ref_bytes / (processes if strategy in ("zero3", "fsdp") else 1)

    try:  # the answers the objective scores (a composite's follow from its terms)
        answers = len(data_needs(cfg.objective).answers)
    except ValueError:  # a setting the objective refuses: training says which; plan with what the config lists
        answers = len(_plain(cfg.objective.get("answers")) or ["chosen", "rejected"])
    layout = str(cfg.get("layout", "packed"))
    tokens, answer_tokens = _tokens_per_batch(cfg, answers, counts.image_tokens, layout)
    per_token_layer = compute_bytes * (
        ACTIVATION_UNITS["hidden"] * counts.hidden_size + ACTIVATION_UNITS["mlp"] * counts.intermediate_size
    )
    checkpointing = str(model.get("gradient_checkpointing", False)).lower()
    layer_acts = tokens * per_token_layer
    if checkpointing in ("true", "full"):
        activations = tokens * counts.hidden_size * 4 * counts.text_layers + layer_acts
    else:
        activations = layer_acts * counts.text_layers * CHECKPOINT_SHARE.get(checkpointing, 1.0)
    # the answer tokens' logits in the compute dtype, their fp32 copy and its log-softmax
    logits = answer_tokens * counts.vocab_size * (compute_bytes + 8)
    # the optimizer step's temporaries: AdamW's multi-tensor (foreach) step makes a full fp32 copy of the trainable
    # parameters (the square root of exp_avg_sq) while it runs; activations are freed by then
    step = trainable * 4 / (processes if strategy != "ddp" else 1) if not offload else 0.0
    parts = {
        "weights": weights / GIB,
        "master_weights": master / GIB,
        "optimizer": optimizer / GIB,
        "reference": reference / GIB,
        "gradients": grads / GIB,
        "compute_copies": copies / GIB,
        "activations": activations / GIB,
        "logits": logits / GIB,
        "optimizer_step": step / GIB,
    }
    # the peak: what lives throughout, plus the larger of the forward / backward pass (bf16 copies, activations,
    # logits, the gradients it leaves) and the optimizer step (the gradients and the step's temporaries)
    static = sum(parts[k] for k in ("weights", "master_weights", "optimizer", "reference"))
    passes = sum(parts[k] for k in ("gradients", "compute_copies", "activations", "logits"))
    tensors = static + max(passes, parts["gradients"] + parts["optimizer_step"])
    parts["overhead"] = tensors * FRAGMENTATION + (CUDA_OVERHEAD_GB if cfg.trainer.get("accelerator") != "cpu" else 0)
    total = tensors + parts["overhead"]
    fits = None if not device_memory_gb else total <= device_memory_gb
    details = {
        "parameters": counts.total,
        "trainable": trainable,
        "by_part": {"vision": counts.vision, "projector": counts.projector, "language": counts.language},
        "lora_parameters": counts.lora,
        "hidden_size": counts.hidden_size,
        "text_layers": counts.text_layers,
        "vocab_size": counts.vocab_size,
        "image_tokens": counts.image_tokens,
        "tokens_per_forward": tokens,
        "strategy": strategy,
        "processes": processes,
        "precision": precision,
        "dtype": str(model.get("dtype", "float32")),
        "gradient_checkpointing": checkpointing,
    }
    plan = Plan(parts, total, device_memory_gb, fits, details=details)
    if fits is False:
        plan.suggestions = suggestions(cfg, device_memory_gb, counts)
    return plan


def suggestions(cfg: Any, device_memory_gb: float, counts: Counts) -> list[str]:
    """The changes, one at a time and cheapest first, under which the plan fits; each with its total."""
    batch, accumulate = cfg.data.batch_size, cfg.trainer.get("accumulate_grad_batches", 1)
    smaller = f"data.batch_size=1 trainer.accumulate_grad_batches={batch * accumulate}"
    candidates = [
        ("model.gradient_checkpointing=true", ["gc"]),
        (smaller, ["batch1"]),
        ("model.lora.enabled=true", ["lora"]),
        ("model.lora.enabled=true model.gradient_checkpointing=true", ["lora", "gc"]),
        ("model.lora.enabled=true model.load_in_4bit=true (QLoRA, bitsandbytes)", ["lora", "4bit"]),
    ]
    for n in (4, 8):
        zero3 = f"trainer=deepspeed_zero3 trainer.devices={n}"
        candidates += [(zero3, [f"zero3:{n}"]), (f"{zero3} model.gradient_checkpointing=true", [f"zero3:{n}", "gc"])]
    out = []
    for label, changes in candidates:
        changed = _changed(cfg, changes)
        if changed is None:
            continue
        total = plan_memory(changed, None, _recount(changed, counts)).total_gb
        if total <= device_memory_gb:
            out.append(f"{label}: {total:.1f} GiB")
    return out[:5] or [f"none of the usual changes fits {device_memory_gb:g} GiB: more devices (ZeRO-3 over 16+)"]


def _recount(cfg: Any, counts: Counts) -> Counts:
    """``counts`` with the LoRA parameters of ``cfg`` (they depend on the rank; the rest does not change)."""
    if counts.lora or not (_plain(cfg.model.get("lora")) or {}).get("enabled"):
        return counts
    return count_parameters(cfg.model)


def _changed(cfg: Any, changes: list[str]) -> Any | None:
    """A copy of ``cfg`` with the changes made; None where a change is already in place."""
    out = copy.deepcopy(cfg) if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    OmegaConf.set_struct(out, False)
    for change in changes:
        if change == "gc":
            if str(out.model.get("gradient_checkpointing")).lower() in ("true", "full"):
                return None
            out.model.gradient_checkpointing = True
        elif change == "batch1":
            if out.data.batch_size <= 1:
                return None
            out.trainer.accumulate_grad_batches = out.trainer.get("accumulate_grad_batches", 1) * out.data.batch_size
            out.data.batch_size = 1
        elif change == "lora":
            if out.model.lora.enabled:
                return None
            out.model.lora.enabled = True
        elif change == "4bit":
            out.model.load_in_4bit = True
        elif change.startswith("zero3:"):
            out.trainer.devices = int(change.split(":")[1])
            out.trainer.strategy = {"_target_": "lightning.pytorch.strategies.DeepSpeedStrategy", "stage": 3}
    return out


def device_memory() -> float | None:
    """GiB of the first CUDA device, None without one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GIB


def table(plan: Plan) -> str:
    """The plan as lines for a console: each part, the total, the verdict and the suggestions."""
    lines = [f"  {name:<15} {gb:8.2f} GiB" for name, gb in plan.parts.items()]
    lines.append(f"  {'total':<15} {plan.total_gb:8.2f} GiB per device at the peak (not the sum: the passes and the")
    lines.append(f"  {'':<15} {'':>8}     optimizer step do not overlap)")
    if plan.fits is None:
        lines.append("  no device memory to compare with (no CUDA device; set plan.device_memory_gb)")
    else:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"  {verdict} in {plan.device_memory_gb:g} GiB")
    lines += [f"  would fit with: {s}" for s in plan.suggestions]
    return "\n".join(lines)


def write_plan(plan: Plan, path: Path) -> None:
    from src.files import write_atomic

    write_atomic(path, json.dumps(plan.as_dict(), indent=2) + "\n")
