"""The one-off work before training, each step a function that returns what it produced: the blind answers
(`blind_answers`) and the reference log-probs (`reference_values`), both computed by the initial policy
(`initial_model`) or read from their caches; the data module is given what they return."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from src.data.prompt_format import PromptFormat
from src.data.records import PreferenceRecord
from src.models.generation import GenerationSettings, fill_blind_answers
from src.models.lora import adapters_disabled
from src.models.reference import precompute_reference_logps


@contextmanager
def initial_model(module: Any, accelerator: str):
    """The policy before training, i.e. the reference model, on the run's device for one-off work."""
    gpu = torch.cuda.is_available() and accelerator != "cpu"
    module.policy.to("cuda" if gpu else "cpu")
    # one-off work must not move the random state: data order and init stay those of the seed, whether
    # blind answers and reference log-probs come from a cache or are computed now
    with (
        torch.random.fork_rng(devices=[torch.cuda.current_device()] if gpu else []),
        adapters_disabled(module.policy) as reference,
    ):
        try:
            yield reference
        finally:
            module.policy.to("cpu")


def autocast_dtype(precision: Any) -> torch.dtype | None:
    """The compute dtype of a Lightning precision setting, so cached log-probs match training's."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None


def blind_answers(
    module: Any,
    records: list[PreferenceRecord],
    blind: dict[str, Any],
    trainer: dict[str, Any],
    prompt_format: PromptFormat,
) -> tuple[list[PreferenceRecord], dict[str, Any]]:
    """The records, each with the reference model's image-less answer (generated, or read from ``blind.cache_dir``),
    and a summary of the counts. ``blind`` is the ``blind`` config node, ``trainer`` the ``trainer`` one."""
    devices = blind.get("devices")
    if devices and devices.get("devices") != trainer.get("devices"):
        # the predict loop's worker processes go on to train: both must use the same processes
        raise ValueError(
            f"blind.devices.devices={devices.get('devices')} must equal trainer.devices={trainer.get('devices')}"
        )
    settings = GenerationSettings(**blind["generation"])
    with initial_model(module, trainer.get("accelerator", "auto")) as reference:
        return fill_blind_answers(
            records,
            reference,
            module.processor,
            settings,
            blind["cache_dir"],
            devices or None,
            prompt_format=prompt_format,
        )


def reference_values(
    module: Any, datasets: list[Any], reference: dict[str, Any], trainer: dict[str, Any]
) -> tuple[list[list[list[float]]], dict[str, Any]]:
    """Reference log-probs of every answer of every item of ``datasets`` (in their order), computed by the initial
    policy or read from ``reference.cache_dir``, and a summary of the counts; the data module takes the values
    (`PreferenceDataModule.set_reference_logps`) so training runs no reference model."""
    with initial_model(module, trainer.get("accelerator", "auto")) as model:
        return precompute_reference_logps(
            model,
            datasets,
            module.pad_token_id,
            reference["cache_dir"],
            module.layout,
            reference["batch_size"],
            autocast_dtype(trainer.get("precision")),
        )
