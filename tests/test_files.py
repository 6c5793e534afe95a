"""Files written whole (src/files.py): the old file or the new one, never half of one, nothing left behind."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import threading
import time

import pytest

from src.files import locked, replacing, write_atomic


def test_write_atomic_writes_text_as_utf8_and_bytes_as_given(tmp_path):
    assert write_atomic(tmp_path / "sub" / "a.json", "ä\n") == tmp_path / "sub" / "a.json"
    write_atomic(tmp_path / "b.bin", b"\x00\xff")
    assert (tmp_path / "sub" / "a.json").read_bytes() == "ä\n".encode()
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.json", "b.bin", "sub"]


def test_a_write_that_fails_half_way_leaves_the_old_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(OSError, match="disk full"), replacing(target) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_block_that_writes_nothing_removes_the_stale_file(tmp_path):
    target = tmp_path / "comparison.png"
    target.write_bytes(b"old figure")
    with replacing(target, suffix=".png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp.name.startswith(".comparison.png.")
    assert not target.exists() and not list(tmp_path.iterdir())


def test_new_files_get_the_permissions_the_umask_gives(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "data.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "data.json").stat().st_mode) == 0o644  # readable by others, as open() makes it


def test_a_second_locker_waits_for_the_first_and_says_once_what_it_waits_for(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="src.files")
    target = tmp_path / "cache" / "reference.json"  # folders made as needed
    order = []

    def second():
        with locked(target):
            order.append("second")

    def waiting():
        return [r.getMessage() for r in caplog.records if "another job is computing it" in r.getMessage()]

    with locked(target):
        thread = threading.Thread(target=second)
        thread.start()
        for _ in range(200):  # until the second locker says it waits (10 s at most)
            if waiting():
                break
            time.sleep(0.05)
        time.sleep(0.2)  # it stays waiting while the lock is held
        order.append("first")
    thread.join(10)
    assert order == ["first", "second"]
    assert waiting() == [f"{target}: another job is computing it; waiting for that job to finish"]
    assert (tmp_path / "cache" / "reference.json.lock").exists() and not target.exists()


def test_a_file_system_without_locks_is_said_and_the_block_still_runs(tmp_path, caplog, monkeypatch):
    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with locked(tmp_path / "blind.jsonl"):
        ran = True
    assert ran
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{tmp_path / 'blind.jsonl'}: not locked ([Errno {errno.ENOLCK}] No locks available): jobs running at the "
        "same time can both compute it"
    ]
