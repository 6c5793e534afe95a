"""The worker subprocesses: which configurations run, one subprocess each, round-robin over ``--repeat`` rounds.

Every configuration runs in its own process so that its peak RSS is its own; the result comes back on stdout as
one line starting with RESULT_PREFIX.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from perf.step.common import (
    END_TO_END,
    EPOCHS,
    EXTRAS,
    HEADLINE,
    OURS,
    RESULT_PREFIX,
    ROOT,
    SWEEP_BETAS,
    SWEEPS,
    setup_env,
)
from perf.step.endtoend import worker_ours_end_to_end, worker_ours_sweep_job
from perf.step.ours import worker_ours_epoch, worker_ours_steps
from perf.step.trl_side import worker_check, worker_trl_epoch, worker_trl_steps

SCRIPT = ROOT / "perf" / "bench_step.py"  # run with ``--worker NAME`` for one configuration
CONFIGURATIONS = ("check", *HEADLINE, *EXTRAS, *EPOCHS, END_TO_END, *SWEEPS)

WORKERS = {
    "trl_dpo": worker_trl_steps,
    "trl_dpo_epoch": worker_trl_epoch,
    "ours_bpo_epoch": worker_ours_epoch,
    "check": worker_check,
    END_TO_END: worker_ours_end_to_end,
    "trl_dpo_sweep_job": worker_trl_epoch,  # an epoch with the job's beta, the model build timed too (job_s)
    "ours_bpo_sweep_job": worker_ours_sweep_job,
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
    rows, the epochs, BPO end to end and the sweeps (not under ``--quick``; at real widths the check and the step
    rows only); TRL's rows only when ``run_trl``; ``--only`` keeps the named ones."""
    names = (["check"] if run_trl else []) + [n for n in HEADLINE if run_trl or not n.startswith("trl")]
    if not (args.quick or args.no_extras):
        names += list(EXTRAS)
    if not getattr(args, "no_epochs", False):
        names += [n for n in EPOCHS if run_trl or not n.startswith("trl")]
    if not getattr(args, "no_end_to_end", False):
        names.append(END_TO_END)
    if not (args.quick or getattr(args, "no_sweep", False)):
        names += [n for n in SWEEPS if run_trl or not n.startswith("trl")]
    if args.only:
        names = [n for n in names if n in set(args.only.split(","))]
    return names


def spawn(name: str, args: argparse.Namespace, data: str, extra: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """Run one worker subprocess; returns its result, or None (with its stderr tail shown) when it failed."""
    cmd = [sys.executable, str(SCRIPT), "--worker", name, "--data", data]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--blind-tokens", str(args.blind_tokens)]
    cmd += ["--blind-batch-size", str(args.blind_batch_size), "--widths", args.widths]
    cmd += ["--text-layers", str(args.text_layers), *extra]
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


def run_all(
    names: list[str], args: argparse.Namespace, data: str, on_result: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Run every worker ``--repeat`` times, round-robin (TRL and ours alternate, so a burst of load from other
    processes hits both sides alike), and keep each configuration's fastest run (other processes only ever slow
    a run down); every run's time is listed under ``all_runs_s``. ``on_result(runs)`` is called after every
    worker with the runs so far (the driver saves them: an interrupted run keeps what it measured)."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}

    def keep(name: str, result: dict[str, Any] | None) -> None:
        if result is not None:
            runs[name].append(result)
            if on_result is not None:
                on_result(runs)

    for round_ in range(args.repeat):
        for name in names:
            if (name == "check" and round_ > 0) or name in SWEEPS:
                continue
            keep(name, spawn(name, args, data))
        sweeps = [n for n in SWEEPS if n in names]
        for name, result in (run_sweeps(sweeps, args, data) if sweeps else {}).items():
            keep(name, result)
    results: dict[str, Any] = {}
    for name, rs in runs.items():
        if not rs or name == "check":
            results[name] = rs[0] if rs else None
            continue
        key = "sweep_s" if name in SWEEPS else "epoch_s" if name.endswith(("_epoch", "_end_to_end")) else "s_per_step"
        results[name] = min(rs, key=lambda r: r[key]) | {"all_runs_s": [round(r[key], 3) for r in rs]}
    return results


def run_sweeps(names: list[str], args: argparse.Namespace, data: str) -> dict[str, dict[str, Any] | None]:
    """The 4-job sweeps, one beta of SWEEP_BETAS per job and one process per job, TRL's and ours alternating.

    Our jobs share one fresh cache folder, as a Hydra multirun's jobs share ``paths.cache_dir``: job 1 generates the
    blind answers and computes the reference log-probs, jobs 2-4 read them (their worker asserts it). A sweep's
    time, ``sweep_s``, is the sum of its jobs' ``job_s`` (model build to the end of the epoch); a sweep with a
    failed job is None."""
    jobs: dict[str, list[dict[str, Any] | None]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as cache:
        for k, beta in enumerate(SWEEP_BETAS, 1):
            for name in names:
                extra = ("--beta", str(beta), "--sweep-job", str(k), "--cache-dir", cache)
                jobs[name].append(spawn(name + "_job", args, data, extra))
    return {
        name: None
        if any(r is None for r in rs)
        else {"sweep_s": sum(r["job_s"] for r in rs), "jobs": rs, "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
        for name, rs in jobs.items()
    }
