"""MoNE expert (arXiv 2510.05781): SwiGLU expert whose down projection only sees each token's top-k neurons.

Legend: ``N`` token rows (grouped by expert), ``D`` hidden, ``F`` expert width, ``E`` local experts, ``k`` kept
neurons per row.  ``y = W_down (keep * silu(W_gate x) * (W_up x))`` with ``keep`` the top-k of
``|silu(W_gate x)|`` (``score="post_act"``) or ``|W_gate x|`` (``"pre_act"``), rule in kernels/topk_select.py.

Two execution paths, same math (``mone_swiglu_grouped`` picks):
- training (any token count, differentiable): gate/up/down are tensor-core GEMMs (cuBLAS). One fused Triton
  kernel per direction does the rest in a single pass over the ``[N, F]`` activations: forward = selection +
  SwiGLU + mask, backward = mask recompute + SwiGLU backward (+ recomputing ``h`` for ``dW_down``).  Only
  ``g``, ``u`` and two int32 per row ``(thr, cut)`` are saved, fewer activations than dense SwiGLU autograd.
  Masking saves no FLOPs here (different tokens keep different neurons); gradients reach kept neurons only.
- decode (inference, <= ``DECODE_MAX_TOKENS`` tokens per expert): kernels/mone_decode.py reads only the rows of
  ``W_up`` that some token of the expert keeps (and W_gate, W_down in place), weight traffic ~ 2/3 + 1/3 * keep.

Numerics: GEMMs accumulate in fp32 (cuBLAS default); SwiGLU, the score and the mask are computed in fp32 from
the stored ``g, u`` and rounded once to the activation dtype. The selection is the one defined in moe_core/mone.py
(every path follows it; a bf16 test on tie-heavy inputs checks they keep identical neurons).
"""
from __future__ import annotations

from typing import Sequence

import torch

from kernels.mone_decode import mone_decode, row_starts
from kernels.runtime import check_keep_k, require_triton
from kernels.select_swiglu import Score, select_swiglu, select_swiglu_backward
from kernels.topk_select import topk_select_reference

# ----------------------------------------------------------------------------- grouped GEMMs (cuBLAS)

def _per_expert(x_ND: torch.Tensor, splits: Sequence[int]):
    return torch.split(x_ND, list(splits), dim=0)


def _grouped_linear(x_NI: torch.Tensor, w_EOI: torch.Tensor, splits: Sequence[int]) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ w[e]^T``; rows are grouped by expert in order."""
    out_NO = x_NI.new_empty(x_NI.shape[0], w_EOI.shape[1])
    for e, (x_nI, o_nO) in enumerate(zip(_per_expert(x_NI, splits), _per_expert(out_NO, splits))):
        torch.matmul(x_nI, w_EOI[e].t(), out=o_nO)
    return out_NO


def _grouped_weight_grad(dy_NO: torch.Tensor, x_NI: torch.Tensor, splits: Sequence[int]) -> torch.Tensor:
    """``dw[e] = dy[rows of e]^T @ x[rows of e]`` (zeros for an expert with no rows)."""
    dw_EOI = x_NI.new_empty(len(splits), dy_NO.shape[1], x_NI.shape[1])
    for e, (dy_nO, x_nI) in enumerate(zip(_per_expert(dy_NO, splits), _per_expert(x_NI, splits))):
        torch.matmul(dy_nO.t(), x_nI, out=dw_EOI[e])
    return dw_EOI


class MoNESwiGLUFunction(torch.autograd.Function):
    """Training path: cuBLAS GEMMs around the fused select+SwiGLU kernels (see module docstring)."""

    @staticmethod
    def forward(ctx, x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, splits, keep_k, score):
        g_NF = _grouped_linear(x_ND, w_gate_EFD, splits)
        u_NF = _grouped_linear(x_ND, w_up_EFD, splits)
        h_NF, thr_N, cut_N = select_swiglu(g_NF, u_NF, keep_k, score)
        ctx.save_for_backward(x_ND, g_NF, u_NF, thr_N, cut_N, w_gate_EFD, w_up_EFD, w_down_EDF)
        ctx.splits, ctx.score = splits, score
        return _grouped_linear(h_NF, w_down_EDF, splits)

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, g_NF, u_NF, thr_N, cut_N, w_gate_EFD, w_up_EFD, w_down_EDF = ctx.saved_tensors
        splits = ctx.splits
        dy_ND = dy_ND.contiguous()
        dh_NF = _grouped_linear(dy_ND, w_down_EDF.transpose(1, 2), splits)
        dg_NF, du_NF, h_NF = select_swiglu_backward(dh_NF, g_NF, u_NF, thr_N, cut_N, ctx.score)
        need = ctx.needs_input_grad
        dx_ND = None
        if need[0]:
            dx_ND = _grouped_linear(dg_NF, w_gate_EFD.transpose(1, 2), splits)
            dx_ND += _grouped_linear(du_NF, w_up_EFD.transpose(1, 2), splits)
        dw_gate = _grouped_weight_grad(dg_NF, x_ND, splits) if need[1] else None
        dw_up = _grouped_weight_grad(du_NF, x_ND, splits) if need[2] else None
        dw_down = _grouped_weight_grad(dy_ND, h_NF, splits) if need[3] else None
        return dx_ND, dw_gate, dw_up, dw_down, None, None, None


# ----------------------------------------------------------------------------- public API

DECODE_MAX_TOKENS = 16
"""Up to this many tokens per expert (and no grad needed) the gather-based decode path is used."""


def _check_grouped(x_ND, tokens_per_expert, w_gate_EFD, w_up_EFD, w_down_EDF, keep_k, score) -> None:
    E, F, D = w_gate_EFD.shape
    if w_up_EFD.shape != (E, F, D) or w_down_EDF.shape != (E, D, F):
        raise ValueError(f"MoNE weights must be w_gate/w_up [E, F, D] and w_down [E, D, F]; got "
                         f"{tuple(w_gate_EFD.shape)}, {tuple(w_up_EFD.shape)}, {tuple(w_down_EDF.shape)}")
    if x_ND.dim() != 2 or x_ND.shape[1] != D:
        raise ValueError(f"x_ND must be [N, D={D}], got {tuple(x_ND.shape)}")
    if len(tokens_per_expert) != E or sum(tokens_per_expert) != x_ND.shape[0] or min(tokens_per_expert) < 0:
        raise ValueError(f"tokens_per_expert={list(tokens_per_expert)} must have E={E} non-negative entries "
                         f"summing to N={x_ND.shape[0]} (rows of x_ND grouped by expert)")
    if score not in ("post_act", "pre_act"):
        raise ValueError(f"score must be 'post_act' or 'pre_act' (moe.mone.score), got {score!r}")
    check_keep_k(keep_k, F, "expert width")


def mone_swiglu_grouped(x_ND: torch.Tensor, tokens_per_expert: Sequence[int], w_gate_EFD: torch.Tensor,
                        w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor, keep_k: int,
                        score: Score = "post_act") -> torch.Tensor:
    """MoNE SwiGLU over ``E`` experts with Triton kernels. Rows of ``x_ND`` are grouped by expert in order
    (``tokens_per_expert`` host ints, ragged, zeros allowed). Returns ``y_ND``; differentiable w.r.t. ``x_ND``
    and the three weights. Uses the decode path when no gradient is needed and every expert has at most
    ``DECODE_MAX_TOKENS`` tokens, the training path otherwise."""
    require_triton(x_ND)
    _check_grouped(x_ND, tokens_per_expert, w_gate_EFD, w_up_EFD, w_down_EDF, keep_k, score)
    splits = [int(n) for n in tokens_per_expert]
    tensors = (x_ND, w_gate_EFD, w_up_EFD, w_down_EDF)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if not needs_grad and max(splits, default=0) <= DECODE_MAX_TOKENS:
        return mone_decode(x_ND.contiguous(), row_starts(splits, x_ND.device), w_gate_EFD, w_up_EFD, w_down_EDF,
                           keep_k, score)
    return MoNESwiGLUFunction.apply(x_ND.contiguous(), w_gate_EFD, w_up_EFD, w_down_EDF, splits, keep_k, score)


def mone_swiglu(x_ND: torch.Tensor, w_gate_FD: torch.Tensor, w_up_FD: torch.Tensor, w_down_DF: torch.Tensor,
                keep_k: int, score: Score = "post_act") -> torch.Tensor:
    """One expert: :func:`mone_swiglu_grouped` with ``E = 1``."""
    return mone_swiglu_grouped(x_ND, [x_ND.shape[0]], w_gate_FD[None], w_up_FD[None], w_down_DF[None], keep_k,
                               score)


def mone_swiglu_reference(x_ND: torch.Tensor, tokens_per_expert: Sequence[int], w_gate_EFD: torch.Tensor,
                          w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor, keep_k: int,
                          score: Score = "post_act") -> torch.Tensor:
    """Torch reference (autograd does the backward): dense SwiGLU with the top-k selection, per expert; SwiGLU
    and score in fp32 from the rounded ``g`` (``silu = g * sigmoid(g)``), dropped neurons selected out."""
    _check_grouped(x_ND, tokens_per_expert, w_gate_EFD, w_up_EFD, w_down_EDF, keep_k, score)
    outs = []
    for e, x_nD in enumerate(torch.split(x_ND, list(tokens_per_expert))):
        g_nF = (x_nD @ w_gate_EFD[e].t()).float()
        a_nF = g_nF * torch.sigmoid(g_nF)
        keep_nF = topk_select_reference((g_nF if score == "pre_act" else a_nF).detach(), keep_k, "mask")
        u_nF = (x_nD @ w_up_EFD[e].t()).float()
        h_nF = (torch.where(keep_nF, a_nF, 0.0) * torch.where(keep_nF, u_nF, 0.0)).to(x_ND.dtype)
        outs.append(h_nF @ w_down_EDF[e].t())
    return torch.cat(outs) if outs else x_ND.new_empty(0, w_down_EDF.shape[1])
