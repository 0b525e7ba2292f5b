"""Progress of long commands (preprocess, convert): a tqdm bar on a terminal; elsewhere (Slurm logs, pipes) one
line every ``interval_s`` seconds and one at the end, so a log shows the command is alive without a bar's escapes;
nothing with ``--quiet`` or on a rank other than 0 (``launcher.log``).

    with progress(total_bytes, "tokenize", unit="B") as bar:
        bar.update(n)
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Optional

from launcher import log


class _Silent:
    """The same surface, printing nothing."""

    def update(self, n: float) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc) -> None:
        pass


class _Lines:
    """tqdm's ``update`` / context-manager surface, printing ``desc: 42% (1.2M/2.9M B)`` lines."""

    def __init__(self, total: float, desc: str, unit: str, interval_s: float, stream):
        self.total, self.desc, self.unit, self.interval_s, self.stream = total, desc, unit, interval_s, stream
        self.n, self._last, self._printed = 0.0, time.monotonic(), None

    def update(self, n: float) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.interval_s:
            self._print()

    def _print(self) -> None:
        self._last, self._printed = time.monotonic(), self.n
        pct = f"{100 * self.n / self.total:.0f}%" if self.total else "-"
        print(f"{self.desc}: {pct} ({_si(self.n)}/{_si(self.total)} {self.unit})", file=self.stream, flush=True)

    def __enter__(self) -> "_Lines":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None and self._printed != self.n:
            self._print()


def _si(x: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(x) < 1000:
            return f"{x:.3g}{unit}"
        x /= 1000
    return f"{x:.3g}P"


def progress(total: float, desc: str, unit: str = "it", interval_s: float = 30.0, stream=None,
             terminal: Optional[bool] = None):
    """A progress reporter over ``total`` units on ``stream`` (stderr): tqdm when it is a terminal (or
    ``terminal=True``), periodic lines otherwise; silent where INFO lines are not shown."""
    if not log.shows(logging.INFO):
        return _Silent()
    stream = stream or sys.stderr
    if terminal if terminal is not None else stream.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=stream, mininterval=0.5)
    return _Lines(total, desc, unit, interval_s, stream)
