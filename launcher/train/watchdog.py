"""Hang and straggler detection (``train.hang_timeout_s``): a per-rank heartbeat thread, stack dumps and one line.

The training loop marks where each rank is (:meth:`Watchdog.enter`: a phase name and the step; a few attribute
writes, no communication). A daemon thread per rank wakes every ``poll_s`` and

- publishes the rank's heartbeat (step, phase, when the phase began, now) in the job's key-value store (torch
  distributed's default store: under torchrun the agent hosts it, so a stopped worker does not block it);
- raises the alarm (sets ``hang`` in the store) when its own phase has lasted longer than the timeout (4x for
  the first step of a process, validation and checkpoint saves: ``slow`` phases);
- answers an alarm raised by any rank: it writes every thread's Python stack (``faulthandler``) to
  ``<run_dir>/hang/rank_N.txt`` and publishes its state. After a grace period the lowest rank that answered
  (rank 0 unless it is the one that stopped) prints one line: which ranks did not answer (stopped, dead or stuck
  outside Python, with their last heartbeat), where the others were, and where the stacks are; it writes
  ``<run_dir>/HUNG`` (the line; ``slurm/pretrain.sbatch`` requeues a job that failed with it). Every rank that
  answered then exits with :data:`HANG_EXIT_CODE` at once (its main thread is stuck in a collective or a step).

A rank that is stopped (SIGSTOP), dead or frozen inside C code cannot write its stack; the line names it instead.
Store keys carry the torchrun restart count, so a restarted job never sees a previous attempt's alarm.
"""
from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from launcher.errors import MoetronError, report

log = logging.getLogger(__name__)

HANG_EXIT_CODE = 75
"""EX_TEMPFAIL (sysexits.h): the input was fine and a retry may succeed."""
SLOW_PHASE_FACTOR = 4
HUNG_MARKER = "HUNG"


class HangError(MoetronError):
    """A phase of the run exceeded ``train.hang_timeout_s`` (the one line rank 0 prints)."""

    kind = "hang"
    exit_code = HANG_EXIT_CODE


@dataclass
class Beat:
    """One rank's heartbeat: where its main thread is (``step``, ``phase``, since wall time ``since``) at ``at``."""

    step: int
    phase: str
    since: float
    at: float

    def describe(self, now: float) -> str:
        return f"step {self.step} '{self.phase}' for {now - self.since:.1f} s"


class Watchdog:
    """The heartbeat thread of one rank (module docstring). ``store``: a ``torch.distributed.Store``-like object
    (``set``, ``get``, ``check``); ``exit``: how the process ends after a hang (``os._exit``; tests pass a
    recorder)."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, timeout_s: float, store,
                 exit: Callable[[int], None] = os._exit, poll_s: Optional[float] = None):
        self.run_dir, self.rank, self.world_size, self.timeout_s = Path(run_dir), rank, world_size, timeout_s
        self.store, self._exit = store, exit
        self.poll_s = poll_s or min(10.0, max(0.2, timeout_s / 10))
        self.grace_s = max(2.0, 5 * self.poll_s)
        self.prefix = f"moetron/watchdog/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self._phase: Optional[str] = None
        self._step, self._since, self._slow = 0, time.time(), False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.fired = threading.Event()

    # ------------------------------------------------------------ main thread
    def enter(self, phase: Optional[str], step: int, slow: bool = False) -> None:
        """The main thread starts ``phase`` of ``step`` (None: nothing is watched, e.g. between runs). ``slow``:
        allow SLOW_PHASE_FACTOR x the timeout."""
        self._phase, self._step, self._since, self._slow = phase, step, time.time(), slow

    def start(self) -> "Watchdog":
        self._beat()
        self._thread = threading.Thread(target=self._run, name="moetron-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    # ------------------------------------------------------------ thread
    def _key(self, name: str) -> str:
        return self.prefix + name

    def _beat(self) -> None:
        beat = Beat(self._step, self._phase or "between phases", self._since, time.time())
        self.store.set(self._key(f"beat/{self.rank}"), json.dumps(beat.__dict__))

    def _read(self, name: str) -> Optional[dict]:
        key = self._key(name)
        return json.loads(self.store.get(key)) if self.store.check([key]) else None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._beat()
            if not self.store.check([self._key("hang")]):
                limit = self.timeout_s * (SLOW_PHASE_FACTOR if self._slow else 1)
                if self._phase is None or time.time() - self._since <= limit:
                    continue
                self.store.set(self._key("hang"), str(self.rank))
            self._answer()
            return

    def _answer(self) -> None:
        """Dump this rank's stacks, publish its state, let the lowest answering rank report, then exit."""
        self.fired.set()
        beat = Beat(self._step, self._phase or "between phases", self._since, time.time())
        self._dump(beat)
        self.store.set(self._key(f"answer/{self.rank}"), json.dumps(beat.__dict__))
        deadline = time.time() + self.grace_s
        while time.time() < deadline and not self._all_answered():
            time.sleep(min(0.1, self.poll_s))
        answered = [r for r in range(self.world_size) if self.store.check([self._key(f"answer/{r}")])]
        if answered and answered[0] == self.rank:
            line = self._line(answered)
            self._write_marker(line)
            report(HangError(line))
            self.store.set(self._key("reported"), str(self.rank))
        else:  # wait (bounded) for the reporter's line before this process goes
            deadline = time.time() + self.grace_s
            while time.time() < deadline and not self.store.check([self._key("reported")]):
                time.sleep(min(0.1, self.poll_s))
        sys.stdout.flush()
        sys.stderr.flush()
        self._exit(HANG_EXIT_CODE)

    def _all_answered(self) -> bool:
        return self.store.check([self._key(f"answer/{r}") for r in range(self.world_size)])

    def _dump(self, beat: Beat) -> None:
        path = self.run_dir / "hang" / f"rank_{self.rank}.txt"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(f"rank {self.rank} of {self.world_size}, host {socket.gethostname()}, pid {os.getpid()}: "
                        f"{beat.describe(beat.at)} (train.hang_timeout_s={self.timeout_s:g})\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:
            log.warning(f"rank {self.rank}: cannot write '{path}' ({e.strerror}); its stacks follow on stderr")
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)

    def _line(self, answered: list[int]) -> str:
        """The hang report: the ranks that did not answer first (with their last heartbeat), then where the
        answering ranks were, grouped by step and phase."""
        now = time.time()
        silent = [r for r in range(self.world_size) if r not in answered]
        parts = []
        for rank in silent:
            last = self._read(f"beat/{rank}")
            where = (f"last heartbeat {now - last['at']:.1f} s ago, in step {last['step']} '{last['phase']}'"
                     if last else "no heartbeat at all")
            parts.append(f"rank {rank} did not answer (stopped, dead or stuck outside Python; {where})")
        groups: dict[tuple[int, str], list[int]] = {}
        beats = {r: Beat(**self._read(f"answer/{r}")) for r in answered}
        for rank, beat in beats.items():
            groups.setdefault((beat.step, beat.phase), []).append(rank)
        for (step, phase), ranks in sorted(groups.items()):
            longest = max(now - beats[r].since for r in ranks)
            parts.append(f"{_ranks(ranks)} in step {step} '{phase}' for up to {longest:.1f} s")
        return (f"no progress for over {self.timeout_s:g} s (train.hang_timeout_s): " + "; ".join(parts)
                + f"; stacks in {self.run_dir / 'hang'}/rank_N.txt; exiting with code {HANG_EXIT_CODE} "
                "(slurm/pretrain.sbatch requeues the job; resume continues from the last checkpoint)")

    def _write_marker(self, line: str) -> None:
        try:
            (self.run_dir / HUNG_MARKER).write_text(line + "\n")
        except OSError as e:
            log.warning(f"cannot write '{self.run_dir / HUNG_MARKER}' ({e.strerror})")


def _ranks(ranks: list[int]) -> str:
    shown = ",".join(map(str, ranks[:8])) + (f",... ({len(ranks)} ranks)" if len(ranks) > 8 else "")
    return ("rank " if len(ranks) == 1 else "ranks ") + shown


class Unwatched:
    """The watchdog of a run with train.hang_timeout_s=0 (and of a Trainer built without one): marks cost nothing
    and nothing watches them."""

    fired = threading.Event()

    def enter(self, phase: Optional[str], step: int, slow: bool = False) -> None:
        pass


@contextlib.contextmanager
def watching(run_dir: Path, timeout_s: float, rank: int, world_size: int):
    """The run's watchdog (``train.hang_timeout_s`` = ``timeout_s``; 0: one that does nothing) for the lifetime of
    the block; rank 0 removes a previous attempt's ``HUNG`` marker. Needs the default process group."""
    if rank == 0:
        (Path(run_dir) / HUNG_MARKER).unlink(missing_ok=True)
    if timeout_s <= 0:
        yield Unwatched()
        return
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()  # the rendezvous store: up while any worker is stopped
    dog = Watchdog(run_dir, rank, world_size, timeout_s, store).start()
    try:
        yield dog
    finally:
        dog.enter(None, 0)
        dog.stop()
