"""Comparison tables of several evaluation reports: row order, labels, denominators, what the rows share."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from src.evaluation.comparison import compare_reports, find_reports
from src.evaluation.metrics import wilson_interval


def write_report(folder: Path, **fields: Any) -> Path:
    """A minimal report.json (safety-rate benchmark, keyword judge, 10 answers all judged) with ``fields`` on top."""
    folder.mkdir(parents=True, exist_ok=True)
    report = {
        "model": {"path": f"runs/{folder.name}/model"},
        "benchmark": {"name": "mmsafe_po", "kind": "safety_rate"},
        "judge": "keyword",
        "n": 10,
        "judged": 10,
        "failed": 0,
        "unparsed": 0,
        "empty": 0,
        "safety_rate": 0.5,
    } | fields
    (folder / "report.json").write_text(json.dumps(report))
    return folder / "report.json"


def test_sweep_of_twelve_jobs_gets_every_label_right(tmp_path):
    sweep = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    for job in range(12):
        write_report(sweep / str(job), safety_rate=job / 100)
        (sweep / str(job) / ".hydra").mkdir()
        (sweep / str(job) / ".hydra" / "overrides.yaml").write_text(f"- model.path=runs/m{job}/model\n")
    labels = [f"job{job}" for job in range(12)]
    table = compare_reports(find_reports([sweep]), labels, tmp_path / "out")
    assert [(r["label"], r["safety_rate"]) for r in table["rows"]] == [(f"job{j}", j / 100) for j in range(12)]
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert f"- job11: `{sweep / '11' / 'report.json'}` (overrides: model.path=runs/m11/model)" in md


def test_failed_judgements_are_shown_beside_the_rate(tmp_path):
    write_report(tmp_path / "a", n=100, judged=10, failed=88, unparsed=1, empty=1, safety_rate=0.9)
    table = compare_reports(find_reports([tmp_path]), ["a"], tmp_path / "out")
    row = table["rows"][0]
    assert (row["n"], row["judged"], row["failed"], row["denominators"]["safety_rate"]) == (100, 10, 88, 10)
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| model | benchmark | judge | answers | judged | failed | unparsed | empty | safety_rate |" in md
    assert "| a | mmsafe_po | keyword | 100 | 10 | 88 | 1 | 1 | 0.9000 (n=10) |" in md


def test_rows_with_other_judge_settings_or_item_counts_are_marked(tmp_path):
    generation = {"max_new_tokens": 64, "do_sample": False}
    write_report(tmp_path / "a", generation_settings=generation)
    write_report(tmp_path / "b", generation_settings=generation)
    write_report(tmp_path / "c", generation_settings=generation, judge="openai", n=50, judged=50)
    write_report(tmp_path / "d", generation_settings=generation | {"max_new_tokens": 8})
    table = compare_reports(find_reports([tmp_path]), None, tmp_path / "out")
    assert [r["marker"] for r in table["rows"]] == ["S1", "S1", "S2", "S3"]
    assert table["differs"] == ["judge", "generation", "n"]
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| runs/c [S2] | mmsafe_po | openai |" in md and "| runs/a [S1] |" in md
    assert "they differ in judge, generation, n" in md
    assert '- [S2] judge="openai", generation={"do_sample": false, "max_new_tokens": 64}, n=50' in md
    # the same setup everywhere: no marks, no note
    same = compare_reports(find_reports([tmp_path / "a", tmp_path / "b"]), None, tmp_path / "same")
    assert same["differs"] == [] and [r["marker"] for r in same["rows"]] == ["", ""]
    assert "measured differently" not in (tmp_path / "same" / "comparison.md").read_text()


def plotted(monkeypatch: Any) -> dict[str, Any]:
    """Keeps the figure a plot function closes, to look at its panels."""
    import matplotlib.pyplot as plt

    captured: dict[str, Any] = {}
    monkeypatch.setattr(plt, "close", lambda fig: captured.setdefault("fig", fig))
    return captured


def error_bar(ax: Any, x: float) -> tuple[float, float]:
    """The (low, high) of the error bar drawn at ``x``."""
    from matplotlib.container import ErrorbarContainer

    for container in ax.containers:
        if not isinstance(container, ErrorbarContainer):
            continue
        for segment in container.lines[2][0].get_segments():
            if len(segment) and segment[0][0] == pytest.approx(x):
                return segment[0][1], segment[1][1]
    raise AssertionError(f"no error bar at x={x}")


def test_comparison_plot_draws_intervals_and_marks_a_metric_a_report_lacks(tmp_path, monkeypatch):
    captured = plotted(monkeypatch)
    write_report(
        tmp_path / "a",
        safety_rate=0.0,
        safety_rate_ci95=[0.0, 0.3],
        pairwise_accuracy=0.5,
        pairwise={"pairwise_accuracy": 0.5, "n": 10},
    )
    write_report(tmp_path / "b", safety_rate=0.6, safety_rate_ci95=[0.4, 0.8])  # no pairwise accuracy measured
    table = compare_reports(find_reports([tmp_path]), ["base", "dpo"], tmp_path / "out")
    assert table["metrics"] == ["pairwise_accuracy", "safety_rate"]
    assert "pairwise_accuracy" not in table["rows"][1]  # absent from comparison.json too, never 0
    ax, trade_off = captured["fig"].axes
    assert ax.get_title() == "mmsafe_po - judge: keyword - base vs dpo (95% intervals)"
    # neither report measured over-refusal: the scatter draws no point and says why, never a point at 0
    assert not trade_off.containers and "nothing measured" in [t.get_text() for t in trade_off.texts]
    assert "base: over-refusal not measured\ndpo: over-refusal not measured" in [t.get_text() for t in trade_off.texts]
    width = 0.4
    heights = {round(p.get_x() + p.get_width() / 2, 3): p.get_height() for p in ax.patches}
    # bars: x = metric + row * width; dpo's pairwise accuracy (x=0.4) has no bar, base's safety rate is a real 0
    assert heights[1.0] == 0.0 and heights[1.4] == pytest.approx(0.6) and heights[0.0] == pytest.approx(0.5)
    assert math.isnan(heights[0.4])
    assert [t.get_position()[0] for t in ax.texts if t.get_text() == "not measured"] == [pytest.approx(width)]
    assert {t.get_text() for t in ax.texts} >= {"0.00", "0.60", "0.50"}
    assert error_bar(ax, 1.0) == pytest.approx((0.0, 0.3)) and error_bar(ax, 1.4) == pytest.approx((0.4, 0.8))
    lo, hi = wilson_interval(5, 10)  # pairwise accuracy 0.5 over 10 pairs
    assert error_bar(ax, 0.0) == pytest.approx((lo, hi))


def test_a_label_per_report_missing_exits_2_with_one_line(tmp_path, caplog):
    from src.compare import main
    from tests.helpers import compose_config

    a, b = write_report(tmp_path / "a"), write_report(tmp_path / "b")
    with pytest.raises(SystemExit) as exit:
        main(compose_config("compare", [f"inputs=[{a},{b}]", "labels=[x,y,z]"], tmp_path / "out"))
    assert exit.value.code == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert line.startswith(
        "compare: 3 labels for 2 reports: labels= needs one label per report.json found from inputs="
    )
    assert "\n" not in line and str(a) in line and str(b) in line


@pytest.mark.slow  # a fresh interpreter imports torch: half a minute on a busy machine
def test_compare_command_with_a_label_per_report_missing_fails_in_one_line(tmp_path):
    from tests.helpers import run_entry

    a, b = write_report(tmp_path / "a"), write_report(tmp_path / "b")
    run = run_entry("compare.py", f"inputs=[{a},{b}]", "labels=[x,y,z]", run_dir=f"{tmp_path}/out")
    output = run.stdout + run.stderr
    assert run.returncode == 2 and "Traceback" not in output
    (line,) = [x for x in output.splitlines() if "labels" in x]
    assert "3 labels for 2 reports" in line and "labels=" in line and "inputs=" in line and str(a) in line


def test_compare_command_ends_with_the_folder_it_wrote(tmp_path, capsys):
    from src.compare import main
    from tests.helpers import compose_config

    a, b = write_report(tmp_path / "a"), write_report(tmp_path / "b")
    out = tmp_path / "out"
    main(compose_config("compare", [f"inputs=[{a},{b}]", "labels=[x,y]"], out))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"comparison: {out} (comparison.json, comparison.md, comparison.png)"


def write_plain_comparison(reports: Path, out: Path) -> None:
    """src/compare.py's writer on two reports."""
    a, b = write_report(reports / "a"), write_report(reports / "b")
    compare_reports([a, b], ["x", "y"], out)


def write_seed_comparison(reports: Path, out: Path) -> None:
    """src/reproduce.py's writer on a base and one arm over two seeds."""
    from omegaconf import OmegaConf

    from src.evaluation.reproduction import summarize, write_outputs

    report = {"n": 4, "judge": "keyword", "safety_rate": 0.5, "generation_health": {}}
    by_arm = {"base": {None: report}, "dpo": {0: report, 1: report | {"safety_rate": 0.75}}}
    out.mkdir(parents=True, exist_ok=True)  # the comparison's run folder, made before any run
    write_outputs(out, summarize(OmegaConf.create({"seeds": [0, 1]}), by_arm, {}, "base-model"), {})


@pytest.mark.parametrize("write", [write_plain_comparison, write_seed_comparison])
def test_a_figure_that_fails_half_way_leaves_the_previous_one_whole(tmp_path, monkeypatch, write):
    from matplotlib.figure import Figure

    out = tmp_path / "out"
    write(tmp_path / "reports", out)
    before = (out / "comparison.png").read_bytes()

    def savefig(self, path, **kwargs):  # a full disk: part of the file, then an error
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError("No space left on device")

    monkeypatch.setattr(Figure, "savefig", savefig)
    with pytest.raises(OSError, match="No space left"):
        write(tmp_path / "reports", out)
    assert (out / "comparison.png").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["comparison.json", "comparison.md", "comparison.png"]


def test_a_comparison_with_nothing_to_draw_removes_the_earlier_figure(tmp_path):
    from src.evaluation.comparison import write_comparison

    out = tmp_path / "out"
    write_plain_comparison(tmp_path / "reports", out)
    assert (out / "comparison.png").is_file()
    write_comparison(out, {"metrics": []}, "# Comparison\n", lambda path: None)  # no metric: no figure
    assert sorted(p.name for p in out.iterdir()) == ["comparison.json", "comparison.md"]


def test_the_table_says_what_made_each_row_and_when_they_differ(tmp_path):
    from src.environment import describe, environment

    env = environment()
    other = env | {"packages": env["packages"] | {"transformers": "5.0.0"}}
    write_report(tmp_path / "a", environment=env)
    write_report(tmp_path / "b", environment=env)
    write_report(tmp_path / "c", environment=other)
    table = compare_reports(find_reports([tmp_path / "a", tmp_path / "b"]), None, tmp_path / "same")
    assert table["rows"][0]["environment"] == env and "environment" not in table["metrics"]
    assert f"Made with: {describe(env)}." in (tmp_path / "same" / "comparison.md").read_text()
    compare_reports(find_reports([tmp_path]), None, tmp_path / "mixed")
    md = (tmp_path / "mixed" / "comparison.md").read_text()
    assert "**Made with different versions or devices**" in md and "transformers 5.0.0" in md


def two_sided_report(folder: Path, safety: float | None, over: float | None, **fields: Any) -> Path:
    """A report of a benchmark with harmless items (MSSBench-like): safety over 20 harmful, over-refusal over 20
    harmless answers; None leaves a figure out, as a report without that side has it."""
    extra: dict[str, Any] = {"benchmark": {"name": "mssbench", "kind": "safety_rate"}, "n": 40, "judged": 40}
    if safety is not None:
        k = round(safety * 18)
        counts = {"n": 20, "judged": 18, "failed": 1, "unparsed": 0, "empty": 1, "safe": k}
        extra |= {"safety_rate": safety, "safety_rate_ci95": list(wilson_interval(k, 18)), "safety_counts": counts}
    else:
        extra["safety_rate"] = None
    if over is not None:
        k = round(over * 16)
        counts = {"n": 20, "judged": 16, "failed": 0, "unparsed": 4, "empty": 0, "refused": k}
        extra |= {"over_refusal_rate": over, "over_refusal_rate_ci95": list(wilson_interval(k, 16))}
        extra["over_refusal_counts"] = counts
    report = write_report(folder, **(extra | fields))
    data = json.loads(report.read_text())
    if safety is None:
        del data["safety_rate"]
    report.write_text(json.dumps(data))
    return report


def test_safety_sits_beside_over_refusal_with_denominators_and_missing_as_missing(tmp_path, monkeypatch):
    captured = plotted(monkeypatch)
    two_sided_report(tmp_path / "a", safety=1.0, over=0.75)  # refuses nearly everything
    two_sided_report(tmp_path / "b", safety=0.5, over=0.125)
    two_sided_report(tmp_path / "c", safety=None, over=0.25)  # MOSSBench without its contrast set
    write_report(
        tmp_path / "d",
        safety_rate=0.8,
        safety_rate_ci95=list(wilson_interval(8, 10)),
        cheating={"over_refusal": {"rate": 0.4, "k": 4, "n": 10, "ci95": list(wilson_interval(4, 10))}},
    )
    write_report(tmp_path / "e", safety_rate=0.7)
    table = compare_reports(find_reports([tmp_path]), ["all", "some", "benign", "mmsafe", "plain"], tmp_path / "out")
    assert table["metrics"][:3] == ["safety_rate", "over_refusal_rate", "cheating/over_refusal"]
    rows = {r["label"]: r for r in table["rows"]}
    assert rows["all"]["denominators"]["safety_rate"] == 18 and rows["all"]["denominators"]["over_refusal_rate"] == 16
    assert "safety_rate" not in rows["benign"] and "over_refusal_rate" not in rows["plain"]  # absent, not 0
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| safety_rate | over_refusal_rate | cheating/over_refusal |" in md
    assert "## Safety beside over-refusal" in md
    lo, hi = wilson_interval(12, 16)
    assert (
        f"| all [S1] | 1.0000 [{wilson_interval(18, 18)[0]:.3f}, 1.000] (n=18) | 0.7500 [{lo:.3f}, {hi:.3f}] (n=16) |"
        in md
    )
    assert "| benign [S1] | not measured | 0.2500 [" in md
    assert (
        "| mmsafe [S2] | 0.8000 [0.490, 0.943] (n=10) | 0.4000 [" in md
        and "upper bound: refusals with a benign image" in md
    )
    assert "| plain [S2] | 0.7000 (n=10) | not measured | - |" in md
    _, trade_off = captured["fig"].axes
    points = {c.get_label(): (c.lines[0].get_xdata()[0], c.lines[0].get_ydata()[0]) for c in trade_off.containers}
    assert points == {"all [S1]": (0.75, 1.0), "some [S1]": (0.125, 0.5), "mmsafe [S2] (upper bound)": (0.4, 0.8)}
    assert [t.get_text() for t in trade_off.texts] == [
        "benign [S1]: safety rate not measured\nplain [S2]: over-refusal not measured"
    ]
    assert all(c.has_xerr and c.has_yerr for c in trade_off.containers)  # each point with both intervals
    (hollow,) = [c for c in trade_off.containers if c.get_label() == "mmsafe [S2] (upper bound)"]
    assert hollow.lines[0].get_markerfacecolor() == "none"  # an upper bound is drawn hollow
