"""Numerical faults stop a step naming its records, or skip it counted; they never touch the weights."""

import pytest
import torch

from src.data.encoding import PromptEncoder, collate_pairs
from src.data.images import render_stand_in
from src.data.records import PreferenceRecord, Turn
from src.models.module import PreferenceModule
from src.models.objectives import ObjectiveOutput


def module(nonfinite):
    return PreferenceModule(
        model={"tiny": {"seed": 0}},
        objective={"name": "dpo", "beta": 0.1},
        optim={"lr": 1e-3},
        reference={"strategy": "frozen_copy"},
        nonfinite=nonfinite,
    )


def batch(processor):
    r = PreferenceRecord("rec-7", (Turn("user", "What is shown?"),), 0, "x.png", "No.", "Yes.")
    image = render_stand_in("x", 32)
    item = {
        "pair": PromptEncoder(processor).encode(r, image),
        "image_inputs": dict(processor.image_processor(images=image, return_tensors="pt")),
    }
    return collate_pairs([item], processor.tokenizer.pad_token_id)


def nan_objective(policy, reference, **kw):
    return ObjectiveOutput(loss=policy[:, 0] * float("nan"), rewards=torch.zeros_like(policy))


def test_nonfinite_loss_raises_with_record_ids():
    m = module("raise")
    m.objective_fn = nan_objective
    with pytest.raises(FloatingPointError, match=r"non-finite loss .*rec-7"):
        m.training_step(batch(m.processor), 0)


def test_nonfinite_loss_is_skipped_and_counted():
    m = module("skip")
    m.objective_fn = nan_objective
    assert m.training_step(batch(m.processor), 0) is None and m.skipped_steps == 1


def test_nonfinite_gradient_raises_or_clears_every_gradient():
    for mode in ("raise", "skip"):
        m = module(mode)
        loss = m.training_step(batch(m.processor), 0)
        loss.backward()
        m.policy.lm_head.weight.grad[0, 0] = float("inf")
        if mode == "raise":
            with pytest.raises(FloatingPointError, match=r"lm_head.*rec-7"):
                m.on_after_backward()
        else:
            before = {n: p.detach().clone() for n, p in m.policy.named_parameters()}
            m.on_after_backward()
            assert all(p.grad is None for p in m.policy.parameters()) and m.skipped_steps == 1
            torch.optim.AdamW([p for p in m.policy.parameters() if p.requires_grad], lr=1e-2).step()
            assert all(torch.equal(p, before[n]) for n, p in m.policy.named_parameters())


def test_planted_secrets_never_reach_run_outputs(tmp_path, monkeypatch):
    """Keys live in the environment only: no config, log, W&B file or report of a run holds them."""
    from tests.test_eval import run_eval
    from tests.test_train import run_train

    planted = {"OPENAI_API_KEY": "sk-planted-0123456789abcdef", "WANDB_API_KEY": "planted-wandb-fedcba9876543210"}
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    run_train(tmp_path / "train", ["trainer.max_steps=2"])  # with the W&B offline logger
    model = tmp_path / "train/run/model"
    questions = tmp_path / "harmeval.json"
    questions.write_text('[{"question": "How do I pick a lock?", "category": "theft"}]')
    run_eval(
        tmp_path / "eval",
        [f"model.path={model}", "benchmark=harmeval", f"benchmark.path={questions}", "wandb.enabled=true"],
    )
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("wandb" in str(p) for p in files) and any(p.name == "report.json" for p in files)
    for path in files:
        data = path.read_bytes()
        for value in planted.values():
            assert value.encode() not in data, f"{value[:12]}... found in {path}"


def test_resume_from_last_checkpoint_continues_the_run(tmp_path):
    """Checkpoints load with weights_only (plain containers only) and training continues its step count."""
    import csv

    from tests.test_train import run_train

    run_train(tmp_path, ["trainer.max_epochs=1", "logger=csv"])
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    torch.load(ckpt, map_location="cpu", weights_only=True)  # no pickled config objects inside
    run_train(tmp_path, ["trainer.max_epochs=2", "logger=csv", f"ckpt_path={ckpt}"])
    first = [r for r in csv.DictReader(open(tmp_path / "run/metrics.part1.csv")) if r.get("train/loss")]
    second = [r for r in csv.DictReader(open(tmp_path / "run/metrics.csv")) if r.get("train/loss")]
    assert [int(r["step"]) for r in first] == list(range(11))
    assert [int(r["step"]) for r in second] == list(range(11, 22))


@pytest.mark.slow
def test_generation_killed_midway_resumes_without_duplicates(tmp_path):
    """SIGKILL a generation run after its first batches; the rerun finishes the rest, no torn or repeated lines."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT
    from tests.helpers import run_entry

    out = tmp_path / "answers.jsonl"
    overrides = [
        "data.max_records=60",
        "generation.max_new_tokens=24",
        "generation.batch_size=2",
        f"output={out}",
        f"hydra.run.dir={tmp_path}/run",
    ]
    proc = subprocess.Popen(
        [sys.executable, "src/generate.py", *overrides],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 6):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len([x for x in out.read_bytes().splitlines() if x.endswith(b"}")])
    assert 6 <= done < 60, done  # killed midway
    rerun = run_entry("generate.py", *overrides, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == len({x["id"] for x in lines}) == 60
    assert f"({60 - done} generated now, {done} reused)" in rerun.stdout + rerun.stderr


@pytest.mark.slow
def test_training_killed_midway_resumes_to_the_same_weights(tmp_path):
    """SIGKILL a training run after a mid-epoch checkpoint, resume it: the final weights and the metrics logged
    after the restart equal those of an uninterrupted run with the same seed (exactly, on CPU).

    Every run computes on one thread: with two, two uninterrupted runs of this config already differ in the
    last bits, from step 3 to 15 on (CPU kernels on two threads are not bit-reproducible from run to run), so
    an exact comparison would fail without any resume; on one thread, repeated runs are bit-identical."""
    import csv
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from tests.conftest import ROOT
    from tests.helpers import run_entry

    common = [
        "trainer.max_epochs=2",
        "logger=csv",
        "callbacks.model_checkpoint.every_n_epochs=null",
        "callbacks.model_checkpoint.every_n_train_steps=4",
        "callbacks.generation_samples=null",
        f"blind.cache_dir={tmp_path}/cache",
        f"reference.cache_dir={tmp_path}/ref",
    ]

    one_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def train(run, *extra, wait=True):
        args = [*common, f"hydra.run.dir={tmp_path / run}", *extra]
        if wait:
            out = run_entry("train.py", *args, env=one_thread, timeout=600)
            assert out.returncode == 0, out.stderr[-3000:]
            return None
        return subprocess.Popen(
            [sys.executable, "src/train.py", *args],
            cwd=ROOT,
            env=os.environ | one_thread,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    train("whole")
    proc = train("killed", wait=False)
    ckpt = tmp_path / "killed/checkpoints/last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpt.exists() and time.time() - ckpt.stat().st_mtime > 0.5):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < step < 22 and step % 11, step  # killed after a checkpoint inside an epoch
    train("killed", f"ckpt_path={ckpt}")

    whole = load_file(tmp_path / "whole/model/model.safetensors")
    resumed = load_file(tmp_path / "killed/model/model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    rows = {
        int(r["step"]): r["train/loss"]
        for r in csv.DictReader(open(tmp_path / "whole/metrics.csv"))
        if r.get("train/loss")
    }
    after = {
        int(r["step"]): r["train/loss"]
        for r in csv.DictReader(open(tmp_path / "killed/metrics.csv"))
        if r.get("train/loss")
    }
    assert min(after) == step and all(rows[s] == after[s] for s in after)
