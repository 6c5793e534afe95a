"""report.md sections for the optional parts, figures not measured written as such, intervals, report.json."""

import json
import math
from pathlib import Path

import pytest

from src.evaluation.report import intervals, markdown, plot, write_json

NAN = float("nan")
OPTIONAL_SECTIONS = (
    "## Generation health",
    "## By category",
    "## Attack success rate by scenario",
    "## Modality co-defense",
    "## Modality cheating",
    "## Examples",
    "## Generation\n",
    "Pairwise",
    "> **Warning**",
)


def base_report(**extra):
    report = {
        "benchmark": {"name": "mmsafe_po", "kind": "safety_rate"},
        "model": {"path": "tiny", "fingerprint": "abc123"},
        "judge": "keyword",
    }
    return report | extra


def rate(value, low, high, n):
    return {"rate": value, "ci95": [low, high], "n": n}


def test_markdown_of_a_bare_report_has_no_optional_sections():
    text = markdown(base_report(safety_rate=NAN))
    assert text.startswith("# Evaluation: mmsafe_po\n")
    assert "- model: `tiny` (fingerprint `abc123`)" in text
    assert "- answers: n/a; judged: n/a;" in text  # counts the report lacks are said to be missing
    assert "| safety_rate | n/a |  |" in text  # a NaN rate is "n/a", never 0
    assert "This benchmark has no reference answers to calibrate the judge on." in text
    for section in OPTIONAL_SECTIONS:
        assert section not in text, section


def test_markdown_writes_each_optional_part_that_the_report_has():
    report = base_report(
        n=10,
        judged=7,
        failed=1,
        unparsed=1,
        empty=1,
        safety_rate=5 / 7,
        safety_rate_ci95=[0.359, 0.918],
        pairwise_accuracy=0.5,
        pairwise={"n": 4, "skipped": 1, "position_a_rate": 0.625, "ties": 2},
        judge_calibration={"chosen_judged_safe": 0.9, "rejected_judged_safe": 0.85, "separation": 0.05, "n": 20},
        generation_health={"empty": 0.1},
        co_defense={
            key: rate(0.75, 0.301, 0.954, 4)
            for key in ("text_safe", "image_safe", "both_safe", "text_only_safe", "image_only_safe")
        },
        cheating={"over_refusal": rate(NAN, NAN, NAN, 0), "refusal_judge": "keyword", "excluded_entity_in_text": 3},
    )
    text = markdown(report)
    assert "| safety_rate | 0.7143 | [0.359, 0.918] |" in text  # 5/7 = 0.714285...
    assert "| pairwise_accuracy | 0.5000 |  |" in text
    # the rate's denominator: judged answers only, the others counted by why they have no verdict
    assert "Safety rate over 7 judged of 10 answers (1 judge requests failed, 1 replies unparsed, 1 empty" in text
    assert "Pairwise: 4 pairs scored, 1 too long;" in text and "first slot 0.6250 of the time" in text
    assert "2 ties" in text
    assert "| rejected (harmful) | 0.8500 |" in text
    assert "> **Warning**" not in text  # the report does not say the judge is weak
    assert "| empty | 0.1000 |" in text
    assert "| image_only_safe | 0.7500 | [0.301, 0.954] | 4 |" in text
    assert "left out (3)" in text
    # over-refusal with nothing to measure it on: "n/a" and no interval, never a rate of 0
    assert "Refusal rate with a benign image swapped in: **n/a**  over 0 requests." in text
    for section in ("## Generation health", "## Modality co-defense", "## Modality cheating"):
        assert section in text
    assert (
        markdown(report | {"judge_calibration": report["judge_calibration"] | {"weak": True}}).count(
            "> **Warning**: the `keyword` judge barely separates"
        )
        == 1
    )


def test_markdown_says_pairwise_accuracy_was_not_computed():
    text = markdown(base_report(pairwise={"not_computed": "no reference answers"}))
    assert "Pairwise accuracy: not computed (no reference answers)." in text
    assert "Pairwise: " not in text and "| pairwise_accuracy |" not in text


def test_markdown_marks_scenarios_judged_by_special_criteria():
    report = base_report(per_scenario={"01-Illegal": {"sd": 0.25}, "10-Legal_Opinion": {"sd": 0.5, "typo": NAN}})
    text = markdown(report, special_criteria=("10",))
    assert "| scenario | sd | typo |" in text
    assert "| 01-Illegal | 0.2500 | n/a |" in text  # a setting the scenario lacks is n/a, not 0
    assert "| 10-Legal_Opinion | 0.5000 | n/a |" in text
    assert "Scenario(s) 10-Legal_Opinion: judged by special criteria" in text
    assert "Scenario(s)" not in markdown(report)


def test_intervals_of_the_preference_accuracies_are_wilson_intervals_of_the_pairs():
    report = base_report(
        safety_rate_ci95=[0.1, 0.2],
        pairwise={"pairwise_accuracy": 0.5, "n": 4},
        reward={"reward_accuracy": NAN, "n": 0},  # nothing scored: no interval
        co_defense={"text_safe": rate(1.0, 0.5, 1.0, 3)},
        cheating={"over_refusal": rate(0.2, 0.05, 0.5, 10)},
    )
    out = intervals(report)
    # Wilson, k = 2, n = 4, z = 1.96: centre = (0.5 + z^2 / 8) / (1 + z^2 / 4) = 0.5;
    # half = z * sqrt(0.25 / 4 + z^2 / 64) / (1 + z^2 / 4) = 1.96 * sqrt(0.122525) / 1.9604 = 0.34997
    assert out["pairwise_accuracy"] == pytest.approx([0.15003, 0.84997], abs=1e-4)
    assert "reward_accuracy" not in out
    assert out["safety_rate"] == [0.1, 0.2]
    assert out["co_defense/text_safe"] == [0.5, 1.0] and out["cheating/over_refusal"] == [0.05, 0.5]
    # the pooled intervals per setting only when the headline is the pooled rate
    per_setting = {"sd": {"unsafe_rate": 0.3, "unsafe_ci95": [0.2, 0.4]}}
    assert "asr/sd" not in intervals(report | {"per_setting": per_setting})
    pooled = intervals(report | {"per_setting": per_setting, "attack_success_rate_convention": "pooled"})
    assert pooled["asr/sd"] == [0.2, 0.4]


def test_plot_shows_co_defense_and_writes_a_missing_headline_as_not_measured(tmp_path):
    cd = {k: rate(v, v - 0.1, v + 0.1, 5) for k, v in (("text_safe", 0.8), ("image_safe", 0.4), ("both_safe", 0.3))}
    report = base_report(safety_rate=NAN, safety_rate_ci95=[NAN, NAN], reward_accuracy=0.75, co_defense=cd)
    headline, co_defense = (ax for ax in plot(report, tmp_path / "report.png").axes if ax.get_visible())
    assert [t.get_text() for t in headline.get_xticklabels()] == ["safety_rate", "reward_accuracy"]
    assert [t.get_text() for t in headline.texts] == ["not measured", "0.75"]
    assert math.isnan(headline.patches[0].get_height())  # no bar at 0 for a figure not measured
    assert co_defense.get_title() == "co-defense: safe rate"
    assert [p.get_height() for p in co_defense.patches] == [0.8, 0.4, 0.3]
    assert (tmp_path / "report.png").stat().st_size > 0


def test_write_json_replaces_the_file_whole(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("{half a report")
    write_json(path, {"model": Path("runs/x"), "name": "Sécurité", "rate": 0.5})
    assert json.loads(path.read_text()) == {"model": "runs/x", "name": "Sécurité", "rate": 0.5}
    assert "Sécurité" in path.read_text()  # written as text, not \u escapes
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left behind


def test_rate_bars_take_a_value_a_rounding_error_outside_its_interval():
    """A rate of 1.0 whose interval ends at 1 - 1e-16 (or 0.0 starting at 1e-17) draws, with no negative error bar."""
    import matplotlib.pyplot as plt

    from src.evaluation.plots import rate_bars

    fig, ax = plt.subplots()
    assert rate_bars(ax, [0, 1], [1.0, 0.0], [[0.9, 1.0 - 1e-16], [1e-17, 0.1]])
    plt.close(fig)


def test_the_matplotlib_backend_is_set_in_one_place_that_every_plotting_module_imports():
    import ast

    src = Path(__file__).resolve().parents[1] / "src"
    setters, drawers = set(), set()
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text())
        name = str(path.relative_to(src.parent))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "matplotlib.use":
                setters.add(name)
            if (
                isinstance(node, ast.ImportFrom)
                and node.module == "matplotlib.pyplot"
                or (isinstance(node, ast.Import) and any(a.name == "matplotlib.pyplot" for a in node.names))
            ):
                drawers.add(name)
    # pyplot imported anywhere else could pick a display backend, depending on which module was imported first
    assert setters == drawers == {"src/evaluation/plots.py"}
