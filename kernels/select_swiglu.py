"""Fused MoNE selection + SwiGLU (arXiv 2510.05781), one Triton program per row, shared by the training path
(kernels/mone.py) and the decode path (kernels/mone_decode.py).

Forward: the per-row top-k cut of the neuron score (rule in kernels/topk_select.py) and ``h = keep * silu(g) * u``.
Backward: the mask recomputed from ``(thr, cut)``, SwiGLU's backward and ``h`` again for ``dW_down``.
Numerics: the score and SwiGLU in fp32 from the stored ``g, u``, rounded once to the activation dtype. Selection
is moe_core/mone.py's definition (score ``|g * sigmoid(g)|`` or ``|g|`` in fp32, NaN lowest, ties to the lower
index); dropped neurons are excluded with ``tl.where`` in both directions, never multiplied by 0.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import triton
import triton.language as tl

from kernels.runtime import check_rows, row_block
from kernels.topk_select import abs_bits, keep_mask, row_cut

Score = Literal["post_act", "pre_act"]


@triton.jit
def _select_swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, thr_ptr, cut_ptr, F, k, stride_row,
                              BLOCK_F: tl.constexpr, PRE_ACT: tl.constexpr, WRITE_H: tl.constexpr):
    """One program per row: top-k cut of the score, then (if WRITE_H) ``h = keep * silu(g) * u``."""
    r = tl.program_id(0).to(tl.int64)
    f = tl.arange(0, BLOCK_F)
    g = tl.load(g_ptr + r * stride_row + f, mask=f < F, other=0.0).to(tl.float32)
    a = g * tl.sigmoid(g)
    bits = abs_bits(g) if PRE_ACT else abs_bits(a)
    thr, cut = row_cut(bits, f, F, k)
    if WRITE_H:
        keep = keep_mask(bits, f, thr, cut)
        u = tl.load(u_ptr + r * stride_row + f, mask=f < F, other=0.0).to(tl.float32)
        h = tl.where(keep, a * u, 0.0)
        tl.store(h_ptr + r * stride_row + f, h.to(h_ptr.dtype.element_ty), mask=f < F)
    tl.store(thr_ptr + r, thr)
    tl.store(cut_ptr + r, cut)


@triton.jit
def _select_swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, thr_ptr, cut_ptr, dg_ptr, du_ptr, h_ptr, F, stride_row,
                              BLOCK_F: tl.constexpr, PRE_ACT: tl.constexpr):
    """One program per row: ``du = dh*silu(g)``, ``dg = dh*u*silu'(g)`` on kept neurons (exact 0 elsewhere) with
    ``silu'(g) = s*(1 + g*(1-s))``, ``s = sigmoid(g)``; also recomputes ``h`` (for ``dW_down``)."""
    r = tl.program_id(0).to(tl.int64)
    f = tl.arange(0, BLOCK_F)
    off = r * stride_row + f
    g = tl.load(g_ptr + off, mask=f < F, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    a = g * s
    bits = abs_bits(g) if PRE_ACT else abs_bits(a)
    keep = keep_mask(bits, f, tl.load(thr_ptr + r), tl.load(cut_ptr + r))
    u = tl.load(u_ptr + off, mask=f < F, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + off, mask=f < F, other=0.0).to(tl.float32)
    # selected, not multiplied by 0: a dropped neuron with inf/NaN g or u must still get exactly 0
    du = tl.where(keep, dh * a, 0.0)
    dg = tl.where(keep, dh * u * s * (1.0 + g * (1.0 - s)), 0.0)
    tl.store(du_ptr + off, du.to(du_ptr.dtype.element_ty), mask=f < F)
    tl.store(dg_ptr + off, dg.to(dg_ptr.dtype.element_ty), mask=f < F)
    tl.store(h_ptr + off, tl.where(keep, a * u, 0.0).to(h_ptr.dtype.element_ty), mask=f < F)


def _warps(F: int) -> int:
    return 8 if F > 2048 else 4


def select_swiglu(g_NF: torch.Tensor, u_NF: Optional[torch.Tensor], keep_k: int, score: Score):
    """Forward fused kernel: returns ``h_NF`` (zeros outside each row's top-k; None when ``u_NF`` is None, i.e.
    only the selection is wanted) and the per-row cut ``thr_N, cut_N`` (kernels/topk_select.py)."""
    check_rows(g_NF, keep_k, "g_NF")
    N, F = g_NF.shape
    h_NF = None if u_NF is None else torch.empty_like(g_NF)
    thr_N = torch.empty(N, dtype=torch.int32, device=g_NF.device)
    cut_N = torch.empty(N, dtype=torch.int32, device=g_NF.device)
    if N > 0:
        _select_swiglu_fwd_kernel[(N,)](g_NF, u_NF, h_NF, thr_N, cut_N, F, keep_k, g_NF.stride(0),
                                        BLOCK_F=row_block(F), PRE_ACT=score == "pre_act", WRITE_H=u_NF is not None,
                                        num_warps=_warps(F))
    return h_NF, thr_N, cut_N


def select_swiglu_backward(dh_NF, g_NF, u_NF, thr_N, cut_N, score: Score):
    """Backward fused kernel: returns ``dg_NF, du_NF`` and the recomputed forward ``h_NF``."""
    N, F = g_NF.shape
    dg_NF, du_NF, h_NF = torch.empty_like(g_NF), torch.empty_like(u_NF), torch.empty_like(g_NF)
    if N > 0:
        _select_swiglu_bwd_kernel[(N,)](dh_NF.contiguous(), g_NF, u_NF, thr_N, cut_N, dg_NF, du_NF, h_NF, F,
                                        g_NF.stride(0), BLOCK_F=row_block(F), PRE_ACT=score == "pre_act",
                                        num_warps=_warps(F))
    return dg_NF, du_NF, h_NF


# Torch custom ops (torch.library) for the training path: torch.compile sees each fused kernel as one opaque node
# with a shape-only fake implementation instead of tracing into Triton's launcher, so a compiled MoE block keeps
# MoNE's experts in its graph (kernels/permute.py does the same for the row movement).

@torch.library.custom_op("moetron::select_swiglu", mutates_args=())
def select_swiglu_op(g_NF: torch.Tensor, u_NF: torch.Tensor, keep_k: int,
                     pre_act: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`select_swiglu` with ``u_NF`` given, as one op: ``(h_NF, thr_N, cut_N)``."""
    return select_swiglu(g_NF, u_NF, keep_k, "pre_act" if pre_act else "post_act")


@select_swiglu_op.register_fake
def _(g_NF, u_NF, keep_k, pre_act):
    rows = g_NF.new_empty(g_NF.shape[0], dtype=torch.int32)
    return torch.empty_like(g_NF), rows, torch.empty_like(rows)


@torch.library.custom_op("moetron::select_swiglu_backward", mutates_args=())
def select_swiglu_backward_op(dh_NF: torch.Tensor, g_NF: torch.Tensor, u_NF: torch.Tensor, thr_N: torch.Tensor,
                              cut_N: torch.Tensor, pre_act: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`select_swiglu_backward` as one op: ``(dg_NF, du_NF, h_NF)``."""
    return select_swiglu_backward(dh_NF, g_NF, u_NF, thr_N, cut_N, "pre_act" if pre_act else "post_act")


@select_swiglu_backward_op.register_fake
def _(dh_NF, g_NF, u_NF, thr_N, cut_N, pre_act):
    return torch.empty_like(g_NF), torch.empty_like(u_NF), torch.empty_like(g_NF)
