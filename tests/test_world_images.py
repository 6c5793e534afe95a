"""Images must reach the model: after a short DPO run on the grounded-safety world, held-out grounded accuracy
with the real pictures beats the same items with blank pictures, and that gap collapses when the training batches
carry zeroed pixels (an image path that silently drops every image while the loss still falls)."""

from __future__ import annotations

import json

import pytest

from src.world.world import World, WorldSettings
from tests.helpers import compose_config

pytestmark = pytest.mark.slow

# the default world, experiment=reproduce_world's base (seed 0) and its DPO schedule (lr 1.25e-4, one epoch).
# Measured: image reliance 0.317, 0.433, 0.308 for DPO seeds 0, 1, 2 (the same figures inside reproduce_world);
# for DPO seed 0 under perturbations that change rounding: 0.258 (eager attention), 0.308 (batch 4 x 2
# accumulated), 0.233 (another base seed); zeroed pixels give 0.000. The bars sit between the two.
WORLD = WorldSettings()
DPO = ["optim.lr=1.25e-4", "trainer.max_epochs=1"]
MIN_RELIANCE = 0.15
MAX_RELIANCE_BROKEN = 0.10


def _train(out, cache, overrides):
    from src.train import train

    cfg = compose_config("train", [*overrides, "logger=csv", "trainer=cpu", f"paths.cache_dir={cache}"], out)
    train(cfg)
    return out / "model"


def _evaluate(out, model, base):
    from src.eval import evaluate

    overrides = ["benchmark=world", "judge=world", *[f"world.{k}={v}" for k, v in _settings().items()]]
    overrides += [f"model.path={model}", f"reference.path={base}", "device=cpu", "wandb.enabled=false"]
    overrides += ["generation.max_new_tokens=32", "generation.batch_size=32", f"cache_dir={out}/cache"]
    return evaluate(compose_config("eval", overrides, out))


def _settings():
    return {k: ("null" if v is None else v) for k, v in WORLD.__dict__.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    World(WORLD).write(folder)
    return folder


@pytest.fixture(scope="module")
def base(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    return _train(out, out / "cache", ["experiment=sft_tiny", "data=jsonl", f"data.path={world}/train.jsonl"])


def _dpo_then_reliance(world, base, out, monkeypatch=None):
    overrides = ["experiment=dpo_tiny", "data=jsonl", f"data.path={world}/train.jsonl", f"model.name_or_path={base}"]
    overrides += DPO
    model = _train(out / "run", out / "cache", overrides)
    report = _evaluate(out / "eval", model, base)
    return report["image_reliance"], report


def test_dpo_on_the_world_relies_on_the_image(world, base, tmp_path):
    reliance, report = _dpo_then_reliance(world, base, tmp_path)
    print(f"image reliance with the images: {reliance:.3f}")  # shown with pytest -s
    assert reliance >= MIN_RELIANCE, json.dumps({k: report[k] for k in ("grounded_accuracy", "ablation")})
    assert report["grounded_accuracy"] > report["ablation"]["blank"]["grounded_accuracy"]["rate"]


def test_zeroed_pixels_in_the_batch_collapse_the_gap(world, base, tmp_path, monkeypatch):
    import src.data.datamodule as datamodule
    from src.data.encoding import collate_pairs

    def zeroed(items, pad_token_id):
        batch = collate_pairs(items, pad_token_id)
        batch["pixel_values"] = batch["pixel_values"].zero_()  # the batch still says it has images
        return batch

    monkeypatch.setattr(datamodule, "collate_pairs", zeroed)
    reliance, report = _dpo_then_reliance(world, base, tmp_path)
    print(f"image reliance with zeroed pixels: {reliance:.3f}")
    assert abs(reliance) <= MAX_RELIANCE_BROKEN, json.dumps({k: report[k] for k in ("grounded_accuracy", "ablation")})
