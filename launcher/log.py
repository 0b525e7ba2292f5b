"""The console of every moetron command: one ``logging`` logger tree (``launcher.*``, each module's
``logging.getLogger(__name__)``), one handler, one format.

    [moetron] resumed from runs/smoke/checkpoints/step_0000060 at step 60     INFO / RESULT / DEBUG -> stdout
    step  60/120 | loss 5.1234 | ...                                          BARE records (data lines) -> stdout
    moetron: warning: data changed since the checkpoint ...                   WARNING -> stderr
    moetron: config error: optim.lr: -1.0 is outside the allowed range ...    ERROR (launcher.errors.report) -> stderr

Only the first line of a multi-line message carries the prefix (the rest is a block or a table). Records marked
``extra=BARE`` (the per-step progress line, ``PREEMPTED step=N``) are printed as they are, so scripts match them
from the start of the line. Python warnings (``warnings.warn``) take the same ``moetron: warning:`` form (they
are not records: every rank prints its own, as a rank's data loader may be the only one to notice).

Who prints what: rank 0 (torchrun's ``RANK``, read when a record is emitted) prints INFO and above by default,
RESULT and above with ``--quiet`` (the lines that are the command's answer: the run's ``done`` line, the evaluation
table, the preprocess and convert summaries), DEBUG and above with ``--verbose``. Every other rank prints errors
only: whatever they would say, rank 0 says once. The handler is installed on import, so library use (tests,
notebooks) prints like the default command; :func:`setup` sets the verbosity at a command's entry.

megatron-core's and torch's own loggers are not touched: their records go to Python's default handling (warnings
and above on stderr), minus the notices ``parallel/__init__.py`` filters out.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings

from launcher.env import rank

RESULT = logging.INFO + 5
"""Level of a command's answer: still printed with ``--quiet``."""
logging.addLevelName(RESULT, "RESULT")

BARE = {"bare": True}
"""``extra=`` for a record that is data, not a message: printed without the ``[moetron]`` prefix."""

ROOT = logging.getLogger("launcher")


class _Console(logging.Handler):
    """stdout below WARNING, stderr from WARNING; rank 0 down to ``ROOT``'s level, other ranks errors only. The
    streams are looked up per record, so a redirected ``sys.stdout`` (pytest, ``contextlib``) is honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.ERROR and rank() != 0:
            return
        try:
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's contract: a broken stream never raises into the caller
            self.handleError(record)


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"moetron: {message}"
        if record.levelno >= logging.WARNING:
            return f"moetron: warning: {message}"
        return message if getattr(record, "bare", False) else f"[moetron] {message}"


def _install() -> None:
    for handler in [h for h in ROOT.handlers if type(h).__name__ == "_Console"]:  # a reloaded module's
        ROOT.removeHandler(handler)
    handler = _Console()
    handler.setFormatter(_Format())
    ROOT.addHandler(handler)
    ROOT.propagate = False
    ROOT.setLevel(logging.INFO)
    warnings.formatwarning = lambda message, *args, **kwargs: f"moetron: warning: {message}\n"


_install()


def add_verbosity_flags(parser: argparse.ArgumentParser) -> None:
    """``-q/--quiet`` and ``-v/--verbose`` (mutually exclusive), read by :func:`setup`."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true",
                       help="print only warnings, errors and the command's result lines")
    group.add_argument("-v", "--verbose", action="store_true", help="also print debug details")


def setup(quiet: bool = False, verbose: bool = False) -> None:
    """Set this process's console verbosity (once, at a command's entry): ``quiet`` keeps warnings, errors and
    RESULT lines, ``verbose`` adds DEBUG lines. Ranks other than 0 print errors only either way."""
    ROOT.setLevel(RESULT if quiet else logging.DEBUG if verbose else logging.INFO)


def shows(level: int) -> bool:
    """Whether this process prints records of ``level`` (its rank and verbosity): lets a caller skip work that
    only feeds the console (a progress bar)."""
    return ROOT.isEnabledFor(level) and (level >= logging.ERROR or rank() == 0)
