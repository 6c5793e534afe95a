import csv
import json
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import compose_config, run_entry


def run_train(tmp_path, overrides):
    from src.train import train

    cfg = compose_config("train", [f"blind.cache_dir={tmp_path}/cache", *overrides], tmp_path / "run")
    return cfg, train(cfg)


def read_metrics(path):
    return list(csv.DictReader(open(path)))


def test_bpo_few_steps_writes_run_outputs_and_model_reloads(tmp_path):
    cfg, metrics = run_train(tmp_path, ["trainer.max_steps=4", "trainer.max_epochs=1"])
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "metrics.csv",
        "checkpoints/last.ckpt",
        "model/config.json",
        "model/model.safetensors",
        "run_summary.json",
    ):
        assert (run / name).exists(), name
    assert list((run / "wandb").glob("offline-run-*")), "W&B should log offline into the run directory"
    assert OmegaConf.load(run / "config.yaml").logger.wandb.group == ""  # a single run: no sweep to group by
    rows = read_metrics(run / "metrics.csv")
    steps = [r for r in rows if r.get("train/loss")]
    assert len(steps) == 4
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "rewards/blind",
        "rewards/blind_margins",
        "rewards/blind_accuracies",
        "logps/blind",
    ):
        assert steps[-1][f"train/{key}"] != "", key
        assert f"val/{key}" in metrics, key
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["blind_answers"]["generated"] == 96 and summary["data"]["records_read"] == 96
    assert summary["environment"]["packages"]["transformers"] and summary["environment"]["cpu"]["logical_cores"]

    # the checkpoint holds the policy only; the reference is rebuilt from the initial model
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("reference.") for k in ckpt["state_dict"])
    assert ckpt["global_step"] == 4

    # model/ loads with the Auto classes, no network, and generates
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from src.data.images import render_stand_in

    model = AutoModelForImageTextToText.from_pretrained(run / "model")
    processor = AutoProcessor.from_pretrained(run / "model")
    saved = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("policy.")}
    assert torch.equal(model.lm_head.weight, saved["policy.lm_head.weight"])
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = processor(text=text, images=render_stand_in("a padlock", 32), return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]

    # a second run reuses the blind answers
    _, _ = run_train(tmp_path, ["trainer.max_steps=1", "logger=csv"])
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["blind_answers"]["generated"] == 0 and summary["blind_answers"]["from_cache"] == 96


def test_the_trained_model_evaluates_on_the_records_held_out_from_its_training(tmp_path):
    """The run writes its validation ids and the eval command for them; that command works offline and evaluates
    exactly the held-out records, none of the trained ones."""
    import shlex

    from src.data.datamodule import grouped_split
    from src.data.readers import read_records
    from src.eval import evaluate

    cfg, _ = run_train(tmp_path, ["experiment=dpo_tiny", "trainer.max_steps=1", "logger=csv", "~callbacks"])
    heldout = json.loads((tmp_path / "run" / "run_summary.json").read_text())["heldout"]
    ids = (tmp_path / "run" / "heldout_ids.txt").read_text().split()
    train, val = grouped_split(read_records(cfg.data.path, "auto"), cfg.data.val_fraction, cfg.data.split_seed)
    assert ids == [r.id for r in val] and heldout["records"] == len(val) == 12
    assert not set(ids) & {r.id for r in train}
    command = shlex.split(heldout["eval_command"])
    assert command[:2] == ["python", "src/eval.py"]
    overrides = [*command[2:], "generation.max_new_tokens=4", f"cache_dir={tmp_path}/gen", "wandb.enabled=false"]
    report = evaluate(compose_config("eval", overrides, tmp_path / "eval"))
    assert report["n"] == 12 and report["model"]["path"] == str(tmp_path / "run" / "model")
    lines = [json.loads(x) for x in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert sorted(x["id"] for x in lines) == sorted(ids)


def test_a_run_that_fails_is_marked(tmp_path):
    out = run_entry("train.py", "objective.beta=-1", run_dir=tmp_path / "run", timeout=120)
    assert out.returncode == 2
    assert (tmp_path / "run" / "FAILED").read_text().startswith("this run did not finish: exit code 2")
    assert not (tmp_path / "run" / "run_summary.json").exists()


def test_dpo_uses_two_answers_and_no_blind_generation(tmp_path):
    cfg, metrics = run_train(tmp_path, ["experiment=dpo_tiny", "trainer.max_steps=2", "logger=csv"])
    assert cfg.objective.name == "dpo"
    assert "val/rewards/blind" not in metrics and "val/rewards/accuracies" in metrics
    assert not (tmp_path / "cache").exists()


def test_resume_from_checkpoint_keeps_reference(tmp_path):
    from src.models.module import PreferenceModule

    cfg, _ = run_train(tmp_path, ["trainer.max_steps=3", "logger=csv", "reference.strategy=frozen_copy"])
    container = OmegaConf.to_container(cfg, resolve=True)
    module = PreferenceModule.load_from_checkpoint(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)
    fresh = PreferenceModule(model=container["model"], objective=container["objective"], optim=container["optim"])
    for (name, ref), (_, init) in zip(
        module.reference.named_parameters(), fresh.policy.named_parameters(), strict=True
    ):
        assert torch.equal(ref, init), name
    assert not torch.equal(module.policy.lm_head.weight, fresh.policy.lm_head.weight)


@pytest.mark.parametrize("experiment", ["bpo_llava", "dpo_llava"])
def test_llava_experiments_carry_the_paper_settings(experiment):
    cfg = compose_config("train", [f"experiment={experiment}"])
    assert cfg.model.name_or_path == "llava-hf/llava-1.5-7b-hf"
    assert cfg.objective.name == experiment[:3] and cfg.objective.beta == 0.1
    assert cfg.optim.lr == 1e-6 and cfg.optim.warmup_steps == 10 and cfg.optim.schedule == "cosine"
    assert cfg.trainer.max_epochs == 1 and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.data.max_length == 768
    assert cfg.model.train_vision_tower is False and cfg.model.train_projector is True
    assert cfg.model.trust_remote_code is False


def test_cfg_job_prints_llava_config():
    out = run_entry("train.py", "experiment=bpo_llava", "--cfg", "job", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "llava-hf/llava-1.5-7b-hf" in out.stdout and "lr: 1.0e-06" in out.stdout


@pytest.mark.slow
def test_default_training_run_learns_the_preferences(tmp_path):
    """`make train`'s run: the last logged train/rewards/accuracies exceeds 0.9."""
    out = run_entry("train.py", f"hydra.run.dir={tmp_path}/run", f"blind.cache_dir={tmp_path}/cache", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [r for r in read_metrics(tmp_path / "run/metrics.csv") if r.get("train/rewards/accuracies")]
    assert float(rows[-1]["train/rewards/accuracies"]) > 0.9
    assert (tmp_path / "run/model/model.safetensors").exists()


@pytest.mark.slow
def test_multirun_sweeps_beta_one_wandb_run_per_job(tmp_path):
    out = run_entry(
        "train.py",
        "-m",
        "objective.beta=0.05,0.1",
        "trainer.max_steps=3",
        f"hydra.sweep.dir={tmp_path}/sweep",
        f"blind.cache_dir={tmp_path}/cache",
        f"reference.cache_dir={tmp_path}/ref",
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # the second job reuses the first one's blind answers and reference log-probs: beta changes neither
    first, second = (json.loads((tmp_path / f"sweep/{job}/run_summary.json").read_text()) for job in (0, 1))
    assert first["blind_answers"]["generated"] == 96 and first["reference_logps"]["computed"] == 96
    assert second["blind_answers"]["generated"] == 0 and second["blind_answers"]["from_cache"] == 96
    assert second["reference_logps"]["computed"] == 0 and second["reference_logps"]["reused"] == 96
    run_ids = []
    for job, beta in ((0, 0.05), (1, 0.1)):
        cfg = OmegaConf.load(tmp_path / f"sweep/{job}/config.yaml")
        assert cfg.objective.beta == beta
        assert (tmp_path / f"sweep/{job}/model/model.safetensors").exists()
        # each job its own W&B run in its own folder, grouped by the sweep folder
        (run_dir,) = (tmp_path / f"sweep/{job}/wandb").glob("offline-run-*")
        run_id = run_dir.name.rsplit("-", 1)[1]
        run_ids.append(run_id)
        assert cfg.logger.wandb.group == str(tmp_path / "sweep")
        assert str(tmp_path / "sweep").encode() in (run_dir / f"run-{run_id}.wandb").read_bytes()
    assert run_ids[0] != run_ids[1]
    assert "already in progress" not in out.stdout + out.stderr


@pytest.mark.slow
def test_train_on_shared_mmsafe_po_reads_all_records(tmp_path, mmsafe_path):
    out = run_entry(
        "train.py",
        "data=mmsafe_po",
        f"data.path={mmsafe_path}",
        "data.missing_images=render",
        "trainer.max_steps=5",
        "logger=csv",
        f"hydra.run.dir={tmp_path}/run",
        f"blind.cache_dir={tmp_path}/cache",
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run/run_summary.json").read_text())
    data = summary["data"]
    assert data["records_read"] == 200
    assert data["train"]["encoded"] + data["train"]["skipped"] + data["val"]["encoded"] + data["val"]["skipped"] == 200
    assert data["records_read"] == data["usable"] + data["skipped"] and data["rejected_records"] == 0
    assert data["stand_in_images"] == data["usable"]  # every usable record, none of the skipped ones


def test_precomputed_reference_trains_like_a_frozen_copy(tmp_path):
    """Same seed, same data: precomputed reference log-probs and a live frozen copy give the same run."""
    common = ["trainer.max_steps=4", "logger=csv", f"reference.cache_dir={tmp_path}/ref"]
    runs = {}
    for strategy in ("precomputed", "frozen_copy", "precomputed"):
        _, metrics = run_train(tmp_path / strategy, [*common, f"reference.strategy={strategy}"])
        rows = [r for r in read_metrics(tmp_path / strategy / "run/metrics.csv") if r.get("train/loss")]
        runs.setdefault(strategy, []).append(([float(r["train/loss"]) for r in rows], metrics))
    (pre_losses, pre), (again_losses, _) = runs["precomputed"]
    ((copy_losses, copy),) = runs["frozen_copy"]
    assert pre_losses == pytest.approx(copy_losses, abs=1e-5)
    assert pre["val/rewards/margins"] == pytest.approx(copy["val/rewards/margins"], abs=1e-5)
    assert again_losses == pytest.approx(pre_losses, abs=1e-6)
    summary = json.loads((tmp_path / "precomputed/run/run_summary.json").read_text())
    assert summary["reference_logps"]["computed"] == 0 and summary["reference_logps"]["reused"] == 96
    ckpt = torch.load(tmp_path / "precomputed/run/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("reference.") for k in ckpt["state_dict"])


@pytest.mark.slow
def test_packed_and_padded_runs_follow_the_same_curve(tmp_path):
    """On the embedded data the two layouts train to the same figures (same seed, 3 epochs)."""
    finals = {}
    for layout in ("packed", "padded"):
        _, metrics = run_train(tmp_path / layout, ["trainer.max_epochs=3", "logger=csv", f"layout={layout}"])
        rows = [r for r in read_metrics(tmp_path / layout / "run/metrics.csv") if r.get("train/loss")]
        finals[layout] = ([float(r["train/loss"]) for r in rows], metrics)
    (packed_losses, packed), (padded_losses, padded) = finals["packed"], finals["padded"]
    assert len(packed_losses) == len(padded_losses) == 33
    assert packed_losses == pytest.approx(padded_losses, abs=1e-3)
    for key in ("val/rewards/accuracies", "val/rewards/blind_accuracies", "val/loss"):
        assert packed[key] == pytest.approx(padded[key], abs=1e-3), key


@pytest.mark.slow
def test_a_shared_reference_cache_recomputes_for_other_images_and_precision(tmp_path):
    """Same records, one cache folder: other pixels or another precision are computed, never reused."""
    common = ["trainer.max_steps=1", "logger=csv", f"reference.cache_dir={tmp_path}/ref"]
    runs = {
        "first": [],
        "again": [],
        "pixels": ["data.stand_in_size=16"],  # the stand-ins drawn at another size: other pixel inputs
        "bf16": ["trainer.precision=bf16-mixed"],
    }
    counts = {}
    for name, overrides in runs.items():
        run_train(tmp_path / name, [*common, *overrides])
        summary = json.loads((tmp_path / name / "run/run_summary.json").read_text())
        counts[name] = (summary["reference_logps"]["computed"], summary["reference_logps"]["reused"])
    assert counts == {"first": (96, 0), "again": (0, 96), "pixels": (96, 0), "bf16": (96, 0)}


def test_train_tokens_counts_the_prompt_once_and_each_answer_across_a_resume():
    """`train/tokens`: the prompt + answer tokens trained so far (padding excluded), kept in the checkpoint."""
    from tests.test_faults import batch, module

    m = module("raise")
    logged = []
    m.log = lambda name, value, **kw: logged.append(value) if name == "train/tokens" else None
    m._trainer = SimpleNamespace()  # logs only under a Trainer (a bare loop counts without logging)
    b = batch(m.processor)
    n = int(b["prompt_lengths"].sum() + b["answer_lengths"].sum())
    assert b["prompt_ids"].shape == (1, int(b["prompt_lengths"][0]))  # one record: no padding in the prompt
    m.training_step(b, 0)
    m.training_step(b, 1)
    assert logged == [n, 2 * n]
    checkpoint = {"state_dict": {}}
    m.on_save_checkpoint(checkpoint)
    resumed = module("raise")
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.tokens_trained == 2 * n
    resumed.training_step(b, 2)  # no Trainer: counted, not logged
    assert resumed.tokens_trained == 3 * n and logged == [n, 2 * n]
