"""Run the entry points as a user does: composed in-process (`compose_config`) or as a command (`run_entry`); and
the tiny causal LM that local judges and rephrasers load in tests (`save_tiny_causal_lm`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import src.train  # noqa: F401  (registers the config's own resolvers, e.g. multirun_dir)
from src.models.reference import precompute_reference_logps

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def compose_config(name: str, overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
    return cfg


def run_entry(
    script: str,
    *overrides: str,
    run_dir: Path | str | None = None,
    env: dict[str, str | None] | None = None,
    timeout: float = 600,
    cwd: Path | str = ROOT,
) -> subprocess.CompletedProcess:
    """``python src/<script> <overrides>`` in a fresh interpreter, its output captured as text.

    Offline (HF_HUB_OFFLINE=1, WANDB_MODE=offline), then ``env`` on top: a value of None removes that variable.
    ``run_dir`` becomes ``hydra.run.dir``. The combined output is ``out.stdout + out.stderr``.
    """
    args = [sys.executable, str(ROOT / "src" / script), *overrides]
    if run_dir is not None:
        args.append(f"hydra.run.dir={run_dir}")
    full_env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def save_tiny_causal_lm(folder: Path, tokenizer: Any, seed: int = 0, **config: Any) -> Path:
    """A tiny random Llama causal LM (one layer, width 32) for ``tokenizer``, saved with it in ``folder``, as
    ``from_pretrained`` loads a real one. Its BOS, EOS and pad ids are the tokenizer's (a tokenizer without a pad
    token gives a model without one); ``config`` overrides any `LlamaConfig` field. Returns ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    } | config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**settings))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def precompute(model, datasets, *args, **kwargs):
    """`precompute_reference_logps`, its values given to the datasets' pairs as a run's data module does; the
    summary."""
    values, summary = precompute_reference_logps(model, datasets, *args, **kwargs)
    for dataset, rows in zip(datasets, values, strict=True):
        dataset.set_reference_logps(rows)
    return summary
