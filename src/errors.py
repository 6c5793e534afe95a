"""Errors the user fixes by changing a setting or a path, and how every entry point reports them."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class SettingError(ValueError):
    """A setting or path the user must fix; entry points report it as one line (no stack trace) and exit 2.

    ``label`` opens that line, so the user sees which kind of setting is wrong.
    """

    label = "setting error"


def setting_error_in(error: BaseException) -> SettingError | None:
    """The `SettingError` behind ``error``: itself, or the cause Hydra's instantiate wrapped in its own exception
    (whose message is a multi-line "Error in call to target ..."); None for any other error."""
    from hydra.errors import InstantiationException

    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error if isinstance(error, SettingError) else None


# set once an entry point's task runs: Hydra exits 1 for its own errors too (a misspelled config group, an override
# that does not parse), which come before the task starts, and `run_hydra` turns those into exit 2
_task = {"started": False}


def task_started() -> None:
    """Called as an entry point's task begins: from then on, exit 1 is the task's own (see `run_hydra`)."""
    _task["started"] = True


@contextmanager
def exit_on_setting_error(log: logging.Logger) -> Iterator[None]:
    """Around an entry point's work: a `SettingError` (however wrapped) becomes one error line and exit code 2."""
    task_started()
    try:
        yield
    except Exception as e:
        cause = setting_error_in(e)
        if cause is None:
            raise
        log.error("%s: %s", cause.label, " ".join(str(cause).split()))
        sys.exit(2)


def run_hydra(main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` entry point; an error Hydra reports before the task starts (a misspelled config group
    or option, an override that does not parse, a missing config) exits 2 like every setting error, not 1. Hydra
    has already printed its message (with the options of a misspelled group)."""
    try:
        main()
    except SystemExit as e:
        if e.code == 1 and not _task["started"]:
            sys.exit(2)
        raise


FAILED_MARK = "FAILED"  # written into the run folder of a run that did not finish


@contextmanager
def marked_if_failed(out_dir: str | Path, log: logging.Logger) -> Iterator[None]:
    """Around an entry point's task: a run that ends by an error, an exit code other than 0 or an interrupt leaves
    ``FAILED`` in its run folder (what ended it, in one line), so that a folder holding only its log and config does
    not pass for a finished run; tools that look for the newest run read only folders with a run summary."""
    try:
        yield
    except BaseException as e:
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        if isinstance(e, SystemExit):
            what = f"exit code {e.code} (the error is in the log above and in the run's .log file)"
        elif isinstance(e, KeyboardInterrupt):
            what = "interrupted"
        else:
            what = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
        folder = Path(out_dir)
        if folder.is_dir():
            (folder / FAILED_MARK).write_text(f"this run did not finish: {what}\n")
            log.info("run folder marked as failed: %s", folder / FAILED_MARK)
        raise
