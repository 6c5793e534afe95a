"""Comparison tables of several evaluation reports: row order, labels, denominators, what the rows share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from src.evaluation.compare import compare_reports, find_reports


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
