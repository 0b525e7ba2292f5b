"""Rank/world discovery: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or a plain single process.

Under Slurm, slurm/pretrain.sbatch runs one torchrun per node, so torchrun's variables are always what we read.
A plain `python -m launcher.pretrain` gets a one-rank world on a free loopback port, so the same code path
(process groups, collectives, distributed checkpoints) runs everywhere.
"""
from __future__ import annotations

import os
import socket


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
