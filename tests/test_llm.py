"""The local language model shared by the Llama Guard judge and the model rephraser, and the device choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from src.databuilder.base import BuildError, Entity, RephraseItem
from src.databuilder.rephrase import ModelRephraser
from src.errors import SettingError
from src.evaluation.judge_llm import LlamaGuardJudge
from src.evaluation.judges import JudgeInput
from src.llm.local_lm import LocalLM
from src.models.device import choose_device, torch_dtype

PROMPTS = ["Where is the place in the image?", "Who runs the company shown in the image, and since when?", "Hi"]


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A tiny random Llama causal LM whose tokenizer has no pad token (as many causal LMs ship)."""
    from src.models.tiny import build_tokenizer
    from tests.helpers import save_tiny_causal_lm

    tok = build_tokenizer(vocab_size=512)
    tok.pad_token = None
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm"), tok)


def test_choose_device():
    assert choose_device("cpu") == (torch.device("cpu"), torch.float32)
    assert choose_device("cuda:1") == (torch.device("cuda:1"), torch.bfloat16)  # choosing touches no GPU
    assert choose_device("cuda", "float16") == (torch.device("cuda"), torch.float16)
    assert choose_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="int8"):
        choose_device("cpu", "int8")
    with pytest.raises(ValueError, match="auto"):
        torch_dtype("auto")  # a model's own dtype setting has no "auto"


def test_choose_device_auto(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device() == (torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device() == (torch.device("cpu"), torch.float32)


def test_local_lm_loads_on_first_use_and_continues_each_prompt_as_alone(tiny_lm_dir):
    lm = LocalLM(str(tiny_lm_dir), "x.path", device="cpu")
    assert lm.model is None  # constructing costs nothing
    batched = lm.generate(PROMPTS, batch_size=3, max_new_tokens=5, add_special_tokens=True)
    assert lm.model.dtype == torch.float32 and lm.model.device.type == "cpu" and lm.processor is None
    # no pad token in the checkpoint: EOS pads, on the left, so padding never sits between prompt and answer
    assert lm.tokenizer.pad_token_id == lm.tokenizer.eos_token_id and lm.tokenizer.padding_side == "left"
    assert len(batched) == 3 and all(isinstance(t, str) for t in batched)
    assert lm.generate(PROMPTS, batch_size=1, max_new_tokens=5, add_special_tokens=True) == batched
    # only the new text comes back, not the prompt
    ids = lm.tokenizer(PROMPTS[:1], return_tensors="pt")
    out = lm.model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    assert batched[0] == lm.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_local_lm_missing_model_is_a_setting_error_naming_the_key(tmp_path):
    lm = LocalLM(str(tmp_path / "no-model"), "judge.model_name_or_path", device="cpu")
    with pytest.raises(SettingError, match=r"no such folder or checkpoint \(judge.model_name_or_path\)"):
        lm.load()
    judge = LlamaGuardJudge(str(tmp_path / "no-model"), device="cpu")
    with pytest.raises(SettingError, match="judge.model_name_or_path"):
        judge.judge([JudgeInput(prompt="Hi", answer="Hello!")])


def test_rephraser_with_a_missing_model_folder_is_one_build_error(tmp_path):
    """The data builder reports a `BuildError` as one line (exit 2): it must say which setting and why."""
    rephraser = ModelRephraser(path=str(tmp_path / "no-model"), device="cpu")
    text, mid = "Where does Rand Paul live?", "Where does the person featured in the image live?"
    item = RephraseItem(text, Entity("Rand Paul", "PER", 11, 20), mid, "the person featured in the image")
    with pytest.raises(BuildError, match=r"rephrase.path=.*no-model.*no such folder or checkpoint \(rephrase.path\)"):
        rephraser([item])
