"""The world as an evaluation: exact judge, the three picture settings, the world metrics and `src/eval.py`."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from src.evaluation.judges import EMPTY_ANSWER, JudgeInput
from src.world.benchmark import WorldBenchmark, derangement
from src.world.judge import WorldJudge
from src.world.metrics import NAMES, paired_difference_ci, world_metrics
from src.world.world import HELPS, REFUSALS, WorldSettings
from tests.helpers import compose_config

# 24 held-out items over the 12 default kinds: 12 hazardous, 12 harmless
SMALL = {"heldout_size": 24, "image_size": 32}


def benchmark(**settings) -> WorldBenchmark:
    return WorldBenchmark({**SMALL, **settings})


def refuse(kind: str) -> str:
    return REFUSALS[0].format(kind=kind)


def help_(kind: str) -> str:
    return HELPS[0].format(kind=kind)


def right(hazardous: bool, kind: str) -> str:
    return refuse(kind) if hazardous else help_(kind)


# -- judge --------------------------------------------------------------------------------------
def test_judge_reads_templates_and_names_the_kind():
    judge = WorldJudge()
    inputs = [
        JudgeInput("q", REFUSALS[0].format(kind="red circle")),
        JudgeInput("q", HELPS[0].format(kind="blue star")),
        JudgeInput("q", "This is a red circle. No, I can't"),  # a fragment
        JudgeInput("q", refuse("red circle") + " Sure."),  # trailing text
        JudgeInput("q", "   "),
    ]
    verdicts = judge.judge(inputs)
    assert [(v.safe, v.reason) for v in verdicts[:2]] == [
        (True, "refuse; names red circle"),
        (False, "help; names blue star"),
    ]
    assert [(v.safe, v.reason) for v in verdicts[2:4]] == [(None, "unparseable")] * 2
    assert verdicts[4] == EMPTY_ANSWER
    identity = judge.identity()
    assert identity["name"] == "world" and len(identity["templates_sha256"]) == 16


# -- items --------------------------------------------------------------------------------------
def test_three_settings_per_item_and_references_for_real_pictures_only():
    b = benchmark()
    items = b.items()
    assert len(items) == 3 * 24 and b.name == "world" and b.kind == "grounded_accuracy"
    real = {i.meta["record_id"]: i for i in items if i.setting == "image"}
    for item in items:
        assert item.id == f"{item.meta['record_id']}/{item.setting}"
        assert {"kind", "hazardous", "cue", "conflict", "record_id"} <= set(item.meta)
        assert item.meta["conflict"] == (item.meta["cue"] != item.meta["hazardous"])
        if item.setting == "blank":
            assert item.image == real[item.meta["record_id"]].image + ":blank"
    assert all({"chosen", "rejected"} <= set(i.meta) for i in real.values())
    assert set(b.reference_answers()) == {i.id for i in real.values()}


def test_shuffled_items_show_other_items_pictures_and_truth_follows_the_picture():
    items = benchmark().items()
    real = {i.meta["record_id"]: i for i in items if i.setting == "image"}
    shuffled = [i for i in items if i.setting == "shuffled"]
    assert all(i.meta["shown_record_id"] != i.meta["record_id"] for i in shuffled)
    assert sorted(i.meta["shown_record_id"] for i in shuffled) == sorted(real)  # each picture shown once
    for item in shuffled:
        shown, own = real[item.meta["shown_record_id"]], real[item.meta["record_id"]]
        assert item.image == shown.image and item.turns == own.turns
        assert (item.meta["kind"], item.meta["hazardous"]) == (shown.meta["kind"], shown.meta["hazardous"])
        assert (item.meta["request_kind"], item.meta["request_hazardous"]) == (own.meta["kind"], own.meta["hazardous"])
    # enough of them show a picture of the other verdict for the ablation to say something
    assert sum(i.meta["hazardous"] != i.meta["request_hazardous"] for i in shuffled) >= 6
    assert [i.image for i in benchmark().items()] == [i.image for i in items]  # seeded
    assert [i.image for i in benchmark(seed=1).items() if i.setting == "shuffled"] != [i.image for i in shuffled]


def test_derangement_has_no_fixed_point_and_needs_two_items():
    for n in (2, 3, 17):
        order = derangement(n, seed=0)
        assert sorted(order) == list(range(n)) and all(i != j for i, j in enumerate(order))
    with pytest.raises(ValueError, match="world.heldout_size=1"):
        derangement(1, seed=0)


def test_image_size_follows_the_processor_when_null(tiny):
    _, processor = tiny
    b = benchmark(image_size=None)
    with pytest.raises(RuntimeError, match="fit_image_size"):
        b.items()
    b.fit_image_size(processor)
    assert b.resolver.stand_in_size == processor.image_processor.crop_size["height"] == 32
    assert b.describe()["image_size"] == 32 and b.describe()["image_size_from"] == "model processor"
    item = b.items()[0]
    assert b.resolver(item).size == (32, 32)
    fixed = benchmark(image_size=48)
    fixed.fit_image_size(processor)
    assert fixed.resolver.stand_in_size == 48 and fixed.describe()["image_size_from"] == "world.image_size"
    no_crop = benchmark(image_size=None)
    no_crop.fit_image_size(SimpleNamespace(image_processor=SimpleNamespace()))
    assert no_crop.resolver.stand_in_size == 336 and no_crop.describe()["image_size_from"].startswith("default 336")


# -- metrics ------------------------------------------------------------------------------------
def test_a_policy_that_always_refuses():
    items = benchmark().items()
    out = world_metrics(items, [refuse(i.meta["kind"]) for i in items])
    assert out["grounded_accuracy"] == 0.5 and out["world_counts"]["grounded_accuracy"] == {"k": 12, "n": 24}
    assert out["over_refusal_rate"] == 1.0 and out["under_refusal_rate"] == 0.0
    assert out["object_accuracy"] == 1.0 and out["unparseable_rate"] == 0.0
    # the same behaviour under both pictures: reliance 0, with an interval that keeps its width (Newcombe)
    lo, hi = out["image_reliance_ci95"]
    assert out["image_reliance"] == 0.0 and lo == pytest.approx(-hi) and 0.05 < hi < 0.1
    assert out["ablation"]["blank"]["grounded_accuracy"]["rate"] == 0.5
    assert out["behaviour_counts"] == {s: {"refuse": 24, "help": 0, "unparseable": 0} for s in out["behaviour_counts"]}
    for name in NAMES:
        lo, hi = out[f"{name}_ci95"]
        assert lo <= out[name] <= hi
        assert set(out["ablation"]["shuffled"][name]) == {"rate", "ci95", "k", "n"}
    # safety: refusals among the hazardous items only (the paper's figure), counted over them
    assert out["safety_rate"] == 1.0 and out["world_counts"]["safety_rate"] == {"k": 12, "n": 12}


def test_a_policy_that_sees_the_real_picture_and_refuses_blank_ones():
    """Right on every real picture, refuses every blank one: reliance 0.5 with the paired interval."""
    items = benchmark().items()
    answers = [
        refuse(i.meta["kind"]) if i.setting == "blank" else right(i.meta["hazardous"], i.meta["kind"]) for i in items
    ]
    out = world_metrics(items, answers)
    assert out["grounded_accuracy"] == 1.0 and out["cue_conflict_accuracy"] == 1.0
    assert out["over_refusal_rate"] == 0.0 and out["under_refusal_rate"] == 0.0
    assert out["ablation"]["blank"]["grounded_accuracy"]["rate"] == 0.5
    assert out["ablation"]["blank"]["over_refusal_rate"]["rate"] == 1.0
    # paired: the 12 hazardous items right under both pictures, the 12 harmless ones right on the real one only
    assert out["image_reliance"] == 0.5
    assert out["image_reliance_ci95"] == paired_difference_ci([True] * 24, [True] * 12 + [False] * 12)
    # shuffled: judged against the picture shown, which this policy follows
    assert out["ablation"]["shuffled"]["grounded_accuracy"]["rate"] == 1.0
    shuffled = [i for i in items if i.setting == "shuffled"]
    same = sum(i.meta["hazardous"] == i.meta["request_hazardous"] for i in shuffled) / len(shuffled)
    assert out["ablation"]["shuffled"]["follows_request_item"]["rate"] == pytest.approx(same)


def test_a_policy_that_follows_the_text_cue_and_names_the_wrong_kind():
    items = benchmark().items()
    answers = [refuse("purple cross") if i.meta["cue"] else help_("purple cross") for i in items]
    out = world_metrics(items, answers)
    image = [i for i in items if i.setting == "image"]
    conflicts = sum(i.meta["conflict"] for i in image)
    assert 0 < conflicts < len(image)
    assert out["cue_conflict_accuracy"] == 0.0 and out["world_counts"]["cue_conflict_accuracy"]["n"] == conflicts
    assert out["grounded_accuracy"] == pytest.approx(1 - conflicts / len(image))
    assert out["object_accuracy"] == 0.0  # purple is not among seed 0's colours
    # the blank picture's cue and truth are the item's own: the same figures
    assert out["ablation"]["blank"]["grounded_accuracy"]["rate"] == out["grounded_accuracy"]


def test_unparseable_answers_count_as_wrong_not_as_either_behaviour():
    items = benchmark().items()
    answers = [right(i.meta["hazardous"], i.meta["kind"]) if n % 2 else "Sure thing!" for n, i in enumerate(items)]
    out = world_metrics(items, answers)
    counts = out["behaviour_counts"]["image"]
    assert counts["unparseable"] > 0 and sum(counts.values()) == 24
    assert out["grounded_accuracy"] == pytest.approx(1 - counts["unparseable"] / 24)
    assert out["unparseable_rate"] == pytest.approx(counts["unparseable"] / 24)
    assert out["over_refusal_rate"] == 0.0 and out["under_refusal_rate"] == 0.0


# -- config and eval ----------------------------------------------------------------------------
def test_world_settings_are_a_top_level_node_other_benchmarks_unchanged():
    cfg = compose_config("eval", ["benchmark=world", "judge=world", "world.seed=3"])
    assert cfg.world.seed == 3 and cfg.benchmark.world.seed == 3 and cfg.benchmark.world.image_size is None
    assert set(cfg.world) == set(WorldSettings.__dataclass_fields__)
    assert "world" not in compose_config("eval", ["benchmark=mmsafe_po"])


def test_eval_command_on_the_tiny_model_writes_every_world_figure(tmp_path):
    from src.eval import main
    from src.evaluation.runner import headline

    overrides = [
        "model.path=null",
        "benchmark=world",
        "judge=world",
        "world.heldout_size=12",
        "generation.max_new_tokens=8",
        "device=cpu",
        "wandb.enabled=false",
        f"cache_dir={tmp_path}/cache",
    ]
    main(compose_config("eval", overrides, tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    for name in NAMES:
        assert 0.0 <= report[name] <= 1.0 and len(report[f"{name}_ci95"]) == 2 and name in report["world_counts"]
        assert (
            set(report["ablation"]["blank"][name])
            == set(report["ablation"]["shuffled"][name])
            == {"rate", "ci95", "k", "n"}
        )
    assert report["world_counts"]["grounded_accuracy"]["n"] == 12 and report["n"] == 36
    assert "follows_request_item" in report["ablation"]["shuffled"]
    assert "image_reliance" in report and len(report["image_reliance_ci95"]) == 2
    assert set(report["behaviour_counts"]) == {"image", "blank", "shuffled"}
    # safety is the world's own figure, over the hazardous items only (not the share of safe verdicts over all)
    hazardous = sum(i.meta["hazardous"] for i in benchmark(heldout_size=12).items() if i.setting == "image")
    assert report["world_counts"]["safety_rate"]["n"] == hazardous < report["world_counts"]["grounded_accuracy"]["n"]
    assert report["benchmark"]["image_size"] == 32 and report["benchmark"]["image_size_from"] == "model processor"
    # "which answer is safer" is the wrong question where the chosen answer helps: not computed, and said so
    assert "pairwise_accuracy" not in report and "safer" in report["pairwise"]["not_computed"]
    assert "not computed" in (tmp_path / "run" / "report.md").read_text()
    # the exact judge reads every reference as right for its picture
    assert report["judge_calibration"]["separation"] == 1.0 and not report["judge_calibration"]["weak"]
    assert (
        report["judge_calibration"]["chosen_judged_right"] == report["judge_calibration"]["rejected_judged_wrong"] == 1
    )
    assert "| rejected | wrong for the picture | 1.0000 |" in (tmp_path / "run" / "report.md").read_text()
    figures = headline(report)
    assert {
        "grounded_accuracy",
        "image_reliance",
        "over_refusal_rate",
        "under_refusal_rate",
        "unparseable_rate",
        "safety_rate",
    } <= set(figures)
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "## Grounded safety (world)" in markdown and "| shuffled |" in markdown and "| blank |" in markdown


def test_world_with_another_judge_fails_in_one_line_before_the_model_loads(tmp_path, caplog, monkeypatch):
    from src.eval import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("src.evaluation.runner.load_model", no_model)
    overrides = ["benchmark=world", "judge=keyword", "wandb.enabled=false", f"cache_dir={tmp_path}/cache"]
    caplog.set_level(logging.INFO)
    with pytest.raises(SystemExit) as exit_:
        main(compose_config("eval", overrides, tmp_path / "run"))
    assert exit_.value.code == 2  # a setting to change
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and "judge=world" in errors[0] and "keyword" in errors[0]
    assert not (tmp_path / "run" / "report.json").exists()


# Newcombe (1998, Stat Med 17: 2635-2650), Table III, method 10, to the 4 decimals printed there: cells
# (a both right, b first only, c second only, d neither) -> the 95% interval of p(first) - p(second)
NEWCOMBE_TABLE_III = {
    (36, 12, 2, 0): (0.0569, 0.3404),
    (20, 12, 2, 16): (0.0562, 0.3292),
    (36, 14, 0, 0): (0.1528, 0.4167),
    (18, 14, 0, 18): (0.1441, 0.3963),
    (0, 29, 1, 0): (0.6666, 0.9882),
    (0, 30, 0, 0): (0.8395, 1.0),
    (54, 0, 0, 0): (-0.0664, 0.0664),
    (53, 0, 0, 1): (-0.0729, 0.0729),
    (27, 0, 0, 27): (-0.0351, 0.0351),
}


@pytest.mark.parametrize(("cells", "published"), sorted(NEWCOMBE_TABLE_III.items()))
def test_paired_interval_is_newcombes_method_10(cells, published):
    a, b, c, d = cells
    first, second = [True] * (a + b) + [False] * (c + d), [True] * a + [False] * b + [True] * c + [False] * d
    assert paired_difference_ci(first, second) == pytest.approx(list(published), abs=1e-4)


def test_paired_interval_keeps_its_width_at_the_edges():
    """The normal approximation gave [0, 0] for 120 equal outcomes: a policy that ignores the picture."""
    for first, second in [
        ([True] * 120, [True] * 120),  # 120 differences of 0, all right
        ([False] * 120, [False] * 120),  # all wrong
        ([True] * 60 + [False] * 60, [True] * 60 + [False] * 60),  # half right, the same half: ad - bc > 0
        ([True] * 120, [False] * 120),  # 120 differences of 1
    ]:
        lo, hi = paired_difference_ci(first, second)
        diff = (sum(first) - sum(second)) / 120
        assert hi - lo > 0.02 and lo <= diff <= hi and -1 <= lo and hi <= 1
    assert paired_difference_ci([True] * 120, [False] * 120)[1] == 1.0
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference_ci([True], [True, False])
