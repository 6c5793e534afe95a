"""Files written whole: every report, cache, data set and image the project writes goes through here.

A file is written to a temporary name beside it and renamed over the target when complete, so a reader (or the
next run, after a crash or Ctrl-C) sees the old file or the new one, never half of one, and no temporary file is
left behind. New files get the permissions the user's umask gives (``tempfile.mkstemp`` would make them 0600).
A cache that concurrent jobs fill (the jobs of a sweep launched in parallel) is filled under `locked`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


@contextmanager
def replacing(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A fresh temporary path beside ``path`` (ending in ``suffix``: ".png" lets matplotlib tell the format) to
    write to; when the block ends normally it replaces ``path``, or, if nothing was written there, ``path`` is
    removed (no stale file from an earlier run stays beside the new ones). When the block raises, ``path`` is
    left as it was and the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}{suffix}"
    try:
        yield tmp
        if tmp.exists():
            os.replace(tmp, path)
        else:
            path.unlink(missing_ok=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` whole, flushed to disk before the rename; returns ``path``."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive inter-process lock for ``path`` (``flock`` on ``<name>.lock`` beside it), waiting for a
    job that holds it, so only one job at a time reads and fills a cache file. The lock file stays: removing it
    would let a waiting job lock a file that the next job no longer sees. Not reentrant: a second ``locked`` of
    the same path in one process waits for ever."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        try:
            f = stack.enter_context(open(path.parent / f"{path.name}.lock", "a"))  # closed: the lock is released
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("%s: another job is computing it; waiting for that job to finish", path)
                fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # a read-only folder, Lustre mounted without flock: the cache is right one job at a time
            log.warning("%s: not locked (%s): jobs running at the same time can both compute it", path, e)
        yield
