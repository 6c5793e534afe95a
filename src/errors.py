"""Errors the user fixes by changing a setting or a path, and how every entry point reports them."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager


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


@contextmanager
def exit_on_setting_error(log: logging.Logger) -> Iterator[None]:
    """Around an entry point's work: a `SettingError` (however wrapped) becomes one error line and exit code 2."""
    try:
        yield
    except Exception as e:
        cause = setting_error_in(e)
        if cause is None:
            raise
        log.error("%s: %s", cause.label, " ".join(str(cause).split()))
        sys.exit(2)
