"""benchmarks/bench_step.py: its pieces time one step of ours in-process, and the table prints what it measured."""

import argparse
import math

import pytest

from benchmarks.step import data as bench_data
from benchmarks.step.common import BATCH_SIZE, LABELS, TINY
from benchmarks.step.data import make_data
from benchmarks.step.ours import worker_ours_steps
from benchmarks.step.report import print_table, summary
from benchmarks.step.runner import CONFIGURATIONS, configurations

COLUMNS = ["configuration", "s/step", "vs TRL", "median", "CPU s", "cores", "peak RSS MB", "RSS vs TRL", "load"]


def test_one_step_of_ours_starts_at_ln2_and_fills_its_table_row(tmp_path, capsys, monkeypatch):
    # the benchmark's model and data, smaller: 32 px images (64 image tokens, not 576), 20-token answers
    monkeypatch.setitem(TINY, "image_size", 32)
    monkeypatch.setattr(bench_data, "ANSWER_TOKENS", 20)
    data = make_data(tmp_path, n_records=BATCH_SIZE)  # one batch
    args = argparse.Namespace(data=data["path"], steps=1, warmup=0, profile=False)
    result = worker_ours_steps(args, "ours_dpo")
    # the benchmark's parity check: policy == (precomputed) reference at the first step, so the DPO loss is ln 2
    assert result["first_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert result["precompute_s"] > 0 and result["s_per_step"] > 0 and len(result["step_times"]) == 1

    capsys.readouterr()
    print_table({"ours_dpo": result})
    blank, header, rule, row = capsys.readouterr().out.splitlines()
    assert blank == ""
    # the columns in their order; the last one is "ref pre s"
    assert [c for c in COLUMNS if c in header] == COLUMNS and header.rstrip().endswith("ref pre s")
    assert [header.index(c) for c in COLUMNS] == sorted(header.index(c) for c in COLUMNS)
    assert rule == "-" * len(header) and len(row) == len(header)
    assert row.startswith(LABELS["ours_dpo"])
    assert row[len(header) - 10 :].strip() == f"{result['precompute_s']:.1f}"
    step, vs_trl = row[46:55].strip(), row[55:64].strip()
    assert step == f"{result['s_per_step']:.3f}" and vs_trl == ""  # no TRL row: no ratio

    headline = summary({"ours_dpo": result})
    assert headline["ours_dpo_s_per_step"] == round(result["s_per_step"], 4)
    assert headline["trl_dpo_s_per_step"] is None and headline["dpo_speedup_vs_trl"] is None


def test_configurations_without_trl_and_quick():
    args = argparse.Namespace(quick=True, no_extras=False, only=None)
    assert configurations(args, run_trl=False) == ["ours_dpo", "ours_bpo", "ours_bpo_epoch"]
    assert configurations(args, run_trl=True)[0] == "check"  # the parity check runs before any timing
    args = argparse.Namespace(quick=False, no_extras=False, only="ours_bpo,trl_dpo")
    assert configurations(args, run_trl=False) == ["ours_bpo"]
    assert set(configurations(argparse.Namespace(quick=False, no_extras=False, only=None), True)) == set(CONFIGURATIONS)
