"""MoNE expert (arXiv 2510.05781): SwiGLU expert whose down projection only sees each token's top-k neurons.

Legend: ``N`` token rows (grouped by expert), ``D`` hidden, ``F`` expert width, ``E`` local experts, ``k`` kept
neurons per row.  ``y = W_down (keep * silu(W_gate x) * (W_up x))`` with ``keep`` the top-k of
``|silu(W_gate x)|`` (``score="post_act"``) or ``|W_gate x|`` (``"pre_act"``), rule in kernels/topk_select.py.

Two execution paths, same math (``mone_swiglu_grouped`` picks):
- training (any token count, differentiable): gate/up/down are grouped GEMMs (one ``torch._grouped_mm`` each, group
  offsets on the device, so no host sync; kernels/grouped_gemm.py). One fused Triton
  kernel per direction does the rest in a single pass over the ``[N, F]`` activations: forward = selection +
  SwiGLU + mask, backward = mask recompute + SwiGLU backward (+ recomputing ``h`` for ``dW_down``).  Only
  ``g``, ``u`` and two int32 per row ``(thr, cut)`` are saved, fewer activations than dense SwiGLU autograd.
  Masking saves no FLOPs here (different tokens keep different neurons); gradients reach kept neurons only.
- decode (inference, at most ``DECODE_MAX_TOKENS`` rows per expert on average): kernels/mone_decode.py reads only the rows of
  ``W_up`` that some token of the expert keeps (and W_gate, W_down in place), weight traffic ~ 2/3 + 1/3 * keep.

Numerics: GEMMs accumulate in fp32 (cuBLAS default); SwiGLU, the score and the mask are computed in fp32 from
the stored ``g, u`` and rounded once to the activation dtype. The selection is the one defined in moe_core/mone.py
(every path follows it; a bf16 test on tie-heavy inputs checks they keep identical neurons).
"""
from __future__ import annotations

import torch

from kernels.grouped_gemm import check_groups, grouped_matmul, grouped_weight_grad
from kernels.mone_decode import mone_decode, row_starts
from kernels.runtime import check_keep_k, require_triton
from kernels.select_swiglu import Score, select_swiglu_backward_op, select_swiglu_op
from kernels.topk_select import topk_select_reference

# ----------------------------------------------------------------------------- training path

class MoNESwiGLUFunction(torch.autograd.Function):
    """Training path: grouped GEMMs (kernels/grouped_gemm.py, offsets on the device) around the fused
    select+SwiGLU kernels (see module docstring). No host sync."""

    @staticmethod
    def forward(ctx, x_ND, w_gate_EFD, w_up_EFD, w_down_EDF, tokens_per_expert_E, keep_k, score):
        g_NF = grouped_matmul(x_ND, w_gate_EFD.transpose(1, 2), tokens_per_expert_E)
        u_NF = grouped_matmul(x_ND, w_up_EFD.transpose(1, 2), tokens_per_expert_E)
        h_NF, thr_N, cut_N = select_swiglu_op(g_NF, u_NF, keep_k, score == "pre_act")
        ctx.save_for_backward(x_ND, g_NF, u_NF, thr_N, cut_N, w_gate_EFD, w_up_EFD, w_down_EDF, tokens_per_expert_E)
        ctx.score = score
        return grouped_matmul(h_NF, w_down_EDF.transpose(1, 2), tokens_per_expert_E)

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, g_NF, u_NF, thr_N, cut_N, w_gate_EFD, w_up_EFD, w_down_EDF, counts_E = ctx.saved_tensors
        dy_ND = dy_ND.contiguous()
        dh_NF = grouped_matmul(dy_ND, w_down_EDF, counts_E)
        dg_NF, du_NF, h_NF = select_swiglu_backward_op(dh_NF, g_NF, u_NF, thr_N, cut_N, ctx.score == "pre_act")
        need = ctx.needs_input_grad
        dx_ND = None
        if need[0]:
            dx_ND = grouped_matmul(dg_NF, w_gate_EFD, counts_E)
            dx_ND += grouped_matmul(du_NF, w_up_EFD, counts_E)
        dw_gate = grouped_weight_grad(dg_NF, x_ND, counts_E) if need[1] else None
        dw_up = grouped_weight_grad(du_NF, x_ND, counts_E) if need[2] else None
        dw_down = grouped_weight_grad(dy_ND, h_NF, counts_E) if need[3] else None
        return dx_ND, dw_gate, dw_up, dw_down, None, None, None


# ----------------------------------------------------------------------------- public API

DECODE_MAX_TOKENS = 16
"""With no gradient needed and at most this many rows per expert on average (``N <= E * DECODE_MAX_TOKENS``, a
static test: no host sync) the gather-based decode path is used. It is correct for any split, and fast while
experts have few tokens."""


def _check_grouped(x_ND, tokens_per_expert_E, w_gate_EFD, w_up_EFD, w_down_EDF, keep_k, score) -> None:
    E, F, D = w_gate_EFD.shape
    if w_up_EFD.shape != (E, F, D) or w_down_EDF.shape != (E, D, F):
        raise ValueError(f"MoNE weights must be w_gate/w_up [E, F, D] and w_down [E, D, F]; got "
                         f"{tuple(w_gate_EFD.shape)}, {tuple(w_up_EFD.shape)}, {tuple(w_down_EDF.shape)}")
    if x_ND.dim() != 2 or x_ND.shape[1] != D:
        raise ValueError(f"x_ND must be [N, D={D}], got {tuple(x_ND.shape)}")
    check_groups(x_ND, E, tokens_per_expert_E)
    if score not in ("post_act", "pre_act"):
        raise ValueError(f"score must be 'post_act' or 'pre_act' (moe.mone.score), got {score!r}")
    check_keep_k(keep_k, F, "expert width")


def mone_swiglu_grouped(x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, w_gate_EFD: torch.Tensor,
                        w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor, keep_k: int,
                        score: Score = "post_act") -> torch.Tensor:
    """MoNE SwiGLU over ``E`` experts with Triton kernels. Rows of ``x_ND`` are grouped by expert in order
    (``tokens_per_expert_E`` int64 on the device, ragged, zeros allowed), then dead rows (outputs unspecified).
    Returns ``y_ND``; differentiable w.r.t. ``x_ND`` and the three weights. No host sync. Uses the decode path when
    no gradient is needed and ``N <= E * DECODE_MAX_TOKENS``, the training path otherwise."""
    require_triton(x_ND)
    _check_grouped(x_ND, tokens_per_expert_E, w_gate_EFD, w_up_EFD, w_down_EDF, keep_k, score)
    tensors = (x_ND, w_gate_EFD, w_up_EFD, w_down_EDF)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if not needs_grad and x_ND.shape[0] <= w_gate_EFD.shape[0] * DECODE_MAX_TOKENS:
        return mone_decode(x_ND.contiguous(), row_starts(tokens_per_expert_E), w_gate_EFD, w_up_EFD, w_down_EDF,
                           keep_k, score)
    return MoNESwiGLUFunction.apply(x_ND.contiguous(), w_gate_EFD, w_up_EFD, w_down_EDF, tokens_per_expert_E,
                                    keep_k, score)


def mone_swiglu(x_ND: torch.Tensor, w_gate_FD: torch.Tensor, w_up_FD: torch.Tensor, w_down_DF: torch.Tensor,
                keep_k: int, score: Score = "post_act") -> torch.Tensor:
    """One expert: :func:`mone_swiglu_grouped` with ``E = 1``."""
    rows_E = torch.full((1,), x_ND.shape[0], dtype=torch.int64, device=x_ND.device)
    return mone_swiglu_grouped(x_ND, rows_E, w_gate_FD[None], w_up_FD[None], w_down_DF[None], keep_k,
                               score)


def mone_swiglu_reference(x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, w_gate_EFD: torch.Tensor,
                          w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor, keep_k: int,
                          score: Score = "post_act") -> torch.Tensor:
    """Torch reference (autograd does the backward; reads the counts on the host): dense SwiGLU with the top-k
    selection, per expert; SwiGLU and score in fp32 from the rounded ``g`` (``silu = g * sigmoid(g)``), dropped
    neurons selected out. Returns the live rows only."""
    _check_grouped(x_ND, tokens_per_expert_E, w_gate_EFD, w_up_EFD, w_down_EDF, keep_k, score)
    outs = []
    splits = tokens_per_expert_E.tolist()
    for e, x_nD in enumerate(torch.split(x_ND[:sum(splits)], splits)):
        g_nF = (x_nD @ w_gate_EFD[e].t()).float()
        a_nF = g_nF * torch.sigmoid(g_nF)
        keep_nF = topk_select_reference((g_nF if score == "pre_act" else a_nF).detach(), keep_k, "mask")
        u_nF = (x_nD @ w_up_EFD[e].t()).float()
        h_nF = (torch.where(keep_nF, a_nF, 0.0) * torch.where(keep_nF, u_nF, 0.0)).to(x_ND.dtype)
        outs.append(h_nF @ w_down_EDF[e].t())
    return torch.cat(outs) if outs else x_ND.new_empty(0, w_down_EDF.shape[1])
