"""`make rehearse`: every run it makes composes as train.py composes it, and its plan_error is the error of the plan
fitted on 1 and 2 layers at 3 (the runs themselves take minutes each: `make rehearse ARGS=--quick`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from perf.rehearse import overrides, plan_error
from src.settings import TRAIN, check_ranges
from tests.helpers import compose_config


@pytest.mark.parametrize(
    ("reference", "checkpointing"),
    [("precomputed", "false"), ("frozen_copy", "false"), ("adapters_disabled", "false"), ("precomputed", "selective")],
)
def test_each_run_composes_at_the_real_widths(tmp_path, reference, checkpointing):
    args = overrides(3, reference, checkpointing, Path("mmsafe.json"), tmp_path)
    cfg = compose_config("train", [a for a in args if not a.startswith("hydra.")])
    check_ranges(cfg, TRAIN)
    assert cfg.model.shapes.text.hidden_size == 4096 and cfg.model.shapes.text_layers == 3
    assert cfg.data.max_length == 768 and cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == 8
    assert cfg.reference.strategy == reference and cfg.model.lora.enabled == (reference == "adapters_disabled")


def run(layers, plan, peak, reference="precomputed", checkpointing="false"):
    return {
        "text_layers": layers,
        "reference": reference,
        "checkpointing": checkpointing,
        "plan_gb": plan,
        "peak_gb": peak,
    }


def test_plan_error_is_the_fitted_predictions_error_at_three_layers():
    # measured = 1 + 0.5 * plan on 1 and 2 layers; at 3 layers the line predicts 1 + 0.5 * 16 = 9, measured 10
    summary = plan_error([run(1, 8, 5), run(2, 12, 7), run(3, 16, 10)])
    assert summary["predicted_3_layers_gb"] == 9 and summary["plan_error"] == -0.1
    assert summary["unfitted_plan_error"] == 0.6 and summary["hidden_size"] == 4096
    assert plan_error([run(1, 8, 5), run(2, 12, 7)])["plan_error"] is None
    # the full rehearsal's other 2-layer runs (another reference, checkpointing) do not take the fit's place
    others = [
        run(2, 15, 9, "frozen_copy"),
        run(2, 12, 6, checkpointing="true"),
        run(2, 12, 6.5, "precomputed", "selective"),
    ]
    full = plan_error([run(1, 8, 5), run(2, 12, 7), run(3, 16, 10), *others])
    assert full == summary


def test_tokens_trained_is_the_last_logged_count(tmp_path):
    from perf.rehearse import tokens_trained

    assert tokens_trained(tmp_path) is None
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("step,train/tokens,val/x\n0,1500.0,\n1,,0.5\n1,3100.0,\n")
    assert tokens_trained(tmp_path) == 3100
