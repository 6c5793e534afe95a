#!/usr/bin/env bash
# The GPU check (perf/gpu_check.py): tiny model under sdpa / flex / eager on CUDA and one full-width BPO step,
# one JSON line; --dry-run composes and checks its configurations anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
exec "${PYTHON:-.venv/bin/python}" perf/gpu_check.py "$@"
