"""The worker subprocesses: which configurations run, one subprocess each, round-robin over ``--repeat`` rounds.

Every configuration runs in its own process so that its peak RSS is its own; the result comes back on stdout as
one line starting with RESULT_PREFIX.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from benchmarks.step.common import EPOCHS, EXTRAS, HEADLINE, OURS, RESULT_PREFIX, ROOT, setup_env
from benchmarks.step.ours import worker_ours_epoch, worker_ours_steps
from benchmarks.step.trl_side import worker_check, worker_trl_epoch, worker_trl_steps

SCRIPT = ROOT / "benchmarks" / "bench_step.py"  # run with ``--worker NAME`` for one configuration
CONFIGURATIONS = ("check", *HEADLINE, *EXTRAS, *EPOCHS)

WORKERS = {
    "trl_dpo": worker_trl_steps,
    "trl_dpo_epoch": worker_trl_epoch,
    "ours_bpo_epoch": worker_ours_epoch,
    "check": worker_check,
}


def run_worker(args: argparse.Namespace) -> None:
    setup_env()
    name = args.worker
    if name in WORKERS:
        result = WORKERS[name](args)
    elif name in OURS:
        result = worker_ours_steps(args, name)
    else:
        raise SystemExit(f"unknown worker {name!r}")
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def trl_available() -> str | None:
    try:
        import importlib.metadata as md

        import trl  # noqa: F401

        return md.version("trl")
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None


def configurations(args: argparse.Namespace, run_trl: bool) -> list[str]:
    """The workers to run, in order: the parity check first (before any timing), then the step rows, the extra
    rows and the epochs; TRL's rows only when ``run_trl``; ``--only`` keeps the named ones."""
    names = (["check"] if run_trl else []) + [n for n in HEADLINE if run_trl or not n.startswith("trl")]
    if not (args.quick or args.no_extras):
        names += list(EXTRAS)
    names += [n for n in EPOCHS if run_trl or not n.startswith("trl")]
    if args.only:
        names = [n for n in names if n in set(args.only.split(","))]
    return names


def spawn(name: str, args: argparse.Namespace, data: str) -> dict[str, Any] | None:
    """Run one worker subprocess; returns its result, or None (with its stderr tail shown) when it failed."""
    cmd = [sys.executable, str(SCRIPT), "--worker", name, "--data", data]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.profile:
        cmd.append("--profile")
    print(f"  running {name} ...", end=" ", flush=True, file=sys.stderr)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        print(f"FAILED (exit {proc.returncode})", file=sys.stderr)
        print("\n".join((proc.stderr or proc.stdout).splitlines()[-30:]), file=sys.stderr)
        return None
    print(f"done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def run_all(names: list[str], args: argparse.Namespace, data: str) -> dict[str, Any]:
    """Run every worker ``--repeat`` times, round-robin (TRL and ours alternate, so a burst of load from other
    processes hits both sides alike), and keep each configuration's fastest run (other processes only ever slow
    a run down); every run's time is listed under ``all_runs_s``."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for round_ in range(args.repeat):
        for name in names:
            if name == "check" and round_ > 0:
                continue
            result = spawn(name, args, data)
            if result is not None:
                runs[name].append(result)
    results: dict[str, Any] = {}
    for name, rs in runs.items():
        if not rs or name == "check":
            results[name] = rs[0] if rs else None
            continue
        key = "epoch_s" if name.endswith("_epoch") else "s_per_step"
        results[name] = min(rs, key=lambda r: r[key]) | {"all_runs_s": [round(r[key], 3) for r in rs]}
    return results
