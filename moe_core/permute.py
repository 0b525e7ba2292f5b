"""Token permutation helpers shared by every dispatcher (local-only: no communication happens here).

Shape legend: ``T`` tokens, ``K`` routed experts per token, ``N`` kept routing slots (``<= T*K``), ``D`` hidden,
``E`` experts.

A routing decision ``topk_idx_TK`` (``-1`` = slot dropped by the capacity factor) is turned into a
:class:`Permutation`: the kept slots stably sorted by expert id, so the rows of ``x_ND = x_TD[token_idx_N]`` are
grouped by expert in ascending order (and therefore also grouped by EP rank when experts are laid out
contiguously per rank). :func:`unpermute_tokens` is the inverse: a weighted sum back to token order.

Both directions are gathers in forward AND backward (via the inverse map ``row_TK``), so no pass needs an
atomic scatter-add: on a GPU, autograd's default ``index_select`` backward (bf16 atomics over T*K*D values) was
the largest non-GEMM cost of an MoE layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Permutation:
    slot_idx_N: torch.Tensor
    """int64 indices into the flattened ``[T*K]`` routing slots, grouped by expert, stable within an expert."""
    token_idx_N: torch.Tensor
    """int64 source token of each permuted row (``slot_idx_N // K``)."""
    tokens_per_expert_E: torch.Tensor
    """int64 kept rows per expert; sums to N."""
    row_TK: torch.Tensor
    """int64 inverse map: the permuted row holding slot (t, k), or -1 where the slot was dropped."""


def sort_by_expert(expert_idx_N: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order that groups ``expert_idx_N`` by expert, and the per-expert counts.

    Entries equal to ``-1`` (dropped) are excluded from the order; any other id outside ``[0, num_experts)`` is an
    error. Returns ``(order_M, counts_E)`` where ``M`` is the number of non-dropped entries. Usable on any flat id
    list (e.g. received tokens in the EP dispatcher). One host sync (the kept count ``M``).
    """
    if expert_idx_N.dtype != torch.int64 or expert_idx_N.dim() != 1:
        raise ValueError(f"expert ids must be a 1-D int64 tensor, got {expert_idx_N.dtype} {tuple(expert_idx_N.shape)}")
    dropped_key, invalid_key = num_experts, num_experts + 1
    valid_N = (expert_idx_N >= 0) & (expert_idx_N < num_experts)
    # Sort keys: the expert id, E for dropped slots (sorted last, then cut off), E + 1 for invalid ids.
    keys_N = torch.where(valid_N, expert_idx_N,
                         torch.where(expert_idx_N == -1, dropped_key, invalid_key))
    counts_X = torch.zeros(num_experts + 2, dtype=torch.int64, device=keys_N.device)
    counts_X.scatter_add_(0, keys_N, torch.ones_like(keys_N))
    counts_host = counts_X.tolist()
    if counts_host[invalid_key]:
        bad = int(expert_idx_N[keys_N == invalid_key][0])
        raise ValueError(f"expert id {bad} is outside [0, {num_experts}) and is not -1 (dropped); are global "
                         "expert ids being passed where ids local to this rank's experts are expected?")
    order_N = torch.sort(keys_N, stable=True).indices
    return order_N[: sum(counts_host[:num_experts])], counts_X[:num_experts]


def make_permutation(topk_idx_TK: torch.Tensor, num_experts: int) -> Permutation:
    """Group the kept routing slots of ``topk_idx_TK`` (ids in ``[0, num_experts)`` or ``-1``) by expert."""
    if topk_idx_TK.dim() != 2:
        raise ValueError(f"topk_idx must be [T, K], got shape {tuple(topk_idx_TK.shape)}")
    k = topk_idx_TK.shape[1]
    slot_idx_N, counts_E = sort_by_expert(topk_idx_TK.reshape(-1), num_experts)
    row_X = torch.full((topk_idx_TK.numel(),), -1, dtype=torch.int64, device=topk_idx_TK.device)
    row_X[slot_idx_N] = torch.arange(slot_idx_N.shape[0], device=topk_idx_TK.device)
    return Permutation(slot_idx_N=slot_idx_N, token_idx_N=slot_idx_N // k, tokens_per_expert_E=counts_E,
                       row_TK=row_X.view_as(topk_idx_TK))


def _gather_rows(rows_ND: torch.Tensor, row_TK: torch.Tensor) -> torch.Tensor:
    """``[T, K, D]``: row ``row_TK[t, k]`` of ``rows_ND``, zeros where it is -1 (dropped)."""
    if rows_ND.shape[0] == 0:
        return rows_ND.new_zeros(*row_TK.shape, rows_ND.shape[1])
    gathered_TKD = rows_ND.index_select(0, row_TK.clamp_min(0).reshape(-1)).view(*row_TK.shape, -1)
    if rows_ND.shape[0] == row_TK.numel():  # dropless: every slot has a row, nothing to zero (no host sync)
        return gathered_TKD
    zero = torch.zeros((), dtype=rows_ND.dtype, device=rows_ND.device)
    return torch.where((row_TK >= 0).unsqueeze(-1), gathered_TKD, zero)


class _PermuteTokens(torch.autograd.Function):
    """``x_ND = x_TD[token_idx_N]``; backward sums each token's K row gradients with a gather (no scatter)."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, token_idx_N: torch.Tensor, row_TK: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(row_TK)
        return x_TD.index_select(0, token_idx_N)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        (row_TK,) = ctx.saved_tensors
        return _gather_rows(grad_ND, row_TK).sum(1), None, None


def _acc_dtype(y: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Combine precision: at least fp32 (fp64 stays fp64)."""
    return torch.promote_types(torch.promote_types(y.dtype, weight.dtype), torch.float32)


class _UnpermuteTokens(torch.autograd.Function):
    """``y_TD = sum_k w_TK * y_ND[row_TK]`` accumulated in at least fp32; both gradients are gathers as well."""

    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, weight_TK: torch.Tensor, row_TK: torch.Tensor,
                token_idx_N: torch.Tensor, slot_idx_N: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y_ND, weight_TK, row_TK, token_idx_N, slot_idx_N)
        acc = _acc_dtype(y_ND, weight_TK)
        y_TKD = _gather_rows(y_ND, row_TK).to(acc)
        return torch.einsum("tkd,tk->td", y_TKD, weight_TK.to(acc)).to(y_ND.dtype)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        y_ND, weight_TK, row_TK, token_idx_N, slot_idx_N = ctx.saved_tensors
        acc, grad_y_ND, grad_w_TK = _acc_dtype(y_ND, weight_TK), None, None
        if ctx.needs_input_grad[0]:
            weight_N = weight_TK.reshape(-1).index_select(0, slot_idx_N).to(acc)
            grad_y_ND = (grad_TD.index_select(0, token_idx_N).to(acc) * weight_N.unsqueeze(1)).to(y_ND.dtype)
        if ctx.needs_input_grad[1]:
            y_TKD = _gather_rows(y_ND, row_TK).to(acc)
            grad_w_TK = torch.einsum("tkd,td->tk", y_TKD, grad_TD.to(acc)).to(weight_TK.dtype)
        return grad_y_ND, grad_w_TK, None, None, None


def permute_tokens(x_TD: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """Rows of ``x_TD`` in expert-grouped order (a token routed to k experts appears k times)."""
    return _PermuteTokens.apply(x_TD, perm.token_idx_N, perm.row_TK)


def unpermute_tokens(y_ND: torch.Tensor, perm: Permutation, topk_weight_TK: torch.Tensor,
                     num_tokens: int) -> torch.Tensor:
    """``y_t = sum_k w_tk * y_row(t, k)`` back in token order; tokens with no kept slot get zeros.

    Numerics: the weighted sum is accumulated in fp32 (router weights are fp32) and rounded once to
    ``y_ND.dtype``, so bf16 experts do not lose precision in the combine (megatron-core does the same).
    """
    if num_tokens != perm.row_TK.shape[0] or topk_weight_TK.shape != perm.row_TK.shape:
        raise ValueError(f"unpermute got num_tokens={num_tokens} and weights {tuple(topk_weight_TK.shape)} but "
                         f"the permutation was made for routing of shape {tuple(perm.row_TK.shape)}")
    if y_ND.shape[0] != perm.slot_idx_N.shape[0]:
        raise ValueError(f"unpermute got {y_ND.shape[0]} expert output rows, the permutation has "
                         f"{perm.slot_idx_N.shape[0]}")
    return _UnpermuteTokens.apply(y_ND, topk_weight_TK, perm.row_TK, perm.token_idx_N, perm.slot_idx_N)
