"""The ONE place where megatron-core 0.19.2 is adapted to CPU-only machines (gloo). Never active with CUDA.

moetron uses megatron-core for process groups, tensor-parallel layers, vocab-parallel cross-entropy and
``dist_checkpointing``. Of those, only checkpoint *saving* assumes CUDA. Patches (each names the line it works
around; tests/parallel/test_cpu_compat.py reproduces the original failure, so an upgrade that fixes one shows):

1. ``torch.cuda.synchronize()`` is called unconditionally after host copies in
   ``dist_checkpointing/strategies/filesystem_async.py:241`` (``FileSystemWriterAsync.preload_tensors``); on a
   machine without CUDA it raises. Without CUDA there is nothing to synchronise: it becomes a no-op.
2. ``filesystem_async.py:65`` (``get_write_results_queue``) starts a ``multiprocessing`` Manager in *spawn*
   mode just to collect write results from writer *threads* of the same process (synchronous save). Spawning
   re-imports the launching script and hangs in interpreters started from a forkserver (our test worlds) or
   without an import guard. A thread-safe ``queue.Queue`` carries the same results. moetron never uses
   megatron's asynchronous (cross-process) save on CPU, so nothing else reads that queue.
3. ``torch.cuda.current_device()`` places the failure flag of a save on the GPU
   (``dist_checkpointing/strategies/state_dict_saver.py:252``); without CUDA it raises. It returns ``"cpu"``,
   which every ``device=`` argument accepts.
"""
from __future__ import annotations

import queue

import torch

_APPLIED = False


def needed() -> bool:
    return not torch.cuda.is_available()


def _noop_synchronize(device=None) -> None:  # noqa: ARG001 - same signature as torch.cuda.synchronize
    """Patch 1: nothing to wait for without CUDA."""


def _cpu_current_device() -> str:
    """Patch 3: the only device there is."""
    return "cpu"


def _thread_results_queue(mp_mode: str = "spawn") -> queue.Queue:  # noqa: ARG001
    """Patch 2: one in-process queue, like megatron's module-level singleton."""
    global _RESULTS_QUEUE
    if _RESULTS_QUEUE is None:
        _RESULTS_QUEUE = queue.Queue()
    return _RESULTS_QUEUE


_RESULTS_QUEUE: queue.Queue | None = None


def apply() -> bool:
    """Install the CPU patches once; returns whether they are active (False on CUDA machines)."""
    global _APPLIED
    if not needed():
        return False
    if _APPLIED:
        return True
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    torch.cuda.synchronize = _noop_synchronize
    torch.cuda.current_device = _cpu_current_device
    filesystem_async.get_write_results_queue = _thread_results_queue
    _APPLIED = True
    return True
