"""The memory plan: computed from the config before any weight loads, it says what a configuration needs per device
and what would make it fit (`src/plan.py`, and at the start of training)."""

from __future__ import annotations

import json
import time

import pytest

from src.errors import SettingError
from src.models.memory import plan_memory
from tests.helpers import compose_config, run_entry

LLAVA = ["experiment=bpo_llava", "data.path=train.json"]


def plan_of(*overrides, memory=80.0):
    return plan_memory(compose_config("plan", [*LLAVA, *overrides]), memory)


def test_the_papers_full_fine_tune_does_not_fit_one_80_gb_gpu():
    plan = plan_of()
    # 7.06 B parameters, 6.76 B of them trained in fp32 with AdamW: 16 bytes each before any activation
    assert plan.details["parameters"] == 7_063_427_072 and plan.details["trainable"] == 6_759_919_616
    assert plan.fits is False and plan.total_gb >= 100
    assert abs(plan.parts["weights"] + plan.parts["gradients"] + plan.parts["optimizer"] - 101.9) < 0.1
    assert plan.suggestions and any("lora" in s for s in plan.suggestions)
    p = plan.parts  # the peak: what lives throughout + the larger of the passes and the optimizer step
    passes = p["gradients"] + p["compute_copies"] + p["activations"] + p["logits"]
    static = p["weights"] + p["master_weights"] + p["optimizer"] + p["reference"]
    assert plan.total_gb == pytest.approx(static + max(passes, p["gradients"] + p["optimizer_step"]) + p["overhead"])


@pytest.mark.parametrize(
    "overrides",
    [["model.lora.enabled=true"], ["trainer=deepspeed_zero3", "trainer.devices=8"]],
    ids=["lora", "zero3x8"],
)
def test_lora_or_zero3_over_8_fits(overrides):
    plan = plan_of(*overrides)
    assert plan.fits is True and not plan.suggestions, plan.as_dict()


def test_the_parts_follow_the_settings():
    full = plan_of()
    zero3 = plan_of("trainer=deepspeed_zero3", "trainer.devices=8")
    assert zero3.parts["optimizer"] == pytest.approx(full.parts["optimizer"] / 8)
    lora = plan_of("model.lora.enabled=true")
    assert lora.details["lora_parameters"] == 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))  # r 16, 7 matrices
    assert lora.parts["optimizer"] < 1 and lora.parts["weights"] == pytest.approx(full.parts["weights"], rel=0.02)
    qlora = plan_of("model.lora.enabled=true", "model.load_in_4bit=true")
    assert qlora.parts["weights"] < lora.parts["weights"] / 3
    frozen = plan_of("reference.strategy=frozen_copy")  # bpo_llava's reference.dtype: bfloat16
    assert frozen.parts["reference"] == pytest.approx(7_063_427_072 * 2 / 2**30)
    checkpointed = plan_of("model.gradient_checkpointing=true")
    assert checkpointed.parts["activations"] < full.parts["activations"] / 4
    longer = plan_of("data.batch_size=4")
    assert longer.parts["activations"] == pytest.approx(2 * full.parts["activations"])
    assert plan_of(memory=None).fits is None


def test_the_plan_command_is_quick_and_loads_no_weights(tmp_path):
    start = time.monotonic()
    out = run_entry("plan.py", *LLAVA, "plan.device_memory_gb=80", run_dir=tmp_path / "run", timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-2000:]
    assert time.monotonic() - start < 60  # 5 s here, imports included; the acceptance bound is 20 s
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["fits"] is False and plan["total_gb"] >= 100 and plan["suggestions"]
    assert set(plan["parts"]) >= {"weights", "gradients", "optimizer", "activations"}
    assert "does NOT fit in 80 GiB" in text and "would fit with: model.lora.enabled=true" in text


def test_training_writes_its_plan_and_stops_on_cuda_when_it_does_not_fit(tmp_path, monkeypatch):
    import torch

    from src.models.training_run import check_memory

    cfg = compose_config("train", ["plan.device_memory_gb=0.01"])
    check_memory(cfg, tmp_path)  # no CUDA here: said, not enforced
    assert json.loads((tmp_path / "plan.json").read_text())["fits"] is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SettingError, match=r"the memory plan needs .* GiB per device .* plan.check=false"):
        check_memory(cfg, tmp_path)
    check_memory(compose_config("train", ["plan.device_memory_gb=0.01", "plan.check=false"]), tmp_path)


def test_a_model_without_an_architecture_to_count_is_named():
    for name in ("org/not-cached", "/no/such/folder"):
        with pytest.raises(SettingError, match=f"the memory plan needs the architecture of {name}"):
            plan_memory(compose_config("plan", [f"model.name_or_path={name}"]), 80)


def test_a_local_checkpoint_is_counted_from_its_own_config(tmp_path, tiny):
    """A folder that will load is what the plan counts, whatever the preset's shapes say."""
    model, _ = tiny
    model.config.save_pretrained(tmp_path)
    plan = plan_memory(compose_config("plan", ["model=llava_1_5_7b", f"model.name_or_path={tmp_path}"]), 80)
    assert plan.details["parameters"] == sum(p.numel() for p in model.parameters())


def _saved_bytes(layer, rope, hidden: int, tokens: int) -> int:
    """Bytes of activations a decoder layer keeps for its backward pass under bf16 autocast (its weights' bf16
    copies left out), counted by storage."""
    import torch

    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(1, tokens, hidden, requires_grad=True)
    positions = torch.arange(tokens)[None]
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, position_embeddings=rope(x, positions), position_ids=positions)
    return sum(saved.values())


def test_the_activation_units_are_what_a_decoder_layer_keeps():
    """`ACTIVATION_UNITS` was measured at llava-1.5-7b's widths; the same units hold at another width, so they
    describe the layer, not one measurement (a quarter-width slice here: 16 M parameters)."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from src.models.memory import ACTIVATION_UNITS

    hidden, mlp = 1024, 2752
    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=8, num_key_value_heads=8)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer, rope = LlamaDecoderLayer(config, 0), LlamaRotaryEmbedding(config)
    per_token = (_saved_bytes(layer, rope, hidden, 512) - _saved_bytes(layer, rope, hidden, 256)) / 256
    planned = 2 * (ACTIVATION_UNITS["hidden"] * hidden + ACTIVATION_UNITS["mlp"] * mlp)
    assert per_token == pytest.approx(planned, rel=0.05)


@pytest.mark.parametrize(
    ("preset", "parameters", "image_tokens"),
    [("qwen2_5_vl_7b", 8_292_166_656, 16384), ("llava_onevision_7b", 8_030_807_584, 8829)],
)
def test_the_newer_families_are_counted(preset, parameters, image_tokens):
    """Qwen2.5-VL and LLaVA-OneVision from their presets' shapes: every parameter, a picture's image tokens at most,
    LoRA on their Qwen2 language model (28 layers, 3584 wide, 4 KV heads of 128: k / v project to 512)."""
    plan = plan_memory(compose_config("plan", [f"model={preset}", "data.path=train.json"]), 80)
    assert plan.details["parameters"] == parameters and plan.details["image_tokens"] == image_tokens
    assert plan.fits is False and plan.suggestions
    lora = plan_memory(
        compose_config("plan", [f"model={preset}", "data.path=train.json", "model.lora.enabled=true"]), 80
    )
    assert lora.details["lora_parameters"] == 28 * 16 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
