"""The comparison on the grounded-safety world (experiment=reproduce_world): the world's files feed every run and
every evaluation, and the world's figures reach comparison.json / .md / .png."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from src.data.prompt_format import PromptFormat
from src.data.readers import read_records
from src.evaluation.reproduction import markdown, plot, summarize, table
from src.models.objectives import data_needs
from src.reproduce import ReproduceError, Reproduction
from src.world.metrics import NAMES
from src.world.world import World, WorldSettings
from tests.test_prompt_format import reproduction as compose_reproduction

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SMALL = ["experiment=reproduce_world", "world.seed=3", "world.train_size=24", "world.heldout_size=6"]


def reproduction(tmp_path: Path, overrides: list[str]) -> Reproduction:
    """A Reproduction composed as `python src/reproduce.py ...` would, its output folder made."""
    rep = compose_reproduction(tmp_path, overrides)
    (tmp_path / "out").mkdir(parents=True, exist_ok=True)
    return rep


def test_world_split_writes_the_world_that_every_run_trains_on(tmp_path):
    rep = reproduction(tmp_path, SMALL)
    ids_file, settings = rep.split()
    folder = tmp_path / "out" / "world"
    assert ids_file is None  # all of train.jsonl trains
    assert settings == OmegaConf.to_container(rep.cfg.world) and settings["seed"] == 3
    expected = World(WorldSettings(seed=3, train_size=24, heldout_size=6))
    assert [r.id for r in read_records(folder / "train.jsonl", "jsonl")] == [r.id for r in expected.train_records()]
    assert rep.world.heldout_ids == {r.id for r in expected.heldout_records()}
    assert json.loads((folder / "world.json").read_text())["settings"] == settings
    for extra in (rep.cfg.base.overrides, *rep.cfg.arms.values()):  # each run's experiment names other data
        data = rep.train_config(list(extra), tmp_path / "run", 0, None).data
        assert (data.path, data.format, data.stand_in_size) == (str(folder / "train.jsonl"), "jsonl", None)
    assert rep.data_settings["path"] == str(folder / "train.jsonl")
    # the pictures' size, when set, is the runs' too
    sized = reproduction(tmp_path / "sized", [*SMALL, "world.image_size=48"])
    assert sized.train_config(list(sized.cfg.arms.dpo), tmp_path / "run", 0, None).data.stand_in_size == 48


def test_a_folder_holding_another_world_is_refused(tmp_path):
    reproduction(tmp_path, SMALL).split()
    with pytest.raises(ReproduceError, match=r"out/world holds a world of other settings"):
        reproduction(tmp_path, [*SMALL, "world.cue_rate=0.5"]).split()
    reproduction(tmp_path, SMALL).split()  # the same world again: fine


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["judge_name=keyword"], "judged by its exact judge: judge_name=world, not keyword"),
        (["heldout.eval_path=x.jsonl"], "world and heldout.eval_path are both set"),
        (["world.colours=9"], r"world.colours=9 must be 2..6"),
    ],
)
def test_world_settings_that_cannot_work_fail_before_any_run(tmp_path, extra, message):
    with pytest.raises(ReproduceError, match=message):
        reproduction(tmp_path, [*SMALL, *extra]).run()
    assert not (tmp_path / "out" / "runs").exists()


def test_every_evaluation_gets_every_world_setting_and_asks_the_written_items(tmp_path, monkeypatch):
    import src.eval

    seen = []

    def fake_evaluate(cfg):  # answers the items the composed world settings make, as the world benchmark would
        seen.append(cfg)
        held = World(WorldSettings.from_config(OmegaConf.to_container(cfg.world))).heldout_records()
        out = Path(cfg.paths.output_dir)
        lines = [json.dumps({"id": f"{r.id}/{s}", "answer": ""}) for r in held for s in ("image", "blank")]
        (out / "generations.jsonl").write_text("\n".join(lines) + "\n")
        (out / "report.json").write_text(json.dumps({"grounded_accuracy": 0.5}))
        return {"grounded_accuracy": 0.5}

    monkeypatch.setattr(src.eval, "evaluate", fake_evaluate)
    world = [*SMALL, "world.hazard_rule=xor", "world.cue_rate=0.6", "world.image_size=40", "world.phrasings=8"]
    rep = reproduction(tmp_path, [*world, "wandb.enabled=false"])
    rep.format = PromptFormat()
    _, settings = rep.split()
    assert rep.evaluate("dpo", 0, "runs/dpo/model", "base", settings) == {"grounded_accuracy": 0.5}
    cfg = seen[0]
    assert OmegaConf.to_container(cfg.world) == settings  # every setting, not only the ones given here
    assert settings["hazard_rule"] == "xor" and settings["image_size"] == 40 and settings["phrasings"] == 8
    assert cfg.benchmark._target_.endswith("WorldBenchmark") and cfg.judge.name == "world"
    assert rep.evaluate("dpo", 0, "runs/dpo/model", "base", settings) == {"grounded_accuracy": 0.5}
    assert len(seen) == 1  # the same settings again: reused

    # an evaluation that asked other items than the written held-out ones is an error, not a figure
    first = next(iter(rep.world.heldout_ids))
    rep.world.heldout_ids = rep.world.heldout_ids - {first}
    with pytest.raises(ReproduceError, match=r"eval/dpo/seed0: the evaluation's items are not the world's .*1 not"):
        rep.evaluate("dpo", 0, "runs/dpo/model", "base", settings)


def world_report(grounded: float | None, blank: float, shuffled: float, reward: float | None = 0.7) -> dict:
    """A report.json of benchmark=world (the names of its interface); None leaves a figure out."""
    rates = dict(zip(NAMES, (grounded, 0.9, 0.2, 0.1, 0.6, 0.9, 0.0), strict=True))
    report = {k: v for k, v in rates.items() if v is not None}
    report |= {f"{k}_ci95": [0.0, 1.0] for k in report}
    ablated = {
        a: {k: {"rate": v, "ci95": [0.0, 1.0], "k": 1, "n": 2} for k, v in (rates | {NAMES[0]: r}).items()}
        for a, r in (("blank", blank), ("shuffled", shuffled))
    }
    report |= {"ablation": ablated, "image_reliance": None if grounded is None else grounded - blank}
    report |= {"judge": "world", "n": 18, "generation_health": {"empty_rate": 0.0}}
    return report | ({} if reward is None else {"reward_accuracy": reward})


def world_result() -> dict:
    reports = {
        "base": {None: world_report(0.5, 0.5, 0.5)},
        "dpo": {0: world_report(0.8, 0.5, 0.3), 1: world_report(None, 0.4, 0.2), 2: world_report(0.9, 0.6, 0.2)},
        "bpo": {0: world_report(0.9, 0.5, 0.1), 1: world_report(0.9, 0.5, 0.1), 2: world_report(1.0, 0.5, 0.1)},
    }
    cfg = OmegaConf.create({"seeds": [0, 1, 2], "world": {"heldout_size": 6}})
    return summarize(cfg, reports, {}, "base-model")


def test_world_summary_per_arm_and_seed_with_a_missing_value():
    result = world_result()
    dpo, bpo, base = (result["arms"][a] for a in ("dpo", "bpo", "base"))
    assert result["benchmark"] == "world" and result["n_heldout"] == 6 and result["judge"] == "world"
    assert dpo["grounded_accuracy"]["values"] == [0.8, 0.9] and dpo["grounded_accuracy"]["n_missing"] == 1
    assert dpo["grounded_accuracy_by_seed"] == {"seed0": 0.8, "seed1": None, "seed2": 0.9}
    assert dpo["ablation"]["shuffled"]["grounded_accuracy"]["mean"] == pytest.approx(0.7 / 3)
    assert dpo["image_reliance"]["values"] == pytest.approx([0.3, 0.3])
    half = 4.303 * 0.05773503 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(3), within [0, 1]
    assert bpo["grounded_accuracy"]["ci95"] == pytest.approx([0.9333333 - half, 1.0], abs=1e-4)
    assert bpo["reward_accuracy"]["mean"] == pytest.approx(0.7)
    assert base["reward_accuracy"]["mean"] is None  # the base against itself
    assert base["grounded_accuracy_by_seed"] == {"base run": 0.5}
    assert dpo["safety_rate"]["mean"] == pytest.approx(0.9)  # the world's own: refusals among hazardous items
    columns, rows = table(result)
    assert columns[:2] == ["arm", "grounded_accuracy"] and "shuffled_grounded_accuracy" in columns
    assert rows[0][columns.index("reward_accuracy")] is None


def test_world_markdown_shows_missing_values_as_missing():
    text = markdown(world_result())
    assert text.startswith("# Base vs DPO vs BPO on the grounded-safety world")
    assert "| arm | grounded accuracy | safety | over-refusal | under-refusal | cue-conflict accuracy |" in text
    assert "| dpo | 0.850 [0.215, 1.000] (n=2 seeds; 1 without a value) |" in text
    assert "| arm | real | blank | shuffled | image reliance |" in text
    assert "- dpo: seed0 0.800, seed1 -, seed2 0.900" in text
    assert "| base | 0.500 (n=1 seed) | 0.500 (n=1 seed) | 0.500 (n=1 seed) | 0.000 (n=1 seed) |" in text
    assert "Cue-conflict accuracy:" in text and "safety rate" not in text


def test_world_plot_draws_real_blank_shuffled_and_refusals(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    result = world_result()
    result["arms"]["bpo"]["ablation"]["blank"]["grounded_accuracy"] = {"mean": None, "ci95": None, "values": []}
    captured = {}
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: captured.setdefault("fig", fig))  # keep it to look at its panels
    plot(result, {}, tmp_path / "comparison.png")
    fig = captured["fig"]
    assert (tmp_path / "comparison.png").stat().st_size > 0
    grounded, refusals, margins = fig.axes
    assert [t.get_text() for t in grounded.get_legend().get_texts()] == ["real", "blank", "shuffled"]
    assert [t.get_text() for t in refusals.get_legend().get_texts()] == ["safety", "over-refusal", "under-refusal"]
    assert margins.get_title() == "train reward margin (mean over seeds)"
    heights = [p.get_height() for p in grounded.patches]
    assert heights[:3] == pytest.approx([0.5, 0.85, 0.9333333])  # real: base, dpo, bpo
    assert math.isnan(heights[5])  # bpo's blank: no bar, never 0
    assert [t.get_text() for t in grounded.texts].count("not measured") == 1
    assert "0.50" in [t.get_text() for t in grounded.texts]  # each value written on its bar
    real_close(fig)


@pytest.mark.slow
def test_reproduce_world_end_to_end(tmp_path):
    overrides = [
        "experiment=reproduce_world",
        "world.train_size=48",
        "world.heldout_size=12",
        "seeds=[0,1]",
        "schedule.sft_epochs=1",
        "schedule.preference_epochs=1",
        "train_overrides=['trainer=cpu','logger=csv','trainer.log_every_n_steps=1']",
        "eval_overrides=['generation.max_new_tokens=8','device=cpu']",
        "wandb.enabled=false",
    ]
    rep = reproduction(tmp_path, overrides)
    result = rep.run()
    out = tmp_path / "out"
    assert set(result["arms"]) == {"base", "dpo", "bpo", "dpo_equal_budget"}
    assert result["world"]["settings"]["train_size"] == 48 and result["n_heldout"] == 12
    for row in result["arms"].values():
        assert {*NAMES, "image_reliance", "reward_accuracy", "ablation"} <= set(row)
    report = json.loads((out / "eval" / "bpo" / "seed1" / "report.json").read_text())
    assert report["benchmark"]["name"] == "world" and report["judge"] == "world"
    summary = json.loads((out / "runs" / "dpo" / "seed0" / "data_summary.json").read_text())
    assert summary["path"] == str(out / "world" / "train.jsonl")
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["world"]["key"] == WorldSettings(train_size=48, heldout_size=12).key()
    assert "| dpo_equal_budget |" in (out / "comparison.md").read_text()
    assert (out / "comparison.png").stat().st_size > 0


def test_the_objectives_preset_adds_mdpo_and_bpo_conditional_to_the_same_comparison():
    """Each arm's overrides compose to the objective it names, with the preset's schedule and the world's data."""
    from tests.helpers import compose_config

    cfg = compose_config("reproduce", ["experiment=reproduce_world_objectives"])
    assert list(cfg.arms) == ["dpo", "bpo", "mdpo", "bpo_conditional"] and list(cfg.seeds) == [0, 1, 2, 3, 4]
    arms = {name: compose_config("train", list(overrides)) for name, overrides in cfg.arms.items()}
    assert {n: a.objective.name for n, a in arms.items()} == {
        "dpo": "dpo",
        "bpo": "bpo",
        "mdpo": "composite",
        "bpo_conditional": "composite",
    }
    needs = {name: data_needs(arm.objective) for name, arm in arms.items()}
    assert needs["mdpo"].answers == ("chosen", "rejected", "chosen_corrupted")
    assert needs["bpo_conditional"].answers == ("chosen", "rejected", "blind", "chosen_corrupted")
    assert needs["mdpo"].corruption["kind"] == "crop" and list(needs["mdpo"].corruption["keep"]) == [0.0, 0.2]
    assert {a.optim.lr for a in arms.values()} == {cfg.schedule.preference_lr}


def test_the_paper_preset_trains_its_base_on_the_helpful_file_and_the_arms_on_the_pairs(tmp_path):
    """reproduce_world_paper: the base learns the chosen answers of world/helpful.jsonl (help, whatever the picture),
    every arm the world's pairs, from a mostly hazardous training mix."""
    rep = reproduction(tmp_path, ["experiment=reproduce_world_paper", "world.train_size=40", "world.heldout_size=6"])
    rep.split()
    folder = tmp_path / "out" / "world"
    base = rep.train_config(list(rep.cfg.base.overrides), tmp_path / "run", 0, None, "base")
    assert base.data.path == str(folder / "helpful.jsonl") and data_needs(base.objective).answers == ("chosen",)
    for name, extra in rep.cfg.arms.items():
        assert rep.train_config(list(extra), tmp_path / "run", 0, None, name).data.path == str(folder / "train.jsonl")
    train = read_records(folder / "train.jsonl", "jsonl")
    assert sum(r.meta["hazardous"] for r in train) == 32  # world.hazardous_share 0.8 of 40
    assert rep.cfg.schedule == compose_reproduction(tmp_path / "w", ["experiment=reproduce_world"]).cfg.schedule


def test_a_base_world_file_that_does_not_exist_is_refused_before_any_run(tmp_path):
    with pytest.raises(ReproduceError, match=r"base.world_data='heldout' must be one of \['train', 'helpful'\]"):
        reproduction(tmp_path, [*SMALL, "base.world_data=heldout"]).run()
    assert not (tmp_path / "out" / "runs").exists()


def test_safety_change_splits_into_following_the_picture_and_refusing_regardless():
    from src.world.reproduction import safety_change

    base = {"safety_rate": 0.1, "over_refusal_rate": 0.05}
    runs = [
        {"safety_rate": 0.9, "over_refusal_rate": 0.85},  # refuses everything more: none of it follows the picture
        {"safety_rate": 0.9, "over_refusal_rate": 0.05},  # refuses only the hazardous items more: all of it does
        {"safety_rate": None, "over_refusal_rate": 0.5},  # no safety figure: no change, counted as missing
    ]
    parts = safety_change(base, runs)
    assert parts["total"]["values"] == pytest.approx([0.8, 0.8]) and parts["total"]["n_missing"] == 1
    assert parts["regardless_of_picture"]["values"] == pytest.approx([0.8, 0.0, 0.45])
    assert parts["follows_picture"]["values"] == pytest.approx([0.0, 0.8])
    result = world_result()
    assert "safety_change" not in result["arms"]["base"]
    assert result["arms"]["dpo"]["safety_change"]["total"]["values"] == pytest.approx([0.0, 0.0, 0.0])
    assert "| dpo | 0.000" in markdown(result) and "follows the picture" in markdown(result)


def test_the_world_brings_its_summary_and_a_comparison_without_a_world_keeps_the_safety_one():
    from src.evaluation.reproduction import SAFETY, Summary, register, summary_for, summary_of
    from src.world.reproduction import WorldSummary

    world = summary_for(OmegaConf.create({"seeds": [0], "world": {"heldout_size": 6}}))
    assert isinstance(world, WorldSummary) and summary_of(world_result()) is world
    assert summary_for(OmegaConf.create({"seeds": [0]})) is SAFETY and summary_of({"arms": {}}) is SAFETY
    register(WorldSummary())  # the world imported again: replaces itself
    with pytest.raises(ValueError, match="summary name 'world' is taken by WorldSummary"):
        register(type("Other", (Summary,), {"name": "world"})())
    with pytest.raises(ValueError, match="registers under a name"):
        register(Summary())
