"""CPU emulation of the FP8 GEMM, for tests only: the scaling logic and amax bookkeeping of the FP8 modules
(parallel/fp8_torch.py) run unchanged on CPU with this GEMM passed as ``gemm=``.

The operands arrive already quantised to real ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` tensors (so every
rounding and saturation of FP8 storage happens exactly as on the GPU); only the multiply is emulated: dequantise
each operand to fp32 (``q * scale_inv``), multiply in fp32, cast to the output dtype. A tensor-core FP8 GEMM
accumulates the same exact products in fp32 and applies the same two scale factors, so the results agree up to
fp32 summation order.
"""
from __future__ import annotations

import torch


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    return q.float() * scale_inv


def emulated_scaled_mm(a_MK: torch.Tensor, a_scale_inv: torch.Tensor, b_NK: torch.Tensor,
                       b_scale_inv: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Same contract as ``parallel.fp8_torch.scaled_mm``: ``a @ b^T`` of dequantised FP8 operands."""
    for name, t in (("a", a_MK), ("b", b_NK)):
        if t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise TypeError(f"emulated_scaled_mm: operand {name} must be a float8 tensor, got {t.dtype}")
    return (dequantize(a_MK, a_scale_inv) @ dequantize(b_NK, b_scale_inv).t()).to(out_dtype)
