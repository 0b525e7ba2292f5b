"""Stopping a run on a signal: SIGUSR2/SIGTERM (Slurm preemption, torchrun's shutdown) and Ctrl-C, with a checkpoint."""
from __future__ import annotations

import contextlib
import logging
import signal

log = logging.getLogger(__name__)


class Preemption:
    """SIGUSR2/SIGTERM and a first Ctrl-C (SIGINT) set a flag; every step OR-reduces it over all ranks (inside the
    step's one all-reduce, ``launcher.train.step_reduce``) so they stop together after saving a checkpoint. A second
    Ctrl-C stops at once (KeyboardInterrupt), except inside a checkpoint save the trainer holds (:meth:`holding`):
    then it stops as soon as that save is committed, so the checkpoint the first Ctrl-C asked for is kept; a third
    stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._in_save = 0
        self._stop_after_save = False
        for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if signum == signal.SIGINT:
            if self.requested and self._in_save and not self._stop_after_save:
                self._stop_after_save = True
                log.warning("Ctrl-C during a checkpoint save: stopping as soon as it is written (Ctrl-C again: stop "
                            "now, without it)")
                return
            if self.requested:
                raise KeyboardInterrupt
            log.warning("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again: stop now, without one)")
        self.requested = True

    @contextlib.contextmanager
    def holding(self):
        """A checkpoint save runs in the block (re-entrant): a second Ctrl-C waits for the end of the outermost
        block, then raises KeyboardInterrupt."""
        self._in_save += 1
        try:
            yield
        finally:
            self._in_save -= 1
        if self._stop_after_save and not self._in_save:
            raise KeyboardInterrupt
