"""Every numeric setting is range-checked before anything loads (one line naming it, exit 2), Hydra's own errors
exit 2 as well, and a run without a validation split ends cleanly."""

from __future__ import annotations

import sys
import time

import pytest
from omegaconf import OmegaConf

from src.errors import SettingError
from src.models.training_run import check_settings, optimized_value
from src.settings import EVALUATE, TRAIN, Range, check_ranges
from tests.helpers import CONFIGS, compose_config, run_entry

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml") if not p.stem.startswith("reproduce"))
OBJECTIVES = sorted(p.stem for p in (CONFIGS / "objective").glob("*.yaml"))


@pytest.mark.parametrize("override", [f"experiment={e}" for e in EXPERIMENTS] + [f"objective={o}" for o in OBJECTIVES])
def test_every_shipped_configuration_is_in_range(override):
    check_ranges(compose_config("train", [override]), TRAIN)


@pytest.mark.parametrize("name", ["eval", "generate"])
def test_the_evaluation_configurations_are_in_range(name):
    check_ranges(compose_config(name, []), EVALUATE)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["objective.beta=-1"], "objective.beta=-1 is out of range"),
        (["objective.beta=0"], "objective.beta=0 is out of range"),
        (["objective=cdpo", "objective.label_smoothing=0.5"], "objective.label_smoothing=0.5"),
        (["objective=robust", "objective.label_smoothing=-0.1"], "objective.label_smoothing=-0.1"),
        (["objective=rpo", "objective.nll_weight=-1"], "objective.nll_weight=-1"),
        (["objective=composite", "objective.terms.nll=-0.5"], "objective.terms.nll=-0.5"),
        (["objective.blind_weight=-1"], "objective.blind_weight=-1"),
        (["optim.lr=0"], "optim.lr=0 is out of range"),
        (["optim.lr=abc"], "optim.lr='abc' is not a number"),
        (["optim.lr=nan"], "optim.lr=nan"),
        (["optim.betas=[0.9,1.5]"], "optim.betas[1]=1.5"),
        (["optim.warmup_steps=-1"], "optim.warmup_steps=-1"),
        (["trainer.max_steps=-5"], "trainer.max_steps=-5 is out of range: it must be an integer >= -1"),
        (["trainer.max_steps=2.5"], "trainer.max_steps=2.5 is not an integer"),
        (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0"),
        (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1"),
        (["data.val_fraction=1"], "data.val_fraction=1"),
        (["data.batch_size=0"], "data.batch_size=0"),
        (["data.max_length=0"], "data.max_length=0"),
        (["reference.batch_size=0"], "reference.batch_size=0"),
        (["blind.generation.temperature=0"], "blind.generation.temperature=0"),
        (["blind.generation.top_p=1.5"], "blind.generation.top_p=1.5"),
        (["model.lora.dropout=1"], "model.lora.dropout=1"),
        (["seed=-1"], "seed=-1"),
        (["seed=true"], "seed=True is not an integer"),
    ],
)
def test_a_setting_out_of_range_is_named(overrides, named):
    with pytest.raises(SettingError) as error:
        check_settings(compose_config("train", overrides))
    assert named in str(error.value)


def test_max_length_must_leave_room_for_an_answer_after_the_picture():
    # the tiny LLaVA's picture takes 16 tokens and its shortest prompt with one 35: below 35 + 4, no record fits
    with pytest.raises(SettingError, match=r"data.max_length=38 .* takes 35 tokens .* data.max_length >= 39"):
        check_settings(compose_config("train", ["data.max_length=38"]))
    check_settings(compose_config("train", ["data.max_length=39"]))


def test_range_descriptions():
    assert Range(lo=0, lo_open=True).describe() == "a number > 0"
    assert Range(lo=1, integer=True, null_ok=True).describe() == "an integer >= 1 or null"
    assert Range(lo=0, hi=0.5, hi_open=True).describe() == "a number >= 0 and < 0.5"
    assert not Range(lo=0).admits(float("inf")) and not Range(lo=0).admits(True) and Range(lo=0).admits(0)


def test_ranges_check_a_plain_mapping_too():
    check_ranges({"objective": {"beta": 0.1}}, TRAIN)
    with pytest.raises(SettingError, match=r"optim.betas\[0\]=-0.1"):
        check_ranges(OmegaConf.create({"optim": {"betas": [-0.1, 0.9]}}), TRAIN)


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("objective.beta=-1", "objective.beta=-1"),
        ("trainer.max_steps=-5", "trainer.max_steps=-5"),
        ("experiment=bpo_lava", "Could not find 'experiment/bpo_lava'"),
    ],
)
def test_a_bad_setting_exits_2_in_seconds_before_anything_loads(tmp_path, override, says):
    start = time.monotonic()
    out = run_entry("train.py", override, run_dir=tmp_path / "run", env={"OMP_NUM_THREADS": "1"}, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-2000:]
    assert says in text and "Traceback" not in text, text[-2000:]
    assert time.monotonic() - start < 60
    if override.startswith("experiment"):  # Hydra's own message: the options of the misspelled group
        assert "bpo_llava" in text
    else:
        errors = [line for line in text.splitlines() if "ERROR" in line]
        assert len(errors) == 1 and says in errors[0], text[-2000:]
    # nothing was loaded or written: no data summary, no reference cache
    assert not (tmp_path / "run" / "data_summary.json").exists()


def test_hydra_exit_1_becomes_2_only_before_the_task_starts(monkeypatch):
    import src.errors as errors

    def hydra_error() -> None:  # Hydra's own report of a composition error: exit 1 before the task
        sys.exit(1)

    def task_error() -> None:  # Hydra's report of an error inside the task: exit 1 after it started
        errors.task_started()
        sys.exit(1)

    monkeypatch.setattr(errors, "_task", {"started": False})
    with pytest.raises(SystemExit) as exit_:
        errors.run_hydra(hydra_error)
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        errors.run_hydra(task_error)
    assert exit_.value.code == 1


def test_optimized_metric_without_validation_falls_back_to_training(caplog):
    metrics = {"train/rewards/margins": 0.25, "train/loss": 0.6}
    assert optimized_value("val/rewards/margins", metrics) == 0.25
    assert "read from train/rewards/margins" in caplog.text
    assert optimized_value("val/rewards/blind_margins", metrics) is None
    assert optimized_value(None, metrics) is None
    with pytest.raises(KeyError):  # validation ran but never logged it: a real error
        optimized_value("val/rewards/margins", metrics | {"val/loss": 0.7})


def test_a_run_without_validation_ends_with_exit_0(tmp_path):
    out = run_entry(
        "train.py",
        "data.val_fraction=0",
        "trainer.max_steps=2",
        "logger=csv",
        f"paths.cache_dir={tmp_path}/cache",
        run_dir=tmp_path / "run",
        timeout=300,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert text.count("optimized_metric val/rewards/margins is read from train/rewards/margins") == 1
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_reproduce_checks_every_arms_settings_before_the_first_run(tmp_path):
    from tests.test_reproduce import run_reproduction

    overrides = ["experiment=reproduce_tiny", "arms.dpo=['experiment=dpo_tiny','optim.lr=-1e-4']"]
    with pytest.raises(SettingError, match=r"optim.lr=-0.0001 is out of range"):
        run_reproduction(tmp_path, overrides, "check_settings")


@pytest.mark.parametrize("data", ["jsonl", "hf_dataset", "spa_vl", "rlaif_v"])
def test_a_data_format_without_its_path_is_an_error_not_the_embedded_data(data):
    """A data group whose path the user must give: left out, the run stops (before: the embedded data's path stayed,
    since a ``???`` merged over a set value keeps it)."""
    cfg = compose_config("train", [f"data={data}"])
    assert cfg.data.path is None
    with pytest.raises(SettingError, match=r"data.path is not set: data.format=\w+ reads"):
        check_settings(cfg)
