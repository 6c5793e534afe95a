"""LoRA: one copy of the weights, the reference as adapters-disabled, adapter + merged outputs."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from src.data.encoding import PromptEncoder, collate_pairs
from src.data.images import render_stand_in
from src.data.records import PreferenceRecord, Turn
from src.models.factory import build_model
from src.models.logprobs import answer_logprobs
from src.models.lora import adapters_disabled, is_peft
from src.models.tiny import build_tiny_llava
from tests.test_train import run_train

LORA = ["model.lora.enabled=true", "model.lora.r=4", "logger=csv"]


def small_batch(processor, keys=("chosen", "rejected"), n=1):
    """``n`` records of unequal lengths (n > 1: the packed layout's one row holds several records)."""
    items = []
    for i in range(n):
        rid = f"r{i}"
        turns = (Turn("user", "What is shown?" + " And why?" * i),)
        record = PreferenceRecord(rid, turns, 0, f"{rid}.png", "I can't help.", "Sure, here." * (i + 1), "Hm.")
        image = render_stand_in(rid, 32)
        items.append(
            {
                "pair": PromptEncoder(processor).encode(record, image, keys),
                "image_inputs": dict(processor.image_processor(images=image, return_tensors="pt")),
            }
        )
    return collate_pairs(items, processor.tokenizer.pad_token_id)


def test_lora_training_keeps_one_copy_and_scores_reference_with_adapters_off(tmp_path):
    from src.models.module import PreferenceModule

    cfg, _ = run_train(
        tmp_path,
        [*LORA, "trainer.max_steps=5", "reference.strategy=frozen_copy", "optim.lr=1e-2", "optim.warmup_steps=0"],
    )
    module = PreferenceModule.load_from_checkpoint(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)
    assert is_peft(module.policy) and module.reference is None
    assert module.reference_strategy == "adapters_disabled"
    base, processor = build_tiny_llava(seed=0)
    assert sum(p.numel() for p in module.parameters()) < 1.2 * sum(p.numel() for p in base.parameters())

    batch = small_batch(processor)
    module.eval()
    with torch.no_grad():
        trained = answer_logprobs(module.policy, batch, processor.tokenizer.pad_token_id)
        with adapters_disabled(module.policy):
            reference = answer_logprobs(module.policy, batch, processor.tokenizer.pad_token_id)
        initial = answer_logprobs(base.eval(), batch, processor.tokenizer.pad_token_id)
    assert not torch.allclose(trained, initial, atol=1e-3)  # the adapters learned something
    assert torch.allclose(reference, initial, atol=1e-5)  # and switching them off gives the initial model

    # the module's own reference path is the adapters-disabled one
    calls = []
    original = module.policy.disable_adapter

    def spy():
        calls.append(1)
        return original()

    module.policy.disable_adapter = spy
    module.forward_batch(small_batch(processor, ("chosen", "rejected", "blind")))
    assert calls == [1]


def test_adapter_and_merged_model_reload_to_the_same_outputs(tmp_path):
    from peft import PeftModel

    run_train(tmp_path, [*LORA, "trainer.max_steps=3", "optim.lr=1e-2", "optim.warmup_steps=0"])
    run = tmp_path / "run"
    assert json.loads((run / "adapter/adapter_config.json").read_text())["r"] == 4
    merged = AutoModelForImageTextToText.from_pretrained(run / "model").eval()
    base, processor = build_tiny_llava(seed=0)
    adapted = PeftModel.from_pretrained(base, run / "adapter").eval()
    batch = small_batch(processor)
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        a, b = answer_logprobs(merged, batch, pad), answer_logprobs(adapted, batch, pad)
        c = answer_logprobs(build_tiny_llava(seed=0)[0].eval(), batch, pad)
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, c, atol=1e-3)


def test_starting_from_an_adapter_makes_it_the_reference(tmp_path):
    from peft import LoraConfig, get_peft_model

    base, processor = build_tiny_llava(seed=0)
    base.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    batch = small_batch(processor)
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        adapted = answer_logprobs(peft.eval(), batch, pad)

    model, _ = build_model(
        name_or_path=str(tmp_path / "adapter"), lora={"enabled": True, "r": 4, "base": str(tmp_path / "base")}
    )
    model.eval()
    with torch.no_grad(), adapters_disabled(model):
        reference = answer_logprobs(model, batch, pad)
    assert torch.allclose(reference, adapted, atol=1e-5)  # the trained adapter, not the bare base


def test_gradient_checkpointing_recomputes_activations():
    counts = {}
    for flag in (False, True):
        model, processor = build_model(tiny={"seed": 0}, gradient_checkpointing=flag)
        model.train()
        # a submodule inside the checkpointed layer: its forward runs again when the backward recomputes
        attn = model.model.language_model.layers[0].self_attn
        calls = []
        handle = attn.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        answer_logprobs(model, small_batch(processor), processor.tokenizer.pad_token_id).sum().backward()
        handle.remove()
        counts[flag] = len(calls)
    assert counts == {False: 1, True: 2}  # the layer runs again in the backward pass


def test_selective_checkpointing_reruns_only_cheap_ops_and_keeps_gradients():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.counts[name] = self.counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    ops, grads = {}, {}
    for mode in (False, "selective", "full"):
        model, processor = build_model(tiny={"seed": 0}, gradient_checkpointing=mode)
        model.train()
        batch = small_batch(processor, n=2)  # recomputed layers see the packed records again
        with CountOps() as counter:
            answer_logprobs(model, batch, processor.tokenizer.pad_token_id).sum().backward()
        ops[mode] = counter.counts
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    matmuls = {mode: c.get("mm", 0) + c.get("addmm", 0) for mode, c in ops.items()}
    assert matmuls["selective"] == matmuls[False] < matmuls["full"]  # no matrix product runs twice
    assert ops["selective"]["mul"] > ops[False]["mul"]  # element-wise work is recomputed
    for mode in ("selective", "full"):
        assert grads[mode].keys() == grads[False].keys()
        for name, g in grads[False].items():
            torch.testing.assert_close(grads[mode][name], g, rtol=1e-5, atol=1e-6, msg=f"{mode}: {name}")
    with pytest.raises(ValueError, match="gradient_checkpointing must be one of"):
        build_model(tiny={"seed": 0}, gradient_checkpointing="some")


def test_the_merged_checkpoint_is_merge_and_unloads_without_a_copy_of_the_model(tmp_path, monkeypatch):
    """The merged model is built module by module on the CPU: a deep copy of the whole model (on a GPU, a spike of
    the model's size at the end of training) is never made, and the saved weights are exactly what PEFT's own
    merge gives, the trained projector included."""
    import copy

    from src.models.factory import build_model
    from src.models.lora import merged_state_dict, save_adapter_and_merged

    model, processor = build_model(tiny={"seed": 0}, lora={"enabled": True, "r": 4})
    with torch.no_grad():  # trained-looking adapters and projector, so the merge is not the identity
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    deepcopy = copy.deepcopy

    def no_model_copies(obj, *args, **kwargs):
        if isinstance(obj, torch.nn.Module):
            pytest.fail("the model was copied to merge it")
        return deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", no_model_copies)
    state = merged_state_dict(model)
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.allclose(state[key], value, atol=1e-6), key
    save_adapter_and_merged(model, processor, tmp_path / "adapter", tmp_path / "model")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the policy is left as it was
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "model")
    for key, value in reloaded.state_dict().items():
        assert torch.allclose(value, expected[key], atol=1e-6), key
