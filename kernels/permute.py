"""Fused token permutation for MoE dispatch: the row movement of permute/unpermute as Triton kernels, each with a
pure-torch reference of identical semantics (the reference is the CPU path, the kernels the CUDA path).

Shape legend: ``T`` tokens, ``K`` routed experts per token, ``N`` permuted rows, ``D`` hidden.

The permutation (built by moe_core/permute.py, sync-free) has ``T*K`` rows: kept routing slots first,
grouped by expert in ascending order (stable), dropped slots (expert id -1, capacity dropping) sorted to the end.
Rows past ``sum(tokens_per_expert)`` are *dead*: experts may leave garbage there (NaN/inf included). It is given as
three int64 maps (no host value is ever read from them, so nothing here synchronises with the host):

- ``token_idx_N [N]``: source token of row ``n`` (``slot // K``; valid for dead rows too);
- ``row_TK [T, K]``: the row holding slot ``(t, k)``, or -1 where the slot was dropped;
- ``slot_idx_N [N]``: flat slot index ``t*K + k`` of row ``n``.

``N`` is ``T*K``, or any prefix length of the permutation that still holds every kept row (an EP dispatcher that
knows the kept count passes just the kept rows, with ``token_idx_N`` and ``slot_idx_N`` cut to the same length).

Operations (``acc`` = fp32, or fp64 when an input is fp64; "kept" = ``row_TK[t, k] >= 0``):

1. permute forward    ``x_ND[n] = x_TD[token_idx_N[n]]`` (every row, dead ones included; bit-exact copy).
2. permute backward   ``grad_x_TD[t] = sum_k grad_ND[row_TK[t, k]]`` over kept k, in acc, rounded once.
3. unpermute forward  ``y_TD[t] = sum_k w_TK[t, k] * y_ND[row_TK[t, k]]`` over kept k, in acc, rounded once to
   ``y_ND.dtype`` (megatron-core combines in fp32 as well).
4. unpermute backward ``grad_y_ND[n] = w_flat[slot_idx_N[n]] * grad_TD[token_idx_N[n]]`` (acc, rounded to
   ``y_ND.dtype``) and EXACTLY 0 on dead rows; ``grad_w_TK[t, k] = <y_ND[row_TK[t, k]], grad_TD[t]>`` in acc for
   kept slots, exactly 0 for dropped ones.

Dropped slots are *selected out* (masked loads / ``where``), never multiplied by 0, so a NaN or inf in a dead row
never reaches a kept result. Backward passes are gathers (one writer per output element), never atomic scatters.

Kernel design (bandwidth-bound row movement): one program per output row (permute forward) or per token (the other
three), looping over ``D`` in ``BLOCK_D`` chunks; the token's K slots are one ``[BLOCK_K, BLOCK_D]`` tile, so the
K row indices and weights are loaded once per token. The grid depends only on shapes, never on device data.
Unpermute backward is one fused kernel per token: ``grad_TD[t]`` is read once and serves both gradients (the
kept rows' ``grad_y`` are written through ``row_TK``, injective, so no two programs write one row); the same
program zeroes the dead rows among rows ``t*K .. t*K+K-1`` (a row is dead iff its slot's ``row_TK`` is -1).
The launchers are torch custom ops, so ``torch.compile`` (fullgraph) sees each as one node; dynamic shapes work.
The interpreter (TRITON_INTERPRET=1, tests) rounds fp32 -> bf16 toward zero where a GPU rounds to nearest even,
so there bf16 results may differ from the reference by one bf16 ulp; fp32 and fp64 results agree.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

MAX_TILE = 4096
"""Elements per ``[BLOCK_K, BLOCK_D]`` register tile (32 per thread at 4 warps); BLOCK_D is the largest power of
two within it (tests lower it to exercise the D loop and its ragged tail)."""


# ----------------------------------------------------------------------------- argument checks (shapes only)

def _check_maps(row_TK: torch.Tensor, *maps_N: torch.Tensor) -> None:
    if row_TK.dim() != 2 or row_TK.dtype != torch.int64:
        raise ValueError(f"row_TK must be a 2-D int64 tensor [T, K], got {row_TK.dtype} {tuple(row_TK.shape)}")
    for idx_N in maps_N:
        if idx_N.dtype != torch.int64 or idx_N.dim() != 1 or idx_N.shape != maps_N[0].shape or \
                idx_N.shape[0] > row_TK.numel():
            raise ValueError(f"token_idx_N / slot_idx_N must be 1-D int64 of one common length N <= T*K="
                             f"{row_TK.numel()} (one entry per permuted row), got {idx_N.dtype} "
                             f"{tuple(idx_N.shape)}")


def _check_rows(t: torch.Tensor, rows: int, name: str) -> None:
    if t.dim() != 2 or t.shape[0] != rows:
        raise ValueError(f"{name} must be 2-D with {rows} rows, got shape {tuple(t.shape)}")


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Accumulation precision: at least fp32 (fp64 stays fp64)."""
    acc = torch.float32
    for t in tensors:
        acc = torch.promote_types(acc, t.dtype)
    return acc


def _tl_acc(acc: torch.dtype):
    return tl.float64 if acc == torch.float64 else tl.float32


def _blocks(K: int, D: int) -> tuple[int, int]:
    block_k = triton.next_power_of_2(K)
    return block_k, min(triton.next_power_of_2(D), max(1, MAX_TILE // block_k))


# ----------------------------------------------------------------------------- torch references

def _kept_rows(rows_ND: torch.Tensor, row_TK: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``[T, K, D]`` in ``acc``: row ``row_TK[t, k]`` of ``rows_ND``, exactly 0 where the slot was dropped.
    ``rows_ND`` may have no rows (an EP rank whose every slot was dropped): then every slot is dropped."""
    if rows_ND.shape[0] == 0:  # nothing to gather from (index_select rejects an empty source); a shape, no sync
        return rows_ND.new_zeros(*row_TK.shape, rows_ND.shape[1], dtype=acc)
    gathered = rows_ND.index_select(0, row_TK.clamp_min(0).reshape(-1))
    gathered_TKD = gathered.view(*row_TK.shape, rows_ND.shape[1]).to(acc)
    return torch.where((row_TK >= 0).unsqueeze(-1), gathered_TKD, 0.0)


def permute_forward_reference(x_TD: torch.Tensor, token_idx_N: torch.Tensor) -> torch.Tensor:
    """``x_ND = x_TD[token_idx_N]`` ([N, D], dtype of ``x_TD``)."""
    return x_TD.index_select(0, token_idx_N)


def permute_backward_reference(grad_ND: torch.Tensor, row_TK: torch.Tensor) -> torch.Tensor:
    """``grad_x_TD[t] = sum over kept k of grad_ND[row_TK[t, k]]`` ([T, D], dtype of ``grad_ND``; summed in acc)."""
    return _kept_rows(grad_ND, row_TK, _acc_dtype(grad_ND)).sum(1).to(grad_ND.dtype)


def unpermute_forward_reference(y_ND: torch.Tensor, weight_TK: torch.Tensor, row_TK: torch.Tensor) -> torch.Tensor:
    """``y_TD[t] = sum over kept k of weight_TK[t, k] * y_ND[row_TK[t, k]]`` ([T, D], dtype of ``y_ND``)."""
    acc = _acc_dtype(y_ND, weight_TK)
    w_TK = torch.where(row_TK >= 0, weight_TK.to(acc), 0.0)
    return torch.einsum("tkd,tk->td", _kept_rows(y_ND, row_TK, acc), w_TK).to(y_ND.dtype)


def unpermute_backward_reference(grad_TD: torch.Tensor, y_ND: torch.Tensor, weight_TK: torch.Tensor,
                                 row_TK: torch.Tensor, token_idx_N: torch.Tensor, slot_idx_N: torch.Tensor,
                                 need_grad_y: bool = True, need_grad_w: bool = True):
    """``(grad_y_ND [N, D] dtype of y_ND, exactly 0 on dead rows; grad_w_TK [T, K] dtype of weight_TK, exactly 0
    on dropped slots)``; either is None when not needed."""
    acc = _acc_dtype(y_ND, weight_TK)
    grad_y_ND = grad_w_TK = None
    if need_grad_y:
        live_N = row_TK.reshape(-1).index_select(0, slot_idx_N) >= 0
        w_N = weight_TK.reshape(-1).index_select(0, slot_idx_N).to(acc)
        grad_ND = grad_TD.index_select(0, token_idx_N).to(acc) * w_N.unsqueeze(1)
        grad_y_ND = torch.where(live_N.unsqueeze(1), grad_ND, 0.0).to(y_ND.dtype)
    if need_grad_w:
        dot_TK = torch.einsum("tkd,td->tk", _kept_rows(y_ND, row_TK, acc), grad_TD.to(acc))
        grad_w_TK = torch.where(row_TK >= 0, dot_TK, 0.0).to(weight_TK.dtype)
    return grad_y_ND, grad_w_TK


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _gather_rows_kernel(src_ptr, idx_ptr, out_ptr, D, BLOCK_D: tl.constexpr):
    """One program per output row ``n``: ``out[n] = src[idx[n]]``."""
    n = tl.program_id(0).to(tl.int64)
    src_row = tl.load(idx_ptr + n)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(src_ptr + src_row * D + d, mask=d < D)
        tl.store(out_ptr + n * D + d, v, mask=d < D)


@triton.jit
def _sum_kept_rows_kernel(src_ptr, row_ptr, w_ptr, out_ptr, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                          WEIGHTED: tl.constexpr, ACC: tl.constexpr):
    """One program per token ``t``: ``out[t] = sum over kept k of (w[t, k] *) src[row[t, k]]`` in ACC."""
    t = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    rows = tl.load(row_ptr + t * K + k, mask=k < K, other=-1)
    kept = rows >= 0
    if WEIGHTED:
        w = tl.load(w_ptr + t * K + k, mask=kept, other=0.0).to(ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = kept[:, None] & (d < D)[None, :]
        v = tl.load(src_ptr + rows[:, None] * D + d[None, :], mask=m, other=0.0).to(ACC)
        if WEIGHTED:
            v = v * w[:, None]
        total = tl.sum(tl.where(m, v, 0.0), axis=0)
        tl.store(out_ptr + t * D + d, total.to(out_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _unpermute_backward_kernel(grad_ptr, y_ptr, w_ptr, row_ptr, slot_ptr, grad_y_ptr, grad_w_ptr, N, K, D,
                               BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                               GRAD_Y: tl.constexpr, GRAD_W: tl.constexpr):
    """One program per token ``t``: ``grad_y[row[t, k]] = w[t, k] * grad[t]`` and ``grad_w[t, k] =
    <y[row[t, k]], grad[t]>`` for kept k (``grad[t]`` read once for both); zeroes the dead rows among
    ``t*K .. t*K+K-1`` (those below N)."""
    t = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    rows = tl.load(row_ptr + t * K + k, mask=k < K, other=-1)
    kept = rows >= 0
    w = tl.load(w_ptr + t * K + k, mask=kept, other=0.0).to(ACC)
    dot = tl.zeros([BLOCK_K], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = kept[:, None] & (d < D)[None, :]
        g = tl.load(grad_ptr + t * D + d, mask=d < D, other=0.0).to(ACC)
        if GRAD_Y:
            tl.store(grad_y_ptr + rows[:, None] * D + d[None, :],
                     (w[:, None] * g[None, :]).to(grad_y_ptr.dtype.element_ty), mask=m)
        if GRAD_W:
            v = tl.load(y_ptr + rows[:, None] * D + d[None, :], mask=m, other=0.0).to(ACC)
            dot += tl.sum(tl.where(m, v * g[None, :], 0.0), axis=1)
    if GRAD_W:
        tl.store(grad_w_ptr + t * K + k, tl.where(kept, dot, 0.0).to(grad_w_ptr.dtype.element_ty), mask=k < K)
    if GRAD_Y:
        n = t * K + k  # permuted rows owned by this program for zeroing; dead iff their slot was dropped
        mine = (k < K) & (n < N)
        slot = tl.load(slot_ptr + n, mask=mine, other=0)
        dead = (tl.load(row_ptr + slot, mask=mine, other=0) < 0) & mine
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            zero = tl.zeros([BLOCK_K, BLOCK_D], dtype=grad_y_ptr.dtype.element_ty)
            tl.store(grad_y_ptr + n[:, None] * D + d[None, :], zero, mask=dead[:, None] & (d < D)[None, :])


# ----------------------------------------------------------------------------- kernel launchers
# Each launcher is a torch custom op (torch.library): torch.compile treats it as one opaque node with a shape-only
# fake implementation, so a compiled graph never traces into Triton's launcher (nor the interpreter's).

@torch.library.custom_op("moetron::permute_forward", mutates_args=())
def permute_forward_triton(x_TD: torch.Tensor, token_idx_N: torch.Tensor) -> torch.Tensor:
    """Kernel of :func:`permute_forward_reference`."""
    x_TD, token_idx_N = x_TD.contiguous(), token_idx_N.contiguous()
    N, D = token_idx_N.shape[0], x_TD.shape[1]
    x_ND = x_TD.new_empty(N, D)
    if N > 0 and D > 0:
        _gather_rows_kernel[(N,)](x_TD, token_idx_N, x_ND, D, BLOCK_D=_blocks(1, D)[1])
    return x_ND


@permute_forward_triton.register_fake
def _(x_TD, token_idx_N):
    return x_TD.new_empty(token_idx_N.shape[0], x_TD.shape[1])


@torch.library.custom_op("moetron::sum_kept_rows", mutates_args=())
def _sum_kept_rows(src_ND: torch.Tensor, row_TK: torch.Tensor, weight_TK: Optional[torch.Tensor]) -> torch.Tensor:
    """``out_TD[t] = sum over kept k of (weight_TK[t, k] *) src_ND[row_TK[t, k]]``, in acc, dtype of src_ND."""
    src_ND, row_TK = src_ND.contiguous(), row_TK.contiguous()
    (T, K), D = row_TK.shape, src_ND.shape[1]
    out_TD = src_ND.new_empty(T, D)
    if T > 0 and D > 0:
        block_k, block_d = _blocks(K, D)
        acc = _acc_dtype(src_ND) if weight_TK is None else _acc_dtype(src_ND, weight_TK)
        w_TK = row_TK if weight_TK is None else weight_TK.contiguous()  # w_ptr is unused when not WEIGHTED
        _sum_kept_rows_kernel[(T,)](src_ND, row_TK, w_TK, out_TD, K, D, BLOCK_K=block_k, BLOCK_D=block_d,
                                    WEIGHTED=weight_TK is not None, ACC=_tl_acc(acc))
    return out_TD


@_sum_kept_rows.register_fake
def _(src_ND, row_TK, weight_TK):
    return src_ND.new_empty(row_TK.shape[0], src_ND.shape[1])


def permute_backward_triton(grad_ND: torch.Tensor, row_TK: torch.Tensor) -> torch.Tensor:
    """Kernel of :func:`permute_backward_reference`."""
    return _sum_kept_rows(grad_ND, row_TK, None)


def unpermute_forward_triton(y_ND: torch.Tensor, weight_TK: torch.Tensor, row_TK: torch.Tensor) -> torch.Tensor:
    """Kernel of :func:`unpermute_forward_reference`."""
    return _sum_kept_rows(y_ND, row_TK, weight_TK)


@torch.library.custom_op("moetron::unpermute_backward", mutates_args=())
def _unpermute_backward(grad_TD: torch.Tensor, y_ND: torch.Tensor, weight_TK: torch.Tensor, row_TK: torch.Tensor,
                        slot_idx_N: torch.Tensor, need_grad_y: bool,
                        need_grad_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_y_ND, grad_w_TK)``; a gradient that is not needed comes back as an empty placeholder."""
    grad_TD, y_ND, row_TK = grad_TD.contiguous(), y_ND.contiguous(), row_TK.contiguous()
    (T, K), D = row_TK.shape, y_ND.shape[1]
    grad_y_ND, grad_w_TK = _grad_buffers(y_ND, weight_TK, need_grad_y, need_grad_w)
    if D == 0:
        grad_w_TK.zero_()
    elif T > 0 and (need_grad_y or need_grad_w):
        block_k, block_d = _blocks(K, D)
        _unpermute_backward_kernel[(T,)](grad_TD, y_ND, weight_TK.contiguous(), row_TK, slot_idx_N.contiguous(),
                                         grad_y_ND if need_grad_y else y_ND, grad_w_TK if need_grad_w else weight_TK,
                                         y_ND.shape[0], K, D, BLOCK_K=block_k, BLOCK_D=block_d,
                                         ACC=_tl_acc(_acc_dtype(y_ND, weight_TK)), GRAD_Y=need_grad_y,
                                         GRAD_W=need_grad_w)
    return grad_y_ND, grad_w_TK


def _grad_buffers(y_ND, weight_TK, need_grad_y, need_grad_w):
    """Uninitialised ``(grad_y_ND, grad_w_TK)``; an empty placeholder for a gradient that is not needed."""
    return (y_ND.new_empty(y_ND.shape if need_grad_y else (0,)),
            weight_TK.new_empty(weight_TK.shape if need_grad_w else (0,)))


@_unpermute_backward.register_fake
def _(grad_TD, y_ND, weight_TK, row_TK, slot_idx_N, need_grad_y, need_grad_w):
    return _grad_buffers(y_ND, weight_TK, need_grad_y, need_grad_w)


def unpermute_backward_triton(grad_TD: torch.Tensor, y_ND: torch.Tensor, weight_TK: torch.Tensor,
                              row_TK: torch.Tensor, token_idx_N: torch.Tensor, slot_idx_N: torch.Tensor,
                              need_grad_y: bool = True, need_grad_w: bool = True):
    """Kernel of :func:`unpermute_backward_reference` (``token_idx_N`` is implied by ``row_TK`` there)."""
    grad_y_ND, grad_w_TK = _unpermute_backward(grad_TD, y_ND, weight_TK, row_TK, slot_idx_N, need_grad_y,
                                               need_grad_w)
    return grad_y_ND if need_grad_y else None, grad_w_TK if need_grad_w else None


# ----------------------------------------------------------------------------- autograd

class PermuteRows(torch.autograd.Function):
    """``x_ND = x_TD[token_idx_N]``; backward is the gather-sum through ``row_TK`` (no atomics)."""

    @staticmethod
    def forward(ctx, x_TD, token_idx_N, row_TK, use_triton):
        ctx.save_for_backward(row_TK)
        ctx.use_triton = use_triton
        return (permute_forward_triton if use_triton else permute_forward_reference)(x_TD, token_idx_N)

    @staticmethod
    def backward(ctx, grad_ND):
        (row_TK,) = ctx.saved_tensors
        grad_x_TD = (permute_backward_triton if ctx.use_triton else permute_backward_reference)(grad_ND, row_TK)
        return grad_x_TD, None, None, None


class UnpermuteRows(torch.autograd.Function):
    """``y_TD[t] = sum over kept k of weight_TK[t, k] * y_ND[row_TK[t, k]]``; both gradients without atomics."""

    @staticmethod
    def forward(ctx, y_ND, weight_TK, row_TK, token_idx_N, slot_idx_N, use_triton):
        ctx.save_for_backward(y_ND, weight_TK, row_TK, token_idx_N, slot_idx_N)
        ctx.use_triton = use_triton
        return (unpermute_forward_triton if use_triton else unpermute_forward_reference)(y_ND, weight_TK, row_TK)

    @staticmethod
    def backward(ctx, grad_TD):
        y_ND, weight_TK, row_TK, token_idx_N, slot_idx_N = ctx.saved_tensors
        backward = unpermute_backward_triton if ctx.use_triton else unpermute_backward_reference
        grad_y_ND, grad_w_TK = backward(grad_TD, y_ND, weight_TK, row_TK, token_idx_N, slot_idx_N,
                                        ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_y_ND, grad_w_TK, None, None, None, None


def permute_rows(x_TD: torch.Tensor, token_idx_N: torch.Tensor, row_TK: torch.Tensor,
                 use_triton: bool) -> torch.Tensor:
    """Differentiable ``x_ND = x_TD[token_idx_N]``: ``x_TD [T, D]`` any float dtype, maps as in the module
    docstring; returns ``[N, D]`` in ``x_TD.dtype``. ``use_triton``: the Triton kernels (CUDA tensors, or CPU
    under TRITON_INTERPRET=1) or the torch reference. Raises ValueError on inconsistent shapes or dtypes; index
    values are not checked (that would synchronise)."""
    _check_maps(row_TK, token_idx_N)
    _check_rows(x_TD, row_TK.shape[0], "x_TD")
    return PermuteRows.apply(x_TD, token_idx_N, row_TK, use_triton)


def unpermute_rows(y_ND: torch.Tensor, weight_TK: torch.Tensor, row_TK: torch.Tensor, token_idx_N: torch.Tensor,
                   slot_idx_N: torch.Tensor, use_triton: bool) -> torch.Tensor:
    """Differentiable weighted combine back to token order: ``y_ND [N, D]`` (dead rows may hold anything),
    ``weight_TK [T, K]`` (router weights, fp32); returns ``y_TD [T, D]`` in ``y_ND.dtype``, accumulated in fp32
    (fp64 for fp64 inputs). Tokens whose slots were all dropped get zeros. Differentiable w.r.t. ``y_ND`` (dead
    rows get exactly 0) and ``weight_TK`` (dropped slots get exactly 0). ``use_triton`` and errors as
    :func:`permute_rows`."""
    _check_maps(row_TK, token_idx_N, slot_idx_N)
    _check_rows(y_ND, token_idx_N.shape[0], "y_ND")
    if weight_TK.shape != row_TK.shape or not weight_TK.is_floating_point():
        raise ValueError(f"weight_TK must be a float tensor of shape {tuple(row_TK.shape)} (like row_TK), got "
                         f"{weight_TK.dtype} {tuple(weight_TK.shape)}")
    return UnpermuteRows.apply(y_ND, weight_TK, row_TK, token_idx_N, slot_idx_N, use_triton)
