"""Errors that a user fixes in their settings or data, and how anomalib's CLI reports them: one message, last.

In ``anomalib train/test/predict/export``, an uncaught exception is printed by rich's traceback hook (which
anomalib's CLI installs) as a box of some 140 lines, and a bad model argument reaches it wrapped by
jsonargparse in a ``Union`` error with a dump of every argument, so that the one line that says what to
change is hard to find. In the ``anomalib`` command, the start-up hook (``anomalib_cflow_plus_hook``) puts
:func:`install_cli_report` in front of rich's hook once anomalib's CLI module has loaded: if the uncaught exception
is, holds or quotes a :class:`CflowPlusError`, it prints only that error's message, as the last lines of the output;
any other exception keeps rich's report. Setting ``CFLOW_PLUS_TRACEBACK=1`` brings the full traceback back. In
Python (outside the CLI) nothing changes.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from pathlib import Path
from types import TracebackType

__all__ = [
    "TRACEBACK_VARIABLE",
    "CflowPlusError",
    "ConfigurationError",
    "NotCalibratedError",
    "find_user_error",
    "install_cli_report",
    "report",
    "running_anomalib_cli",
]

TRACEBACK_VARIABLE = "CFLOW_PLUS_TRACEBACK"
_RECENT_ERRORS: deque[CflowPlusError] = deque(maxlen=16)  # recent instances, to find one that jsonargparse quotes


class CflowPlusError(Exception):
    """An error in the user's settings or data; its message says what is wrong and what to do."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        _RECENT_ERRORS.append(self)  # jsonargparse may keep only its text: the CLI report finds it here


class ConfigurationError(CflowPlusError, ValueError):
    """A model argument that cannot work, e.g. ``lr <= 0`` or an unknown backbone."""


class NotCalibratedError(CflowPlusError, RuntimeError):
    """A model asked to score before it was fitted (or loaded from a checkpoint of a fitted one)."""


def running_anomalib_cli() -> bool:
    """Whether this process is anomalib's command line (the ``anomalib`` console script or ``anomalib.cli``)."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    return program.stem == "anomalib" or program.parts[-3:-1] == ("anomalib", "cli")


def find_user_error(error: BaseException) -> CflowPlusError | None:
    """Return the :class:`CflowPlusError` that ``error`` is, is caused by or quotes in its message, or ``None``."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        if isinstance(link, CflowPlusError):
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    text = str(error)  # jsonargparse's Union error keeps only the text of what the model raised
    return next((recent for recent in reversed(_RECENT_ERRORS) if str(recent) and str(recent) in text), None)


def report(error: CflowPlusError) -> str:
    """Return the text printed for ``error`` in place of the traceback."""
    return f"\n{type(error).__name__}: {error}\n\n(For the full traceback, set {TRACEBACK_VARIABLE}=1.)\n"


def install_cli_report() -> None:
    """Put :func:`report` in front of the current ``sys.excepthook`` (rich's, in anomalib's CLI), once."""
    previous = sys.excepthook
    if getattr(previous, "reports_cflow_plus_errors", False):
        return

    def excepthook(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> None:
        error = find_user_error(value)
        if error is None or os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            previous(kind, value, traceback)
            return
        sys.stderr.write(report(error))
        sys.stderr.flush()

    excepthook.reports_cflow_plus_errors = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook
