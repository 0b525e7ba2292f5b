"""Exact per-row top-k by magnitude, without sorting.

Shapes: ``R`` rows (token x expert pairs), ``F`` neurons per row, ``k`` kept per row.

Selection rule (the MoNE selection defined in moe_core/mone.py; the torch reference and the Triton kernel both
follow it exactly): keep the k entries of largest ``|score|`` (computed in fp32); ``+inf`` ranks above every
finite value, NaN BELOW every number (even 0); among equal ``|score|`` the LOWER neuron index wins.

How the kernel finds the cut without a sort: for fp32, the int32 bit pattern of ``|x|`` is monotone in ``|x|``
(sign bit cleared, exponent above mantissa); NaN is mapped to -1, below ``|0| = 0``. So the k-th largest key is
the largest ``t`` with ``count(bits >= t) >= k``, found by bisection over ``[-1, inf_bits]`` in 31 steps of one
compare+sum over the row: O(31 * F) per row, no sort, cheap under ``TRITON_INTERPRET=1``. Then every entry with
``bits > t`` is kept, and of the entries with ``bits == t`` the first ``k - count(bits > t)`` by index (a prefix
sum over the tie mask). The selection is stored compactly per row as ``(thr, cut)``: keep ``f`` iff
``bits_f > thr`` or (``bits_f == thr`` and ``f <= cut``). Fused kernels (kernels/mone.py) recompute the mask
from that pair.
"""
from __future__ import annotations

from typing import Literal

import torch
import triton
import triton.language as tl

from kernels.runtime import check_rows, require_triton, row_block

NAN_BITS = tl.constexpr(-1)  # every NaN ties with every other NaN, below |0| (bit pattern 0)
PAD_BITS = tl.constexpr(-2)  # padding lanes (f >= F): below everything, never counted, never kept
TOP_BITS = tl.constexpr(0x7F800000)  # +inf: nothing ranks higher


@triton.jit
def abs_bits(score):
    """``|score|`` (computed in fp32) as an int32 bit pattern, monotone in ``|score|``; every NaN is NAN_BITS."""
    score = score.to(tl.float32)  # also: the interpreter compares bf16 by bit pattern, and NaN == NaN there
    bits = tl.abs(score).to(tl.int32, bitcast=True)
    return tl.where(score != score, NAN_BITS, bits)


@triton.jit
def row_cut(bits, f, F, k):
    """Exact top-k cut of one row held in registers. ``bits`` from :func:`abs_bits`, ``f`` the lane's neuron index,
    lanes with ``f >= F`` are padding. Returns ``(thr, cut)`` (see module docstring)."""
    b = tl.where(f < F, bits, PAD_BITS)
    lo = tl.full((), NAN_BITS, tl.int32)  # invariant: count(b >= lo) >= k   (every real lane, k <= F)
    hi = tl.full((), TOP_BITS + 1, tl.int32)  # invariant: count(b >= hi) < k   (nothing is above +inf)
    for _ in range(31):  # hi - lo <= 2^31, so 31 halvings leave hi == lo + 1
        mid = lo + (hi - lo) // 2
        enough = tl.sum((b >= mid).to(tl.int32), axis=0) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    n_above = tl.sum((b > lo).to(tl.int32), axis=0)
    tie = b == lo
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=0)  # 1-based rank of each tied lane by index
    cut = tl.max(tl.where(tie & (tie_rank <= k - n_above), f, -1), axis=0)
    return lo, cut


@triton.jit
def keep_mask(bits, f, thr, cut):
    """Recompute the kept-neuron mask from a row's ``(thr, cut)``."""
    return (bits > thr) | ((bits == thr) & (f <= cut))


@triton.jit
def _topk_select_kernel(score_ptr, mask_ptr, idx_ptr, F, k, stride_s, stride_m, stride_i,
                        BLOCK_F: tl.constexpr, WRITE_MASK: tl.constexpr, WRITE_IDX: tl.constexpr):
    """One program per row: find the cut, then write the bool mask and/or the k kept indices (ascending)."""
    r = tl.program_id(0).to(tl.int64)
    f = tl.arange(0, BLOCK_F)
    score = tl.load(score_ptr + r * stride_s + f, mask=f < F, other=0.0)
    bits = abs_bits(score)
    thr, cut = row_cut(bits, f, F, k)
    keep = keep_mask(bits, f, thr, cut) & (f < F)
    if WRITE_MASK:
        tl.store(mask_ptr + r * stride_m + f, keep.to(tl.int8), mask=f < F)
    if WRITE_IDX:
        slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1  # position of each kept neuron among the kept ones
        tl.store(idx_ptr + r * stride_i + slot, f, mask=keep)


def topk_select(score_RF: torch.Tensor, k: int, output: Literal["mask", "indices"] = "mask") -> torch.Tensor:
    """Top-k of ``|score_RF|`` per row (Triton). ``mask``: bool ``[R, F]``; ``indices``: int64 ``[R, k]``,
    ascending neuron order. Not differentiable (a selection has no gradient; the fused kernels in
    kernels/mone.py carry gradients through the kept neurons)."""
    require_triton(score_RF)
    check_rows(score_RF, k, "score_RF")
    if output not in ("mask", "indices"):
        raise ValueError(f"topk_select: output must be 'mask' or 'indices', got {output!r}")
    score_RF = score_RF.contiguous()
    R, F = score_RF.shape
    mask_RF = torch.empty((R, F) if output == "mask" else (1, 1), dtype=torch.int8, device=score_RF.device)
    idx_RK = torch.empty((R, k) if output == "indices" else (1, 1), dtype=torch.int32, device=score_RF.device)
    if R > 0:
        _topk_select_kernel[(R,)](score_RF, mask_RF, idx_RK, F, k, score_RF.stride(0), mask_RF.stride(0),
                                  idx_RK.stride(0), BLOCK_F=row_block(F), WRITE_MASK=output == "mask",
                                  WRITE_IDX=output == "indices", num_warps=_warps(F))
    return mask_RF.bool() if output == "mask" else idx_RK.long()


def topk_select_reference(score_RF: torch.Tensor, k: int,
                          output: Literal["mask", "indices"] = "mask") -> torch.Tensor:
    """Torch reference with the same rule: NaN becomes -1 (below every magnitude), then a stable descending sort
    of ``|score|`` keeps lower indices first among ties (``torch.topk`` promises no tie order, so it is not used)."""
    check_rows(score_RF, k, "score_RF")
    magnitude_RF = score_RF.float().abs()
    magnitude_RF = torch.where(magnitude_RF.isnan(), -1.0, magnitude_RF)
    order_RF = torch.sort(magnitude_RF, dim=-1, descending=True, stable=True).indices
    idx_RK = order_RF[:, :k].sort(dim=-1).values
    if output == "indices":
        return idx_RK
    return torch.zeros(score_RF.shape, dtype=torch.bool, device=score_RF.device).scatter_(-1, idx_RK, True)


def _warps(F: int) -> int:
    return 8 if F > 2048 else 4
