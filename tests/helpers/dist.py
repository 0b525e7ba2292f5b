"""Run a function on N gloo ranks (CPU) and collect what each rank returns.

    results = run_distributed(my_fn, world_size=4, arg1, kw=...)   # my_fn(rank, world_size, arg1, kw=...)

Workers are not daemonic (megatron-core checkpoint saving starts its own helper process); they are killed
if the world fails or hangs. ``my_fn`` must be importable at module level (it is pickled by reference). Ranks start from a forkserver that
has torch and megatron-core preloaded, so a 4-rank world starts in about a second instead of re-importing
everything per rank. A failing rank's traceback is raised in the parent as AssertionError; a hung world is
killed after ``timeout`` seconds. Return values should be tensors/dicts/lists (moved through a queue).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback
from typing import Any, Callable

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "megatron.core.parallel_state"])
    return _CTX


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, rank: int, world_size: int, port: int, queue, args, kwargs) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args, **kwargs)
        # Plain pickle copies tensor bytes by value; torch's queue reducer would pass a shared-memory fd
        # that dies with this process if it exits before the parent reads it (ConnectionResetError).
        queue.put((rank, "ok", pickle.dumps(_detach(result))))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:  # noqa: BLE001
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def _detach(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(v) for v in obj)
    return obj


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 180.0, **kwargs) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks; return results by rank."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, queue, args, kwargs))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        import queue as queue_mod

        for _ in range(world_size):
            try:
                rank, status, payload = queue.get(timeout=timeout)
            except queue_mod.Empty:
                errors.append(f"timed out after {timeout}s waiting for ranks "
                              f"{sorted(set(range(world_size)) - set(results))} (deadlock or crash)")
                break
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
