"""Two jobs filling one cache at the same time, in a fixed order: the first, a forked process, is held inside its
first computation (holding the cache's lock, where there is one) until the second, in this process, waits for it
or has finished without waiting. Forked, the first job has the test's model and imports at once (spawned, it would
import torch and transformers again: seconds)."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

WAITING = "another job is computing it"


def held(fn: Callable[..., Any], started: Any, release: Any) -> Callable[..., Any]:
    """``fn``, but its calls first say they started and wait for the release (in the first job's process)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        started.set()
        release.wait(120)
        return fn(*args, **kwargs)

    return call


def race(first: Callable[..., None], args: tuple, second: Callable[[], Any], caplog: Any) -> tuple[Any, Any]:
    """(what the first job put on its queue, what ``second()`` returned); ``first(*args, started, release, queue)``
    runs in a forked process. ``caplog`` must capture src.files at INFO: the second job's waiting line."""
    ctx = multiprocessing.get_context("fork")
    started, release, queue = ctx.Event(), ctx.Event(), ctx.Queue()

    def first_job() -> None:
        torch.set_num_threads(1)  # as DataLoader workers do: a forked OpenMP thread pool can hang
        first(*args, started, release, queue)

    def release_when_waiting() -> None:  # torch runs in the main thread only: a pool used by a thread breaks forks
        while not release.is_set():
            if any(WAITING in r.getMessage() for r in caplog.records):
                release.set()
            time.sleep(0.05)

    proc = ctx.Process(target=first_job)
    proc.start()
    try:
        while not started.wait(0.1):
            assert proc.is_alive(), "the first job failed before its computation"
        threading.Thread(target=release_when_waiting, daemon=True).start()
        out = second()
        release.set()  # the second job did not wait (no lock): the first goes on now
        result = queue.get(timeout=120)
        proc.join(120)
    finally:
        release.set()
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0, "the first job failed"
    return result, out
