"""Rank/world discovery: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or a plain single process.

Under Slurm, slurm/pretrain.sbatch runs one torchrun per node, so torchrun's variables are always what we read.
A plain `python -m launcher.pretrain` gets a one-rank world on a free loopback port, so the same code path
(process groups, collectives, distributed checkpoints) runs everywhere.

Workers never outlive their launcher: a torchrun worker asks the kernel for SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``, Linux) and a watchdog thread checks the parent pid every second as a fallback
(other systems, or a parent that died before the prctl). Process-group creation and every collective time out
after ``MOETRON_DIST_TIMEOUT_MINUTES`` (default 10, megatron-core's default) instead of torch's 30 minutes.
CPU runs get one intra-op thread count per rank (:func:`cpu_threads`): a single process under load otherwise
spins torch's default threads against other work (torchrun already sets ``OMP_NUM_THREADS=1`` per worker).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:
    from parallel.groups import ParallelGroups


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


DIST_TIMEOUT_MINUTES = 10
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LAUNCHER_PID = os.getppid()
"""This process's parent when this module was first imported (the entry points import it before anything heavy):
a launcher that dies before :func:`exit_with_parent` runs is noticed even when a subreaper, not init, adopts us."""


def dist_timeout_minutes() -> int:
    """Timeout of process-group creation (rendezvous) and of every collective, in minutes."""
    return int(os.environ.get("MOETRON_DIST_TIMEOUT_MINUTES", DIST_TIMEOUT_MINUTES))


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """SIGKILL this process when ``parent_pid`` (its launcher) dies: ``PR_SET_PDEATHSIG`` where Linux offers it,
    plus a daemon thread that polls ``os.getppid()`` (a dead parent means re-parenting to init or a subreaper)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGKILL)

    if parent_pid == 1 or os.getppid() != parent_pid:  # died before the prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, name="moetron-parent-watchdog", daemon=True).start()


def ensure_single_process_env() -> None:
    """Fill in a one-rank world when not launched by torchrun."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def cpu_threads(requested: Optional[int] = None) -> Optional[tuple[int, str]]:
    """(intra-op threads per rank, where the number comes from) for a CPU run, or None where CUDA is available (GPU
    runs keep torch's default). ``requested`` (``train.cpu_threads``) wins; else ``OMP_NUM_THREADS`` when set to a
    positive integer; else the cores this process may use (``os.sched_getaffinity``) // ``LOCAL_WORLD_SIZE``, at
    least 1, so the ranks of one node do not oversubscribe it."""
    import torch

    if torch.cuda.is_available():
        return None
    if requested is not None:
        return requested, "train.cpu_threads"
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    cores, local = len(os.sched_getaffinity(0)), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // local), f"auto: {cores} core(s) / {local} rank(s) on this node"


def apply_cpu_threads(requested: Optional[int] = None) -> None:
    """``torch.set_num_threads`` to :func:`cpu_threads`' number on a CPU run; nothing where CUDA is available."""
    threads = cpu_threads(requested)
    if threads is not None:
        import torch

        torch.set_num_threads(threads[0])


@contextlib.contextmanager
def parallel_session(tp: int, pp: int, ep: int, backend: str = "auto",
                     cpu_threads: Optional[int] = None) -> Iterator["ParallelGroups"]:
    """The default process group (torchrun's, or a one-rank world) plus megatron-core's TP/PP/EP/DP groups,
    torn down on exit. A default group that already existed (tests, notebooks) is left in place. On CPU runs
    this process gets :func:`cpu_threads` intra-op threads (``cpu_threads``: ``train.cpu_threads``)."""
    if launched_by_torchrun():  # first: an orphan must not spend its start-up importing megatron-core
        exit_with_parent(_LAUNCHER_PID)
    import torch.distributed as dist

    from parallel import groups as pgroups

    ensure_single_process_env()
    apply_cpu_threads(cpu_threads)
    created = not dist.is_initialized()
    pgroups.init_distributed(backend, timeout_minutes=dist_timeout_minutes())
    try:
        groups = pgroups.initialize(tp, pp, ep)
        logging.getLogger(__name__).debug(
            f"{groups.world_size} rank(s), backend {dist.get_backend()}, TP {tp} x PP {pp} x DP {groups.dp_size}, "
            f"EP {ep}; collectives time out after {dist_timeout_minutes()} min")
        yield groups
    finally:
        pgroups.destroy()
        if created and dist.is_initialized():
            dist.destroy_process_group()


def cuda_connection_default() -> None:
    """``CUDA_DEVICE_MAX_CONNECTIONS=1`` unless set: megatron-core's TP layers rely on one hardware queue to overlap
    their gradient all-reduce with the weight-gradient GEMM (and warn on every rank without it). slurm/env.sh sets
    it the same way; call before CUDA is initialised."""
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
