"""perf/gpu_check.sh is ready for a lent GPU: its --dry-run composes and checks every configuration it would
run (anywhere), and without a CUDA device the check itself says so instead of running on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT


def run(*args: str) -> subprocess.CompletedProcess:
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        ["bash", str(ROOT / "perf" / "gpu_check.sh"), *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_the_dry_run_checks_every_configuration(tmp_path):
    out = run("--dry-run", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["configs_checked"] == ["tiny_sdpa", "tiny_flex_attention", "tiny_eager", "llava_1_5_7b_4_layers"]
    assert result["dry_run"] is True and result["fits"] is True and 10 < result["plan_total_gb"] < 80


def test_without_cuda_the_check_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the check runs for real (bash perf/gpu_check.sh), not in a test")
    out = run("--out", str(tmp_path))
    assert out.returncode == 1 and "no CUDA device here" in out.stderr
