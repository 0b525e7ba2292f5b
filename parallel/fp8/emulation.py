"""CPU emulation of torchao's rowwise FP8 grouped GEMM (``_to_fp8_rowwise_then_scaled_grouped_mm``).

torchao's Triton casts and ``torch._scaled_grouped_mm`` run only on CUDA, so on CPU (CI, tests) the expert path
(parallel/fp8/grouped.py) runs this instead. It quantises exactly the operands torchao quantises, with the same
scales (``torchao.float8.float8_utils.amax_to_scale``: ``448 / max(amax, 1e-12)`` rounded down to a power of 2)
and the same saturating E4M3 cast (``to_fp8_saturated``), in the forward AND the backward:

    forward   y = x @ w          x: a scale per row;                 w_EIO: a scale per (expert, output column)
    dgrad     dx = g @ w^T       g: a scale per row;                 w_EIO: a scale per (expert, input row)
    wgrad     dw_e = x_e^T g_e   x, g: a scale per (expert group, column), over that group's rows only

Each quantised operand is dequantised (``q / scale``, exact for a power-of-2 scale) and multiplied with the
high-precision ``torch._grouped_mm`` in fp32; the tensor-core GEMM accumulates the same products in fp32 and
multiplies by the same inverse scales, so the results agree up to fp32 summation order (torchao's
``use_fast_accum`` aside). The output is rounded to ``out_dtype`` like the CUDA op's. Nothing here reads the
counts on the host: per-group amaxes are ``scatter_reduce`` over a row -> group map from ``searchsorted``.
"""
from __future__ import annotations

import torch
from torchao.float8.float8_utils import amax_to_scale, to_fp8_saturated

from kernels.grouped_gemm import group_of_rows

E4M3 = torch.float8_e4m3fn


def fake_quantize(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded through E4M3 with the power-of-2 scale of ``amax`` (broadcast against ``x``)."""
    scale = amax_to_scale(amax, E4M3, round_scales_to_power_of_2=True)
    return to_fp8_saturated(x.float() * scale, E4M3).float() / scale


def _rowwise(x: torch.Tensor, dim: int) -> torch.Tensor:
    return fake_quantize(x, x.abs().amax(dim=dim, keepdim=True))


def _per_group_colwise(x_PC: torch.Tensor, group_P: torch.Tensor, num_groups: int) -> torch.Tensor:
    """A scale per (group, column) over the group's rows; rows past the last group form one extra bucket."""
    abs_PC = x_PC.abs().float()
    amax_GC = abs_PC.new_zeros(num_groups + 1, x_PC.shape[1])
    amax_GC.scatter_reduce_(0, group_P.unsqueeze(1).expand_as(abs_PC), abs_PC, "amax")
    return fake_quantize(x_PC, amax_GC.index_select(0, group_P))


class _EmulatedFp8GroupedMM(torch.autograd.Function):
    """Mirror of torchao's ``_Float8GroupedMM`` (same operands quantised along the same axes)."""

    @staticmethod
    def forward(ctx, x_PI, w_EIO, offs_E, out_dtype):
        ctx.save_for_backward(x_PI, w_EIO, offs_E)
        ctx.out_dtype = out_dtype
        y_PO = torch._grouped_mm(_rowwise(x_PI, -1), _rowwise(w_EIO, 1), offs=offs_E)
        return y_PO.to(out_dtype)

    @staticmethod
    def backward(ctx, g_PO):
        x_PI, w_EIO, offs_E = ctx.saved_tensors
        dx_PI = torch._grouped_mm(_rowwise(g_PO, -1), _rowwise(w_EIO, -1).transpose(-2, -1), offs=offs_E)
        group_P = group_of_rows(offs_E, x_PI.shape[0])
        E = offs_E.shape[0]
        g_q_PO, x_q_PI = _per_group_colwise(g_PO, group_P, E), _per_group_colwise(x_PI, group_P, E)
        dw_EOI = torch._grouped_mm(g_q_PO.t(), x_q_PI, offs=offs_E)
        return dx_PI.to(ctx.out_dtype), dw_EOI.transpose(-2, -1).to(ctx.out_dtype), None, None


def emulated_fp8_rowwise_grouped_mm(x_PI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor,
                                    out_dtype: torch.dtype) -> torch.Tensor:
    """Same contract as torchao's ``_to_fp8_rowwise_then_scaled_grouped_mm(x_PI, w_EIO, offs_E, out_dtype,
    pad_token_groups_for_grouped_mm=False)``: ``y_PO`` [P, O] in ``out_dtype``; ``offs_E`` int32 group ends
    (multiples of 16 on CUDA; any here); rows past the last group are unspecified."""
    return _EmulatedFp8GroupedMM.apply(x_PI, w_EIO, offs_E, out_dtype)
