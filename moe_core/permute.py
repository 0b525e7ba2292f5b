"""Token permutation helpers shared by every dispatcher (local-only: no communication happens here).

Shape legend: ``T`` tokens, ``K`` routed experts per token, ``N`` kept routing slots (``<= T*K``), ``D`` hidden,
``E`` experts.

A routing decision ``topk_idx_TK`` (``-1`` = slot dropped by the capacity factor) is turned into a
:class:`Permutation` of all ``N = T*K`` routing slots: the kept slots stably sorted by expert id, so rows
``0 .. sum(tokens_per_expert_E) - 1`` of ``x_ND = x_TD[token_idx_N]`` are grouped by expert in ascending order (and
therefore also grouped by EP rank when experts are laid out contiguously per rank), followed by the dropped slots.
Those trailing "dead" rows keep every shape static: nothing here, in the experts or in the combine reads the
number of kept slots on the host, so a layer's forward and backward make no device-to-host synchronisation.
The experts ignore dead rows (``moe_core/grouped.py``: their outputs are unspecified) and
:func:`unpermute_tokens` never reads them (a selection, not a multiplication by zero, so NaN garbage cannot leak).

The row movement is kernels/permute.py (fused Triton kernels on CUDA, their torch reference elsewhere). Both
directions are gathers in forward AND backward (via the inverse map ``row_TK``), so no pass needs an atomic
scatter-add: on a GPU, autograd's default ``index_select`` backward (bf16 atomics over T*K*D values) was the
largest non-GEMM cost of an MoE layer.

Deduplicated EP dispatch (:func:`group_by_device`): the same machinery one level up. Keying each token's FIRST
slot on a device by that device (its other slots there dropped) gives a :class:`Permutation` with one row per
(token, device) pair; the pair's slots travel beside the row and the receiving device expands it with
:func:`make_permutation` of their local expert ids, and sums the weighted outputs back into one row
(:func:`unpermute_tokens`); the sender adds up a token's rows (:func:`sum_tokens`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kernels.permute import permute_rows, unpermute_rows


@dataclass
class Permutation:
    slot_idx_N: torch.Tensor
    """int64 indices into the flattened ``[T*K]`` routing slots: kept slots grouped by expert (stable within an
    expert), then the dropped ones."""
    token_idx_N: torch.Tensor
    """int64 source token of each permuted row (``slot_idx_N // K``; defined for dead rows too)."""
    tokens_per_expert_E: torch.Tensor
    """int64 kept rows per expert, on the routing device; sums to the number of kept slots (``<= N``)."""
    row_TK: torch.Tensor
    """int64 inverse map: the permuted row holding slot (t, k), or -1 where the slot was dropped."""


def sort_by_expert(expert_idx_N: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order that groups ``expert_idx_N`` by expert, and the per-expert counts; no host sync.

    Returns ``(order_N, counts_E)``: ``order_N`` lists every entry, those with an id in ``[0, num_experts)``
    first, grouped by id in ascending order and stable within an id, then the entries equal to ``-1`` (dropped);
    ``counts_E`` (int64, on the ids' device) counts the grouped entries per id. Any other id is an error, raised
    by the device (``torch._assert_async``: at once on CPU, as a device-side assert on CUDA). Usable on any flat
    id list (e.g. received tokens in the EP dispatcher).
    """
    if expert_idx_N.dtype != torch.int64 or expert_idx_N.dim() != 1:
        raise ValueError(f"expert ids must be a 1-D int64 tensor, got {expert_idx_N.dtype} {tuple(expert_idx_N.shape)}")
    torch._assert_async(((expert_idx_N >= -1) & (expert_idx_N < num_experts)).all(),
                        f"an expert id is outside [0, {num_experts}) and is not -1 (dropped); are global expert ids "
                        "being passed where ids local to this rank's experts are expected?")
    keys_N = torch.where(expert_idx_N < 0, num_experts, expert_idx_N)  # dropped slots sort last
    return torch.sort(keys_N, stable=True).indices, _count_keys(keys_N, num_experts)


def _count_keys(keys_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 ``[num_experts]`` occurrences of each id in ``keys_N`` (ids in ``[0, num_experts]``; the last one,
    a dropped slot, is not counted)."""
    counts_X = torch.zeros(num_experts + 1, dtype=torch.int64, device=keys_N.device)
    return counts_X.scatter_add_(0, keys_N, torch.ones_like(keys_N))[:num_experts]


def make_permutation(topk_idx_TK: torch.Tensor, num_experts: int) -> Permutation:
    """Group the routing slots of ``topk_idx_TK`` (ids in ``[0, num_experts)`` or ``-1``) by expert (no host
    sync; see the module docstring for the row layout)."""
    if topk_idx_TK.dim() != 2:
        raise ValueError(f"topk_idx must be [T, K], got shape {tuple(topk_idx_TK.shape)}")
    k = topk_idx_TK.shape[1]
    slot_idx_N, counts_E = sort_by_expert(topk_idx_TK.reshape(-1), num_experts)
    row_X = torch.empty_like(slot_idx_N).index_copy_(0, slot_idx_N, torch.arange(slot_idx_N.shape[0],
                                                                                 device=slot_idx_N.device))
    row_TK = torch.where(topk_idx_TK >= 0, row_X.view_as(topk_idx_TK), -1)
    return Permutation(slot_idx_N=slot_idx_N, token_idx_N=slot_idx_N // k, tokens_per_expert_E=counts_E,
                       row_TK=row_TK)


def permute_tokens(x_TD: torch.Tensor, perm: Permutation, rows: Optional[int] = None) -> torch.Tensor:
    """Rows of ``x_TD`` in expert-grouped order (a token routed to k experts appears k times), dead rows last;
    only the first ``rows`` of them when given (``kept <= rows <= N``: a caller that knows the kept count on the
    host leaves the dead rows out). CUDA: the fused Triton kernels of kernels/permute.py; elsewhere their torch
    reference (same semantics)."""
    return permute_rows(x_TD, perm.token_idx_N[:rows], perm.row_TK, use_triton=x_TD.is_cuda)


def unpermute_tokens(y_RD: torch.Tensor, perm: Permutation, topk_weight_TK: torch.Tensor,
                     num_tokens: int) -> torch.Tensor:
    """``y_t = sum_k w_tk * y_row(t, k)`` back in token order; tokens with no kept slot get zeros.

    ``y_RD`` holds the first ``R`` rows of the permutation, ``kept <= R <= N``: all ``N`` rows from a local
    expert pass (dead rows included, never read), or just the kept ones (the EP dispatchers, which know that count
    on the host). Numerics: the weighted sum is accumulated in fp32 (router weights are fp32) and rounded once to
    ``y_RD.dtype``, so bf16 experts do not lose precision in the combine (megatron-core does the same).
    """
    if num_tokens != perm.row_TK.shape[0] or topk_weight_TK.shape != perm.row_TK.shape:
        raise ValueError(f"unpermute got num_tokens={num_tokens} and weights {tuple(topk_weight_TK.shape)} but "
                         f"the permutation was made for routing of shape {tuple(perm.row_TK.shape)}")
    rows = y_RD.shape[0]
    if rows > perm.slot_idx_N.shape[0]:
        raise ValueError(f"unpermute got {rows} expert output rows, the permutation has {perm.slot_idx_N.shape[0]}")
    return unpermute_rows(y_RD, topk_weight_TK, perm.row_TK, perm.token_idx_N[:rows], perm.slot_idx_N[:rows],
                          use_triton=y_RD.is_cuda)


def sum_tokens(y_RD: torch.Tensor, perm: Permutation, num_tokens: int) -> torch.Tensor:
    """``y_t = sum_k y_row(t, k)`` over the token's kept rows: :func:`unpermute_tokens` with every weight 1.0 (a
    multiplication by 1.0 is exact in every float format, so this is the plain sum, accumulated in fp32)."""
    ones_TK = torch.ones(perm.row_TK.shape, dtype=torch.float32, device=y_RD.device)
    return unpermute_tokens(y_RD, perm, ones_TK, num_tokens)


@dataclass
class DeviceRouting:
    """Routing slots grouped by the device holding their expert, ONE row per (token, device) pair (deduplicated
    dispatch): a token routed to several experts of one device reaches it once, with the slots of those experts
    beside it (``local_expert_NK``, ``weight_NK``); the device expands the row into its experts' rows and sums
    their weighted outputs into one row again (:func:`group_by_device`)."""

    perm: Permutation
    """Over the ``T*K`` slots, the first slot of each (token, device) pair kept (the pair's row) and every other
    slot dropped: rows grouped by device (stable in token order), dead rows last. Its ``tokens_per_expert_E`` counts
    rows per DEVICE (``[P]``); ``row_TK`` names the row of each pair's first slot."""
    local_expert_NK: torch.Tensor
    """int64 ``[N, K]``: for row n (token t, device d), slot k's expert id local to d (``idx - d*L``) where slot k
    of t goes to d, else -1 (another device or dropped; all -1 on dead rows)."""
    weight_NK: torch.Tensor
    """fp32 ``[N, K]`` (differentiable): those slots' router weights, 0 where ``local_expert_NK`` is -1."""
    slots_per_expert_E: torch.Tensor
    """int64 ``[E]``: kept slots per (global) expert (rows the experts compute once expanded)."""


def group_by_device(topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor, experts_per_device: int,
                    num_devices: int) -> DeviceRouting:
    """The deduplicated dispatch layout of a routing (no host sync). Device ``d`` holds experts
    ``[d*L, (d+1)*L)``, ``L = experts_per_device``; ``topk_idx_TK`` global ids or -1 (dropped), ``topk_weight_TK``
    fp32. A token whose kept slots sit on ``n`` devices gets ``n <= K`` rows (``K`` when every slot is on another
    device, as without deduplication)."""
    T, K = topk_idx_TK.shape
    L, E = experts_per_device, experts_per_device * num_devices
    kept_TK = topk_idx_TK >= 0
    device_TK = torch.where(kept_TK, topk_idx_TK.div(L, rounding_mode="floor"), -1)
    earlier_KK = torch.ones(K, K, dtype=torch.bool, device=topk_idx_TK.device).tril(-1)  # [k, k']: k' < k
    repeat_TK = ((device_TK.unsqueeze(2) == device_TK.unsqueeze(1)) & earlier_KK).any(2)
    first_TK = torch.where(kept_TK & ~repeat_TK, device_TK, -1)
    perm = make_permutation(first_TK, num_devices)
    device_N1 = first_TK.reshape(-1).index_select(0, perm.slot_idx_N).unsqueeze(1)  # -1 on dead rows
    idx_NK = topk_idx_TK.index_select(0, perm.token_idx_N)
    here_NK = (idx_NK >= 0) & (device_TK.index_select(0, perm.token_idx_N) == device_N1)
    return DeviceRouting(
        perm=perm, local_expert_NK=torch.where(here_NK, idx_NK - device_N1 * L, -1),
        weight_NK=torch.where(here_NK, topk_weight_TK.index_select(0, perm.token_idx_N), 0.0),
        slots_per_expert_E=_count_keys(torch.where(kept_TK, topk_idx_TK, E).reshape(-1), E))
