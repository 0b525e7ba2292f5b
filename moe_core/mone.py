"""MoNE: Mixture of Neuron Experts (arXiv 2510.05781) - neuron selection inside each routed expert.

KERNEL CONTRACT (kernels/mone.py must export a function with exactly this signature and semantics)::

    mone_swiglu_grouped(x_ND, tokens_per_expert, w_gate_EFD, w_up_EFD, w_down_EDF, keep_k, score) -> y_ND

    x_ND               [N, D]  token rows grouped by expert (rows of expert 0 first, then expert 1, ...)
    tokens_per_expert  list[int] of length E, sums to N (entries may be 0)
    w_gate_EFD         [E, F, D]   w_up_EFD [E, F, D]   w_down_EDF [E, D, F]   (same dtype/device as x_ND)
    keep_k             int in [1, F]: neurons kept per row
    score              "post_act" -> rank neurons by |silu(W_gate x)|, "pre_act" -> by |W_gate x|
    y_ND               [N, D], dtype of x_ND

    For row n of expert e:  pre = W_gate[e] x_n,  post = silu(pre),  h = post * (W_up[e] x_n)
                            keep = the keep_k largest-|score| neurons of that row (ties: any consistent choice)
                            y_n = W_down[e] (h * 1[keep])
    Dropped neurons contribute exactly zero to y and receive exactly zero gradient; the function must be
    differentiable w.r.t. x_ND and the three weights (the selection itself is not differentiated).

:func:`mone_swiglu_torch` is the pure-torch implementation of that contract (and the reference for the kernels).
It masks the dense hidden activations, so training saves no FLOPs; savings come from kernels that gather only the
kept rows of W_up / columns of W_down. Selection uses ``torch.topk`` per row (a partial selection, no full sort).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from moe_core.grouped import grouped_linear, swiglu_grouped

MoNEFn = Callable[..., torch.Tensor]
SCORES = ("post_act", "pre_act")


def keep_count(keep_ratio: float, ffn: int) -> int:
    """Neurons kept per row: ``round(keep_ratio * F)`` rounding halves up, at least 1."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"moe.mone.keep_ratio must be in (0, 1], got {keep_ratio}")
    return max(1, min(ffn, math.floor(keep_ratio * ffn + 0.5)))


def neuron_score(pre_act_NF: torch.Tensor, post_act_NF: torch.Tensor, score: str) -> torch.Tensor:
    """Non-negative per-neuron ranking score ``|silu(pre)|`` (post_act) or ``|pre|`` (pre_act)."""
    if score == "post_act":
        return post_act_NF.abs()
    if score == "pre_act":
        return pre_act_NF.abs()
    raise ValueError(f"moe.mone.score must be one of {list(SCORES)}, got {score!r}")


def neuron_mask(score_NF: torch.Tensor, keep_k: int) -> torch.Tensor:
    """0/1 mask (dtype of ``score_NF``) keeping the ``keep_k`` highest scores of each row; not differentiable."""
    if not 1 <= keep_k <= score_NF.shape[-1]:
        raise ValueError(f"keep_k={keep_k} must be in [1, F={score_NF.shape[-1]}]")
    keep_idx_NK = torch.topk(score_NF.detach(), keep_k, dim=-1, sorted=False).indices
    mask_NF = torch.zeros_like(score_NF, memory_format=torch.contiguous_format)
    return mask_NF.scatter_(-1, keep_idx_NK, 1.0)


def mone_swiglu_torch(x_ND: torch.Tensor, tokens_per_expert: list[int], w_gate_EFD: torch.Tensor,
                      w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor, keep_k: int, score: str) -> torch.Tensor:
    """Pure-torch implementation of the kernel contract in this module's docstring."""
    def hidden_mask(pre_act_NF: torch.Tensor, post_act_NF: torch.Tensor) -> torch.Tensor:
        return neuron_mask(neuron_score(pre_act_NF, post_act_NF, score), keep_k)

    return swiglu_grouped(x_ND, tokens_per_expert, w_gate_EFD, w_up_EFD, w_down_EDF, hidden_mask)


def neuron_balance_loss(x_ND: torch.Tensor, tokens_per_expert: list[int], w_gate_EFD: torch.Tensor,
                        keep_k: int, score: str) -> torch.Tensor:
    """Switch-style load balance over the neurons of each expert (our choice; the paper leaves it open).

    Per expert e with n > 0 rows: ``F * sum_i f_i * p_i`` where ``f_i`` is the fraction of the ``n * keep_k``
    kept slots that went to neuron i (counts, no gradient) and ``p_i`` the mean over rows of neuron i's share of
    the row's total score (differentiable). It is 1.0 when every neuron is kept equally often with equal shares;
    the result is the mean over experts that received rows (0 if none). Computed in fp32. It recomputes the gate
    GEMM, so it costs one extra ``N x D x F`` GEMM when enabled (and works with any kernel backend).
    """
    pre_act_NF = grouped_linear(x_ND, w_gate_EFD, tokens_per_expert).float()
    score_NF = neuron_score(pre_act_NF, torch.nn.functional.silu(pre_act_NF), score)
    mask_NF = neuron_mask(score_NF, keep_k)
    share_NF = score_NF / score_NF.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    rows_E = torch.tensor(tokens_per_expert, device=x_ND.device)
    expert_N = torch.repeat_interleave(torch.arange(len(tokens_per_expert), device=x_ND.device), rows_E)
    rows_E1 = rows_E.clamp_min(1).unsqueeze(1).float()
    kept_frac_EF = score_NF.new_zeros(rows_E.shape[0], score_NF.shape[1]).index_add(0, expert_N, mask_NF)
    mean_share_EF = share_NF.new_zeros(kept_frac_EF.shape).index_add(0, expert_N, share_NF) / rows_E1
    loss_E = score_NF.shape[1] * (kept_frac_EF / (rows_E1 * keep_k) * mean_share_EF).sum(-1)
    has_rows_E = rows_E > 0
    return loss_E[has_rows_E].sum() / has_rows_E.sum().clamp_min(1)


def resolve_mone_fn(backend: str, device: torch.device) -> MoNEFn:
    """The MoNE implementation for ``moe.mone.backend`` on ``device``.

    ``torch``: :func:`mone_swiglu_torch`. ``triton``: ``kernels.mone.mone_swiglu_grouped`` (error if it cannot be
    imported). ``auto``: the Triton kernel on CUDA when ``kernels.mone`` is importable, torch otherwise.
    """
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return mone_swiglu_torch
    if backend not in ("auto", "triton"):
        raise ValueError(f"moe.mone.backend must be one of ['auto', 'torch', 'triton'], got {backend!r}")
    try:
        from kernels.mone import mone_swiglu_grouped
    except ImportError as e:
        if backend == "auto":
            return mone_swiglu_torch
        raise ImportError(f"moe.mone.backend=triton but kernels.mone cannot be imported ({e}); "
                          "install triton or set moe.mone.backend=torch") from e
    return mone_swiglu_grouped
