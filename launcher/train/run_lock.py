"""One run per run directory: a second ``pretrain`` on a directory in use is one line, exit code 2.

Rank 0 holds an OS advisory lock (``fcntl.flock``, exclusive) on ``<dir>/.moetron.lock`` for the life of the run,
for the run directory and for ``checkpoint.dir`` when it lies outside it. The file also records the holder (host,
pid, the process's start time, the job's id, Slurm job id and restart count), and the holder touches it every
:data:`REFRESH_S` seconds, because ``flock`` is not enough on every shared file system (some NFS and Lustre mounts
lock per node only, or not at all). So a lock is taken only when

- ``flock`` grants it (or the file system does not support it), and
- the recorded holder is not this job and is gone: on this host, its pid is not running with the recorded start
  time (a reused pid does not count as alive); on another host, which cannot be asked, it is the previous attempt
  of the same Slurm job (a requeue), or it has not touched the file for :data:`STALE_S` seconds. A lock from
  another host that is fresher than that is refused with how long to wait; delete the file if you know that run
  is gone.

A stale lock is taken over with a warning naming the dead holder. After rank 0 holds the lock, the local rank 0 of
every other node reads the record through its own view of the directory and refuses to start unless it names this
job: a run directory that is not on a file system shared by every node (or that another job holds as seen from
there) stops the run before anything is written. A clean exit empties the record (the file stays: deleting it
could let two runs lock different files of the same name).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from launcher.errors import MoetronError

log = logging.getLogger(__name__)

LOCK_NAME = ".moetron.lock"
REFRESH_S = 30.0
STALE_S = 300.0


class RunDirLocked(MoetronError):
    """The run directory is in use by another run (or not shared by every node of this one). ``prints_here``:
    whether this rank found it and prints the line (the job's other ranks exit with the same code, silently)."""

    kind = "run"

    def __init__(self, message: str, prints_here: bool = True):
        super().__init__(message)
        self.prints_here = prints_here


def _process_start(pid: int) -> str:
    """The start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), "" where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    start: str
    job: str
    slurm_job: str
    slurm_restart: int
    since: str

    @classmethod
    def this_process(cls, job: str) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()), job,
                   os.environ.get("SLURM_JOB_ID", ""), int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
                   time.strftime("%Y-%m-%d %H:%M:%S"))

    def describe(self) -> str:
        slurm = f", Slurm job {self.slurm_job}" if self.slurm_job else ""
        return f"host {self.host}, pid {self.pid}{slurm}, since {self.since}"

    def alive_here(self) -> bool:
        """On this host: whether the recorded process still runs (same pid and start time)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process
            pass
        return not self.start or _process_start(self.pid) == self.start


def read_holder(path: Path) -> Optional[Holder]:
    """The holder recorded in lock file ``path``; None when it is empty, missing or unreadable (free)."""
    try:
        return Holder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _refusal(directory: Path, holder: Holder, extra: str = "") -> RunDirLocked:
    return RunDirLocked(f"'{directory}' is in use by another moetron run ({holder.describe()}{extra}): wait for it "
                        "to finish or stop it, or give this run another logging.run_dir (and checkpoint.dir)")


class RunLock:
    """The lock of one directory, held by this process (module docstring)."""

    def __init__(self, directory: Path, job: str):
        self.directory, self.path = directory, directory / LOCK_NAME
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirLocked(f"cannot create the lock file '{self.path}' ({e.strerror}): logging.run_dir and "
                               "checkpoint.dir must be writable directories") from None
        self._stop = threading.Event()
        try:
            self._take(job)
        except BaseException:
            os.close(self.fd)
            raise
        threading.Thread(target=self._refresh, name="moetron-run-lock", daemon=True).start()

    def _take(self, job: str) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(self.path)
            raise _refusal(self.directory, holder) if holder else RunDirLocked(
                f"'{self.directory}' is locked by another moetron run that is starting ({self.path}): wait for it, "
                "or give this run another logging.run_dir") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log.debug(f"{self.directory}: this file system has no flock; the lock record alone guards it")
        me = Holder.this_process(job)
        holder = read_holder(self.path)
        if holder is not None and holder.job != job:
            self._check_gone(holder, me)
            log.warning(f"taking over the stale lock of '{self.directory}' from a run that is gone "
                        f"({holder.describe()})")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(asdict(me)).encode(), 0)
        os.fsync(self.fd)

    def _check_gone(self, holder: Holder, me: Holder) -> None:
        """Raise RunDirLocked unless the recorded ``holder`` is gone (module docstring)."""
        if holder.host == me.host:
            if holder.alive_here():
                raise _refusal(self.directory, holder)
            return
        if holder.slurm_job and holder.slurm_job == me.slurm_job and holder.slurm_restart < me.slurm_restart:
            return  # the previous attempt of this Slurm job: Slurm ended it before requeueing
        age = time.time() - os.stat(self.path).st_mtime
        if age < STALE_S:
            raise _refusal(self.directory, holder, f"; its lock was refreshed {age:.0f} s ago and counts as stale "
                           f"{STALE_S:.0f} s after that, or delete {self.path} if you know that run is gone")

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                os.utime(self.path)
            except OSError as e:
                log.warning(f"cannot refresh the run lock '{self.path}' ({e.strerror})")

    def release(self) -> None:
        """Empty the record (the directory is free) and drop the lock."""
        self._stop.set()
        try:
            os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)  # closing drops the flock


def check_node_view(directory: Path, job: str) -> Optional[str]:
    """For a node's local rank 0 (other than global rank 0): why this node's view of ``directory`` is not locked by
    ``job``, or None when it is."""
    holder = read_holder(directory / LOCK_NAME)
    if holder is not None and holder.job == job:
        return None
    host = socket.gethostname()
    if holder is None:
        return (f"'{directory}' as seen from host {host} holds no lock of this run: logging.run_dir and "
                "checkpoint.dir must be on a file system shared by every node")
    return _refusal(directory, holder, f"; as seen from host {host}").args[0]


def directories(run_dir: str, checkpoint_dir: Optional[str]) -> list[Path]:
    """What a run locks: its run directory, and ``checkpoint.dir`` when set outside it."""
    run = Path(run_dir)
    out = [run]
    if checkpoint_dir is not None:
        ckpt = Path(checkpoint_dir)
        if not ckpt.resolve().is_relative_to(run.resolve()):
            out.append(ckpt)
    return out


@contextlib.contextmanager
def holding(dirs: list[Path]) -> Iterator[None]:
    """Every rank of the job: rank 0 locks ``dirs`` for the block (module docstring), then every other node's local
    rank 0 checks its view of them. Collective; raises RunDirLocked on every rank when the job may not start."""
    import torch
    import torch.distributed as dist

    rank = dist.get_rank()
    locks: list[RunLock] = []
    shared: list = [uuid.uuid4().hex, None]
    if rank == 0:
        try:
            for d in dirs:
                locks.append(RunLock(d, shared[0]))
        except RunDirLocked as e:
            shared[1] = str(e)
            for lock in locks:
                lock.release()
            locks = []
    dist.broadcast_object_list(shared, src=0)
    job, error = shared
    if error is not None:
        raise RunDirLocked(error, prints_here=rank == 0)
    try:
        problem = None
        if rank != 0 and os.environ.get("LOCAL_RANK", "0") == "0":
            problem = next(filter(None, (check_node_view(d, job) for d in dirs)), None)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        failed = torch.tensor([int(problem is not None)], device=device)
        dist.all_reduce(failed)
        if failed.item():
            raise RunDirLocked(problem or "another node found the run directory unusable",
                               prints_here=problem is not None)
        yield
    finally:
        for lock in locks:
            lock.release()
