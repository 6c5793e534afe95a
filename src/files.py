"""Files written whole: every report, cache, data set and image the project writes goes through here; and what
keeps a path the user gave from being read as a file (`file_problem`, `read_regular`).

A file is written to a temporary name beside it and renamed over the target when complete, so a reader (or the
next run, after a crash or Ctrl-C) sees the old file or the new one, never half of one, and no temporary file is
left behind. New files get the permissions the user's umask gives (``tempfile.mkstemp`` would make them 0600).
A cache that concurrent jobs fill (the jobs of a sweep launched in parallel) is filled under `locked`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO

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


NOT_FOUND = "not found"
EMPTY = "an empty file"
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_problem(path: str | os.PathLike[str], max_bytes: int | None = None) -> str | None:
    """What keeps ``path`` from being read as a file of data, in words that follow "is" (None: nothing does).

    Looked at with ``os.stat`` only, which follows symbolic links, and never opened: a FIFO blocks a read for ever
    and /dev/zero never ends. ``NOT_FOUND`` (also a dangling link), "not a regular file (a directory)" and other
    kinds, "an empty file", "larger than N bytes" (over ``max_bytes``), "unreadable (<why>)".
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return NOT_FOUND
    except OSError as e:  # permission denied, a loop of links, a name too long
        return f"unreadable ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "an unusual kind of file")
        return f"not a regular file ({kind}{', through a symbolic link' if os.path.islink(path) else ''})"
    if st.st_size == 0:
        return EMPTY
    if max_bytes is not None and st.st_size > max_bytes:
        return f"larger than {max_bytes} bytes"
    return None


class FileRefused(OSError):
    """A path that is not read: its message is `file_problem`'s words (what the path is)."""


@contextmanager
def open_regular(path: str | os.PathLike[str], max_bytes: int | None = None) -> Iterator[BinaryIO]:
    """``path`` opened for reading in binary, where `file_problem` finds nothing against it; ``OSError`` naming the
    problem otherwise. Opened without blocking and looked at again once open, so a file swapped for a FIFO or a
    device between the look and the open is refused too, never read."""
    problem = file_problem(path, max_bytes)
    if problem is not None:
        raise FileRefused(problem)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (max_bytes is not None and st.st_size > max_bytes) or not st.st_size:
            raise FileRefused("not a regular file of an allowed size (changed while it was opened)")
        yield f


def read_regular(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` bytes (`open_regular`); never more are read."""
    with open_regular(path, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew since it was looked at
        raise FileRefused(f"larger than {max_bytes} bytes")
    return data
