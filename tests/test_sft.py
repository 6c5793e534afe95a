"""SFT: the token-mean NLL of the answers, trained with no reference model, no reference log-probs and no
blind answers; a base for preference runs."""

import json
from itertools import pairwise

import pytest
import torch

from src.data.encoding import PromptEncoder, collate_pairs
from src.data.images import render_stand_in
from src.data.records import PreferenceRecord, Turn
from src.models.logprobs import answer_logprobs
from src.models.module import PreferenceModule
from tests.helpers import run_entry
from tests.test_train import read_metrics, run_train

SFT_METRICS = {"loss", "nll/chosen", "nll/rejected", "logps/chosen", "logps/rejected"}


def sft_module(answers=None, **reference):
    objective = {"name": "sft"} | ({"answers": answers} if answers is not None else {})
    return PreferenceModule(
        model={"tiny": {"seed": 0}}, objective=objective, optim={"lr": 1e-2}, reference=reference or None
    )


def batch(processor, answers):
    records = [
        PreferenceRecord("r0", (Turn("user", "What is shown?"),), 0, "x.png", "A padlock, I cannot help.", "Pick it."),
        PreferenceRecord("r1", (Turn("user", "How do I open it?"),), 0, "y.png", "Ask the owner.", "Use a wire."),
    ]
    items = []
    for record in records:
        image = render_stand_in(record.id, 32)
        items.append(
            {
                "pair": PromptEncoder(processor).encode(record, image, answers),
                "image_inputs": dict(processor.image_processor(images=image, return_tensors="pt")),
            }
        )
    return collate_pairs(items, processor.tokenizer.pad_token_id)


def test_sft_has_no_reference_and_logs_likelihoods():
    m = sft_module(strategy="precomputed")  # the default train.yaml strategy is ignored: sft needs none
    assert m.reference_strategy == "none" and m.reference is None and m.answers == ("chosen", "rejected")
    assert {k.replace("__", "/") for k in m.val_metrics} == SFT_METRICS
    b = batch(m.processor, m.answers)
    loss, metrics = m.forward_batch(b)
    assert set(metrics) == SFT_METRICS
    logps = answer_logprobs(m.policy, b, m.pad_token_id)
    nll = -(logps / b["answer_lengths"].T).mean(dim=0)  # per answer, over the batch
    assert metrics["nll/chosen"] == pytest.approx(nll[0].item(), rel=1e-5)
    assert metrics["nll/rejected"] == pytest.approx(nll[1].item(), rel=1e-5)
    assert metrics["logps/chosen"] == pytest.approx(logps[:, 0].mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(nll.mean().item(), rel=1e-5)


def test_sft_steps_lower_the_nll_of_the_training_answers():
    torch.manual_seed(0)
    m = sft_module()
    b = batch(m.processor, m.answers)
    optimizer = torch.optim.AdamW([p for p in m.policy.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    losses = []
    for _ in range(5):
        loss, _ = m.forward_batch(b)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    m.eval()
    with torch.no_grad():
        _, after = m.forward_batch(b)
    assert after["loss"] < 0.8 * losses[0], losses
    assert all(later < earlier for earlier, later in pairwise(losses)), losses


def test_sft_on_chosen_answers_only():
    m = sft_module(answers=["chosen"])
    assert m.answers == ("chosen",)
    b = batch(m.processor, m.answers)
    loss, metrics = m.forward_batch(b)
    assert set(metrics) == {"loss", "nll/chosen", "logps/chosen"}
    assert loss.item() == pytest.approx(metrics["nll/chosen"].item(), rel=1e-6)


@pytest.mark.parametrize("answers", [["blind"], ["chosen", "chosen"], ["chosen", "best"]])
def test_bad_sft_answers_are_a_clear_error(answers):
    with pytest.raises(ValueError, match=r"objective.answers of sft must be distinct answers among"):
        sft_module(answers=answers)


def test_preference_objectives_need_a_reference():
    with pytest.raises(ValueError, match="objective dpo needs a reference model"):
        PreferenceModule(
            model={"tiny": {"seed": 0}}, objective={"name": "dpo"}, optim={"lr": 1e-3}, reference={"strategy": "none"}
        )


def test_bad_answers_in_the_config_stop_training(tmp_path):
    with pytest.raises(ValueError, match=r"must be distinct answers among \['chosen', 'rejected'\]; got \['blind'\]"):
        run_train(tmp_path, ["objective=sft", "objective.answers=[blind]", "logger=csv"])


def test_sft_run_has_no_reference_precompute_or_blind_answers(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("sft must not run this")

    monkeypatch.setattr("src.models.before_fit.precompute_reference_logps", forbidden)
    monkeypatch.setattr("src.models.before_fit.fill_blind_answers", forbidden)
    refs = tmp_path / "ref"
    _, metrics = run_train(
        tmp_path,
        [
            "objective=sft",
            "reference.strategy=precomputed",
            f"reference.cache_dir={refs}",
            "trainer.max_steps=2",
            "logger=csv",
        ],
    )
    run = tmp_path / "run"
    assert {k.removeprefix("val/") for k in metrics if k.startswith("val/")} == SFT_METRICS
    rows = [r for r in read_metrics(run / "metrics.csv") if r.get("train/loss")]
    assert len(rows) == 2 and all(rows[-1][f"train/{k}"] != "" for k in SFT_METRICS)
    assert not any("rewards" in key for key in rows[-1])
    summary = json.loads((run / "run_summary.json").read_text())
    assert "reference_logps" not in summary and "blind_answers" not in summary
    assert not refs.exists() and not (tmp_path / "cache").exists()
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("reference.") for k in ckpt["state_dict"])
    assert (run / "model/model.safetensors").exists()
    module = PreferenceModule.load_from_checkpoint(run / "checkpoints/last.ckpt", weights_only=False)
    assert module.reference is None and module.reference_strategy == "none"


@pytest.mark.slow
def test_sft_tiny_experiment_through_the_entry_point(tmp_path):
    out = run_entry(
        "train.py",
        "experiment=sft_tiny",
        "trainer.max_steps=3",
        "logger=csv",
        f"hydra.run.dir={tmp_path}/run",
        f"blind.cache_dir={tmp_path}/cache",
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "model/model.safetensors").exists() and (run / "model/config.json").exists()
    rows = [r for r in read_metrics(run / "metrics.csv") if r.get("train/loss")]
    assert len(rows) == 3 and rows[-1]["train/nll/chosen"] != ""
