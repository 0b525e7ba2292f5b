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
   (``dist_checkpointing/strategies/state_dict_saver.py:252``), and the sequence-parallel all-gather and
   reduce-scatter their outputs (``tensor_parallel/mappings.py:145/182``); without CUDA it raises. It returns
   ``"cpu"``, which every ``device=`` argument accepts.
4. The distributed optimizer and its gradient buffers create small tensors with a literal ``device='cuda'``
   (``optimizer/optimizer.py:702`` ``_scale_one``, ``optimizer/clip_grads.py:96/108/180``, ``utils.py:1332``
   ``local_multi_tensor_l2_norm``) and order work on CUDA streams (``distributed/param_and_grad_buffer.py:632``
   ``torch.cuda.current_stream()``). Those modules get a ``torch`` whose tensor factories map the device
   ``cuda`` to ``cpu`` and whose ``torch.cuda.current_stream()`` / ``torch.cuda.stream()`` are no-op stand-ins
   (there is one stream on a CPU); every other name is torch's own.
5. The distributed optimizer tells parameter dtypes apart by CUDA type names
   (``optimizer/distrib_optimizer.py:401/466`` ``model_param.type() in ['torch.cuda.HalfTensor', ...]``, also
   ``:758``) and ``clip_grads.py:174`` asserts ``param.grad.type() == 'torch.cuda.FloatTensor'``; CPU tensors are
   named ``torch.BFloat16Tensor`` and are rejected. While ``DistributedOptimizer.__init__`` and
   ``clip_grad_by_total_norm_fp32`` run, ``Tensor.type()`` (no arguments) answers with the CUDA name.
6. The pipeline schedules count tokens in a tensor made with a literal ``device="cuda"``
   (``pipeline_parallel/schedules.py:749`` ``forward_backward_no_pipelining``, ``:1121`` interleaved, ``:2292``
   1F1B): the schedules module gets patch 4's ``torch`` too.
"""
from __future__ import annotations

import contextlib
import functools
import queue
import types

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


_FACTORIES = frozenset({"tensor", "zeros", "ones", "empty", "full", "zeros_like", "empty_like", "ones_like"})
_CUDA_MODULES = ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.distrib_optimizer",
                 "megatron.core.optimizer.clip_grads", "megatron.core.utils",
                 "megatron.core.distributed.param_and_grad_buffer",
                 "megatron.core.pipeline_parallel.schedules")  # patch 6


class _CpuStream:
    """Patch 4: the stand-in for ``torch.cuda.current_stream()``: one in-order stream, nothing to wait for."""

    def wait_event(self, event) -> None:  # noqa: ARG002
        """Nothing runs asynchronously on the CPU stream."""

    def wait_stream(self, stream) -> None:  # noqa: ARG002
        """Nothing runs asynchronously on the CPU stream."""


def _on_cpu(kwargs: dict) -> dict:
    device = kwargs.get("device")
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        kwargs["device"] = "cpu"
    return kwargs


class _CpuCuda(types.ModuleType):
    """Patch 4: ``torch.cuda`` as those modules see it."""

    def __getattr__(self, name):
        if name == "current_stream":
            return lambda *args, **kwargs: _CpuStream()
        if name == "stream":
            return lambda *args, **kwargs: contextlib.nullcontext()
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """Patch 4: ``torch`` as those modules see it: factories place ``cuda`` tensors on the CPU."""

    def __getattr__(self, name):
        if name == "cuda":
            return _CpuCuda("torch.cuda")
        value = getattr(torch, name)
        if name in _FACTORIES:
            return functools.wraps(value)(lambda *args, **kwargs: value(*args, **_on_cpu(kwargs)))
        return value


@contextlib.contextmanager
def _cuda_type_names():
    """Patch 5: ``tensor.type()`` answers ``torch.cuda.*`` names inside the wrapped megatron calls."""
    original = torch.Tensor.type

    def cuda_named(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if args or kwargs or self.is_cuda:
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = cuda_named
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)
    return wrapper


def _patch_optimizer() -> None:
    import importlib

    from megatron.core.optimizer import distrib_optimizer, optimizer

    for name in _CUDA_MODULES:
        importlib.import_module(name).torch = _CpuTorch("torch")
    distrib_optimizer.DistributedOptimizer.__init__ = _with_cuda_type_names(
        distrib_optimizer.DistributedOptimizer.__init__)
    optimizer.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(optimizer.clip_grad_by_total_norm_fp32)


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
    _patch_optimizer()
    _APPLIED = True
    return True
