"""notebooks/analysis.ipynb runs top to bottom on small fixture files and is kept stripped of outputs.

The cells are executed with plain ``exec`` in one namespace, so neither jupyter nor nbformat is needed; one slow
test runs the notebook in a real kernel through nbclient's ``jupyter execute``, as ``make notebook`` does, when the
``notebook`` extra is installed.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"
METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]
BLIND = ["rewards/blind", "rewards/blind_margins", "rewards/blind_accuracies"]


def write_metrics(run_dir: Path, blind: bool = True) -> Path:
    """A Lightning CSVLogger file: 6 train rows, a validation row after steps 2 and 5, an lr-only row."""
    names = METRICS + (BLIND if blind else [])
    columns = ["epoch", "lr-AdamW/pg1", "step"] + [f"{s}/{n}" for s in ("train", "val") for n in names]
    rows = [{"lr-AdamW/pg1": "0.0001", "step": "0"}]  # learning-rate monitor row: no train / val cells
    for step in range(6):
        rows.append(
            {"epoch": "0", "step": str(step)}
            | {f"train/{n}": str(0.1 * step * (-1 if "rejected" in n or n == "rewards/blind" else 1)) for n in names}
            | {"train/loss": str(0.69 - 0.05 * step), "train/rewards/accuracies": "0.5"}
        )
        if step in (2, 5):
            rows.append({"epoch": "0", "step": str(step)} | {f"val/{n}": str(0.05 * step) for n in names})
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / "run_summary.json").write_text("{}")  # what a finished run writes last
    return run_dir


def category(n: int, safe: int, unparsed: int = 0) -> dict:
    s = safe / (n - unparsed)
    return {
        "n": n,
        "unparsed": unparsed,
        "safe_rate": s,
        "unsafe_rate": 1 - s,
        "safe_ci95": [max(0.0, s - 0.1), min(1.0, s + 0.1)],
        "unsafe_ci95": [max(0.0, 0.9 - s), min(1.0, 1.1 - s)],
    }


def rate(k: int, n: int) -> dict:
    return {"rate": k / n, "ci95": [max(0.0, k / n - 0.1), min(1.0, k / n + 0.1)], "n": n, "k": k}


def full_report(model: Path | str = "logs/train/runs/x/model") -> dict:
    return {
        "model": {"path": str(model), "fingerprint": "0123456789abcdef"},
        "benchmark": {"name": "mmsafe_po", "kind": "safety_rate", "stand_in_images": 0},
        "judge": "keyword",
        "n": 30,
        "unparsed": 1,
        "safety_rate": 0.6,
        "safety_rate_ci95": [0.42, 0.76],
        "pairwise_accuracy": 0.7,
        "per_category": {"LOC": category(10, 7), "ORG": category(12, 6, unparsed=1), "PER": category(8, 5)},
        "judge_calibration": {
            "n": 30,
            "chosen_judged_safe": 0.5,
            "rejected_judged_unsafe": 0.6,
            "rejected_judged_safe": 0.4,
            "separation": 0.1,
            "unparsed": 0,
            "weak": True,
        },
        "generation_health": {
            "n": 30,
            "empty_rate": 0.0,
            "broken_rate": 0.1,
            "truncated_rate": 0.2,
            "repetitive_rate": 0.05,
            "mean_words": 31.5,
            "mean_tokens": 40.0,
        },
        "co_defense": {
            "n_requests": 30,
            "n_parsed_pairs": 30,
            "text_safe": rate(20, 30),
            "image_safe": rate(15, 30),
            "both_safe": rate(12, 30),
            "text_only_safe": rate(8, 30),
            "image_only_safe": rate(3, 30),
        },
        "cheating": {"over_refusal": rate(4, 30), "unparsed": 0, "refusal_judge": "keyword"},
    }


def write_report(path: Path, report: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path


def code_cells() -> list[str]:
    nb = json.loads(NOTEBOOK.read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def run_notebook(monkeypatch, cwd: Path, run_dir: Path | None = None, report: Path | None = None) -> dict:
    """Execute every code cell in order in one namespace, as a kernel would."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    matplotlib.use("Agg")
    for name, value in (("BPO_RUN_DIR", run_dir), ("BPO_REPORT", report)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(value))
    monkeypatch.chdir(cwd)
    import matplotlib.pyplot as plt

    ns: dict = {"__name__": "__main__"}
    try:
        for i, source in enumerate(code_cells()):
            exec(compile(source, f"analysis.ipynb[code cell {i}]", "exec"), ns)
    finally:
        plt.close("all")
    return ns


def test_notebook_is_stripped():
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4 and nb["cells"]
    assert nb["cells"][0]["cell_type"] == "markdown"
    assert 8 <= len(nb["cells"]) <= 12
    for cell in nb["cells"]:
        assert isinstance(cell["source"], list) and "metadata" in cell
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
        else:
            assert "outputs" not in cell and "execution_count" not in cell
    params = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert "RUN_DIR" in "".join(params["source"]) and "REPORT" in "".join(params["source"])


def test_notebook_runs_on_a_full_bpo_run(tmp_path, monkeypatch, capsys):
    run_dir = write_metrics(tmp_path / "run")
    report = write_report(tmp_path / "eval" / "report.json", full_report(run_dir / "model"))
    ns = run_notebook(monkeypatch, tmp_path, run_dir, report)

    assert Path(ns["RUN_DIR"]) == run_dir and Path(ns["REPORT"]) == report
    assert len(ns["metrics_rows"]) == 9 and ns["has_blind"]
    assert ns["series"]("train/rewards/blind_margins")[0] == [0, 1, 2, 3, 4, 5]
    assert ns["series"]("val/rewards/margins")[0] == [2, 5]
    assert ns["report"]["per_category"] and ns["rate_key"] == "safe"
    out = capsys.readouterr().out
    assert "separation 0.100" in out and "WARNING: weak judge" in out
    assert "generation health" in out and "broken_rate 0.100" in out
    assert (
        "co-defense both_safe: 0.400" in out
        and "benign image swapped in (an upper bound of over-refusal): 0.133" in out
    )


def test_notebook_runs_without_optional_sections(tmp_path, monkeypatch, capsys):
    run_dir = write_metrics(tmp_path / "run", blind=False)  # a DPO run: no blind columns
    report = full_report(run_dir / "model")
    for key in ("co_defense", "cheating", "safety_rate", "safety_rate_ci95", "pairwise_accuracy"):
        del report[key]
    report["benchmark"]["kind"] = "attack_success_rate"
    report["attack_success_rate"] = {"SD": 0.3, "average": 0.3}
    report["judge_calibration"] = {}
    ns = run_notebook(monkeypatch, tmp_path, run_dir, write_report(tmp_path / "report.json", report))

    assert ns["metrics_rows"] and not ns["has_blind"] and ns["report"]
    assert ns["rate_key"] == "unsafe"
    out = capsys.readouterr().out
    assert "judge calibration: none" in out and "WARNING" not in out
    assert "attack_success_rate/SD: 0.300" in out
    assert "co-defense" not in out and "benign image" not in out


def evaluation_of(run: str) -> dict:
    """A report of the evaluation of training run ``run``'s model, named as eval.py names it (from the root)."""
    return full_report(f"logs/train/runs/{run}/model")


def test_notebook_defaults_to_the_newest_run_under_logs(tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / "configs").mkdir(parents=True)
    (root / "notebooks").mkdir()
    for name in ("2026-01-02_09-00-00", "2026-01-01_10-00-00"):
        write_metrics(root / "logs" / "train" / "runs" / name)
        write_report(root / "logs" / "eval" / "runs" / name / "report.json", evaluation_of(name))
    ns = run_notebook(monkeypatch, root / "notebooks")
    assert Path(ns["RUN_DIR"]) == root / "logs" / "train" / "runs" / "2026-01-02_09-00-00"
    assert Path(ns["REPORT"]) == root / "logs" / "eval" / "runs" / "2026-01-02_09-00-00" / "report.json"
    assert ns["metrics_rows"] and ns["report"]


def test_notebook_pairs_a_run_only_with_an_evaluation_of_its_model(tmp_path, monkeypatch, capsys):
    root = tmp_path / "project"
    (root / "configs").mkdir(parents=True)
    (root / "notebooks").mkdir()
    runs, evals = root / "logs" / "train" / "runs", root / "logs" / "eval" / "runs"
    write_metrics(runs / "2026-01-01_10-00-00")
    write_metrics(runs / "2026-01-02_09-00-00")
    failed = runs / "2026-01-03_08-00-00"  # newest, but it failed: its log and config, no summary
    failed.mkdir()
    (failed / "config.yaml").write_text("seed: 0\n")
    (failed / "FAILED").write_text("this run did not finish: exit code 2\n")
    write_report(evals / "2026-01-02_12-00-00" / "report.json", evaluation_of("2026-01-02_09-00-00"))
    # the newest evaluation is of the older run's model: it must not be shown as the newest run's
    write_report(evals / "2026-01-04_12-00-00" / "report.json", evaluation_of("2026-01-01_10-00-00"))
    ns = run_notebook(monkeypatch, root / "notebooks")
    assert Path(ns["RUN_DIR"]) == runs / "2026-01-02_09-00-00"
    assert Path(ns["REPORT"]) == evals / "2026-01-02_12-00-00" / "report.json"
    assert "another model" not in capsys.readouterr().out

    # no evaluation of the run's model: none is shown, and the notebook says so
    (evals / "2026-01-02_12-00-00" / "report.json").unlink()
    ns = run_notebook(monkeypatch, root / "notebooks")
    assert ns["REPORT"] is None and not ns["report"]
    assert f"no evaluation of {(runs / '2026-01-02_09-00-00' / 'model').resolve()}" in capsys.readouterr().out

    # one named by hand that is of another model: shown, under a warning naming both models
    other = evals / "2026-01-04_12-00-00" / "report.json"
    ns = run_notebook(monkeypatch, root / "notebooks", report=other)
    out = capsys.readouterr().out
    assert Path(ns["REPORT"]) == other and "WARNING: the evaluation is of another model" in out
    assert "2026-01-01_10-00-00" in out.split("WARNING")[1] and "2026-01-02_09-00-00" in out.split("WARNING")[1]


def test_notebook_reads_relative_paths_from_the_project_root(tmp_path, monkeypatch):
    """`make notebook BPO_RUN_DIR=logs/train/runs/<run>` names paths from the project root, where make runs, while
    the kernel runs in notebooks/."""
    root = tmp_path / "project"
    (root / "configs").mkdir(parents=True)
    (root / "notebooks").mkdir()
    write_metrics(root / "logs" / "train" / "runs" / "old")
    write_metrics(root / "logs" / "train" / "runs" / "new", blind=False)
    write_report(root / "logs" / "eval" / "runs" / "old" / "report.json", full_report())
    run_dir, report = Path("logs/train/runs/old"), Path("logs/eval/runs/old/report.json")
    ns = run_notebook(monkeypatch, root / "notebooks", run_dir, report)
    assert Path(ns["RUN_DIR"]) == root / run_dir and Path(ns["REPORT"]) == root / report
    assert len(ns["metrics_rows"]) == 9 and ns["has_blind"] and ns["report"]["per_category"]


@pytest.mark.slow
def test_notebook_runs_headless_in_a_kernel(tmp_path):
    """`make notebook`'s executor: nbclient's `jupyter execute` (its console script's entry point) with a python3
    kernel, started from the repository root as the Makefile does; the kernel runs in notebooks/."""
    pytest.importorskip("nbclient", reason="the `notebook` extra is not installed (`make notebook` installs it)")
    pytest.importorskip("ipykernel", reason="the `notebook` extra is not installed (`make notebook` installs it)")
    import nbformat

    run_dir = write_metrics(tmp_path / "run")
    report = write_report(tmp_path / "eval" / "report.json", full_report())
    out = tmp_path / "executed.ipynb"
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kernel picks its own (inline) backend
    env |= {"BPO_RUN_DIR": str(run_dir), "BPO_REPORT": str(report)}
    cmd = [sys.executable, "-c", "from nbclient.cli import main; main()", "notebooks/analysis.ipynb", f"--output={out}"]
    done = subprocess.run(cmd, cwd=NOTEBOOK.parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    outputs = [o for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.text for o in outputs if o.get("name") == "stdout")
    assert f"RUN_DIR = {run_dir}" in text and f"REPORT  = {report}" in text
    assert "separation 0.100" in text and "co-defense both_safe: 0.400" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # the plots are in the executed copy
