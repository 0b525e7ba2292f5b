"""Benchmark worlds on this machine: a free loopback port and gloo process worlds that return results."""
from __future__ import annotations

import os
import socket
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results.put((rank, fn(rank, world, *args)))
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_gloo_world(fn: Callable, world: int, *args) -> list:
    """``fn(rank, world, *args)`` on ``world`` gloo processes of this machine; the results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_entry, args=(world, free_port(), fn, args, results), nprocs=world, join=True,
                       start_method="spawn")
    by_rank = dict(results.get() for _ in range(world))
    return [by_rank[r] for r in range(world)]
