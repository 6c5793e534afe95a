"""Settings and helpers shared by every worker of the step benchmark: the tiny model, the optimizer, the timers."""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULT_PREFIX = "BENCH_RESULT "

# One LLaVA-shaped tiny model: 96 px images, patch 4 -> 576 image tokens; Llama 256 x 4 layers; vocab 4096.
TINY = {
    "seed": 0,
    "vocab_size": 4096,  # BPE target; the offline corpus yields fewer tokens, so the model is resized to VOCAB
    "image_size": 96,
    "patch_size": 4,
    "vision_hidden_size": 64,
    "vision_layers": 2,
    "vision_heads": 2,
    "hidden_size": 256,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 4,
    "intermediate_size": 1024,
    "max_position_embeddings": 2048,
}
VOCAB = 4096
# ``--widths``: the tiny model above, or a real checkpoint's architecture at full width with random weights
# (configs/model/<name>.yaml's ``shapes``, `src.models.random_init`), its depth cut to ``--text-layers`` decoder
# layers and 1 vision layer; the embedding keeps the real vocabulary (32064 rows for llava-1.5-7b)
WIDTHS = ("tiny", "llava_1_5_7b")
_MODEL = {"widths": "tiny", "text_layers": 1}
RESIZE_SEED = 1234  # new embedding rows are random: draw them from a fixed seed so every worker has equal weights
LR = 5e-4
BETAS = (0.9, 0.999)
BETA = 0.1
BATCH_SIZE = 4
MAX_GRAD_NORM = 1.0
THREADS = 2
ANSWER_TOKENS = 100  # target length of every answer (incl. EOS) for the tiny tokenizer
PRECOMPUTE_BATCH_SIZE = 8  # configs/train.yaml reference.batch_size
BLIND_BATCH_SIZE = 16  # configs/blind/greedy.yaml generation.batch_size
SWEEP_BETAS = (0.05, 0.1, 0.2, 0.5)  # the 4 jobs of the sweep rows, one beta each

HEADLINE = ("trl_dpo", "ours_dpo", "ours_bpo")
EXTRAS = ("ours_dpo_no_recompute", "ours_bpo_no_recompute", "ours_dpo_padded", "ours_dpo_frozen")
EPOCHS = ("trl_dpo_epoch", "ours_bpo_epoch")
END_TO_END = "ours_bpo_end_to_end"
SWEEPS = ("trl_dpo_sweep", "ours_bpo_sweep")  # 4 jobs each, one process per job: worker NAME + "_job"
# activation checkpointing of our rows: `selective` reruns only the element-wise ops of each decoder layer in the
# backward pass (matmul and attention outputs are kept), which gives the same gradients (tests/test_lora.py)
RECOMPUTE = "selective"
# worker name -> (objective, layout, reference strategy, activation checkpointing) for our side
OURS = {
    "ours_dpo": ("dpo", "packed", "precomputed", RECOMPUTE),
    "ours_bpo": ("bpo", "packed", "precomputed", RECOMPUTE),
    "ours_dpo_no_recompute": ("dpo", "packed", "precomputed", False),
    "ours_bpo_no_recompute": ("bpo", "packed", "precomputed", False),
    "ours_dpo_padded": ("dpo", "padded", "precomputed", RECOMPUTE),
    "ours_dpo_frozen": ("dpo", "packed", "frozen_copy", RECOMPUTE),
    "ours_bpo_epoch": ("bpo", "packed", "precomputed", RECOMPUTE),
}
LABELS = {
    "trl_dpo": "TRL DPO (DPOTrainer, ref model every step)",
    "ours_dpo": "ours DPO (packed, precomputed ref)",
    "ours_bpo": "ours BPO (packed, precomputed ref)",
    "ours_dpo_no_recompute": "ours DPO, no selective recompute [extra]",
    "ours_bpo_no_recompute": "ours BPO, no selective recompute [extra]",
    "ours_dpo_padded": "ours DPO (padded, precomputed ref) [extra]",
    "ours_dpo_frozen": "ours DPO (packed, frozen_copy ref) [extra]",
}


# -- setup shared by the workers ------------------------------------------------------------------------------
def setup_env() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(THREADS)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def configure(widths: str, text_layers: int) -> None:
    """Which model every worker of this run builds (the driver passes ``--widths`` / ``--text-layers`` on)."""
    if widths not in WIDTHS:
        raise ValueError(f"--widths must be one of {WIDTHS}, got {widths!r}")
    _MODEL.update(widths=widths, text_layers=text_layers)


def real_widths() -> bool:
    return _MODEL["widths"] != "tiny"


def shapes() -> dict[str, Any]:
    """configs/model/<widths>.yaml's ``shapes`` with ``--text-layers`` decoder layers and 1 vision layer."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "configs" / "model" / f"{_MODEL['widths']}.yaml")
    out = OmegaConf.to_container(cfg.shapes, resolve=True)
    return out | {"seed": 0, "text_layers": _MODEL["text_layers"], "vision_layers": 1}


def model_spec() -> dict[str, Any]:
    """The model's settings as `build_model` / ``PreferenceModule(model=...)`` take them (size part only)."""
    return {"shapes": shapes()} if real_widths() else {"tiny": dict(TINY)}


def image_size() -> int:
    """The side of the workload's pictures: the model's own input size (no resampling artefacts either way)."""
    return shapes()["vision"]["image_size"] if real_widths() else TINY["image_size"]


def describe_model() -> str:
    """One line: the model the rows train."""
    if not real_widths():
        return (
            f"LLaVA tiny, {TINY['image_size']} px / patch {TINY['patch_size']} = "
            f"{(TINY['image_size'] // TINY['patch_size']) ** 2} image tokens, text {TINY['hidden_size']} x "
            f"{TINY['num_layers']} layers x {TINY['num_heads']} heads, vision {TINY['vision_hidden_size']} x "
            f"{TINY['vision_layers']} (frozen)"
        )
    sh = shapes()
    text, vision = sh["text"], sh["vision"]
    return (
        f"{_MODEL['widths']} widths, random weights: text {text['hidden_size']} x {sh['text_layers']} layers "
        f"(MLP {text['intermediate_size']}, {text['num_attention_heads']} heads), vision {vision['hidden_size']} x "
        f"{sh['vision_layers']} layer (frozen), {vision['image_size']} px / patch {vision['patch_size']} = "
        f"{(vision['image_size'] // vision['patch_size']) ** 2} image tokens"
    )


def resize_vocab(model: Any) -> None:
    """Resize to VOCAB rows with the new rows drawn from a fixed seed (all workers get identical weights); at real
    widths nothing: the embedding has the checkpoint's rows already."""
    import torch

    if real_widths():
        return

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RESIZE_SEED)
        model.resize_token_embeddings(VOCAB)
    assert model.config.get_text_config().vocab_size == VOCAB


def build_policy() -> tuple[Any, Any]:
    """(model, processor) through the project's factory: vision tower frozen, projector + LM trainable."""
    from src.models.factory import build_model

    model, processor = build_model(**model_spec(), attn_implementation="sdpa")
    resize_vocab(model)
    return model, processor


def make_optimizer(model: Any) -> Any:
    """AdamW exactly as `PreferenceModule.configure_optimizers` builds it (no decay; constant lr, no warm-up)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=BETAS
    )


def model_fingerprint(model: Any) -> str:
    from src.models.factory import fingerprint

    return fingerprint(model)


# -- step timing shared by the workers ------------------------------------------------------------------------
def step_stats(stamps: list[tuple[float, float]], warmup: int) -> dict[str, Any]:
    """``stamps[0]``: (wall, process CPU) just before the first step; ``stamps[k]``: at the end of step k.

    Steps after the warm-up count. The process CPU time (all threads) is reported next to the wall time: CPU /
    wall is ~2 (THREADS) when the worker has the cores to itself and drops towards 1 when other processes
    compete for them (then OpenMP threads wait on each other and a step can take several times longer).
    """
    wall = [stamps[k][0] - stamps[k - 1][0] for k in range(warmup + 1, len(stamps))]
    cpu = [stamps[k][1] - stamps[k - 1][1] for k in range(warmup + 1, len(stamps))]
    return {
        "s_per_step": sum(wall) / len(wall),
        "median_s_per_step": statistics.median(wall),
        "cpu_s_per_step": sum(cpu) / len(cpu),
        "step_times": [round(x, 4) for x in wall],
        "loadavg": os.getloadavg()[0],
    }


def stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()
