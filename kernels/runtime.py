"""Where Triton kernels can run, and the argument checks every kernel entry point shares."""
from __future__ import annotations

import os

import torch
import triton

MAX_ROW = 16384
"""Selection keeps a whole row (one token's F gate activations) in registers; wider rows are refused."""


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests only: it is slow)."""
    return device.type == "cuda" or (device.type == "cpu" and interpreter_on())


def require_triton(t: torch.Tensor) -> None:
    if not triton_usable(t.device):
        raise RuntimeError(f"Triton kernels need CUDA tensors (got device {t.device}); on CPU use the torch path "
                           "(moe.mone.backend=torch or auto) or set TRITON_INTERPRET=1 before importing triton "
                           "(slow; meant for tests)")


def check_rows(x_RF: torch.Tensor, k: int, name: str) -> None:
    if x_RF.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, F], got shape {tuple(x_RF.shape)}")
    check_keep_k(k, x_RF.shape[1], name)


def check_keep_k(k: int, F: int, name: str) -> None:
    if not 1 <= k <= F:
        raise ValueError(f"keep_k={k} must be in [1, F={F}] (k = round(keep_ratio * F); check moe.mone.keep_ratio)")
    if F > MAX_ROW:
        raise ValueError(f"{name} has F={F} > {MAX_ROW} neurons per row; the selection kernels hold one row in "
                         "registers. Use moe.mone.backend=torch for wider experts")


def row_block(F: int) -> int:
    return triton.next_power_of_2(F)
