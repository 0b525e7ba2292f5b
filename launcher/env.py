"""Rank/world discovery: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or a plain single process.

Under Slurm, slurm/pretrain.sbatch runs one torchrun per node, so torchrun's variables are always what we read.
A plain `python -m launcher.pretrain` gets a one-rank world on a free loopback port, so the same code path
(process groups, collectives, distributed checkpoints) runs everywhere.
"""
from __future__ import annotations

import contextlib
import os
import socket
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from parallel.groups import ParallelGroups


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def ensure_single_process_env() -> None:
    """Fill in a one-rank world when not launched by torchrun."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


@contextlib.contextmanager
def parallel_session(tp: int, pp: int, ep: int, backend: str = "auto") -> Iterator["ParallelGroups"]:
    """The default process group (torchrun's, or a one-rank world) plus megatron-core's TP/PP/EP/DP groups,
    torn down on exit. A default group that already existed (tests, notebooks) is left in place."""
    import torch.distributed as dist

    from parallel import groups as pgroups

    ensure_single_process_env()
    created = not dist.is_initialized()
    pgroups.init_distributed(backend)
    try:
        yield pgroups.initialize(tp, pp, ep)
    finally:
        pgroups.destroy()
        if created and dist.is_initialized():
            dist.destroy_process_group()
