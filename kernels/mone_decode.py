"""MoNE decode path: few tokens per expert, memory-bound, so only the weights of kept neurons are read.

Legend as in kernels/mone.py; ``J`` = compacted kept-neuron slots of an expert (<= F). An expert's tokens are
processed in tiles of ``BLOCK_N`` = 16 rows (decode: one tile).

Launches, each over all experts at once (rows of ``x_ND`` grouped by expert, ``row_start_E1`` offsets):
1. ``g = x W_gate^T`` for every neuron: the score needs all F gate activations, so W_gate is read in full.
2. per-row top-k cut ``(thr, cut)`` (kernels/topk_select.py rule).
3. per expert, the union of its tokens' kept neurons, compacted to ``kept_EJ`` (ascending) + ``n_kept_E``.
4. ``h = keep * silu(g) * (x W_up^T)`` for the compacted neurons only (rows of W_up gathered by index).
5. ``y = h W_down^T`` over the compacted neurons, reading ``W_down [E, D, F]`` in place (column ``f`` of each
   expert).
Compaction matters: merely masking dropped rows inside fixed neuron tiles was measured to save nothing (same
number of dependent load steps per program); compacted, the work and the loop trip counts shrink with k.
In the ``[E, D, F]`` parameter layout a neuron's down weights are a strided column whose 32-byte sectors are
shared with neighbouring neurons, so skipping dropped neurons saves little W_down traffic. A transposed
``[E, F, D]`` copy would make each neuron one contiguous run, but a cached copy cannot be kept correct (a write
through ``.data`` changes the weights with no version bump and no pointer change that a cache key could see) and
a fresh copy per call reads and writes all of W_down, more than it saves.
So no copy is made: weight bytes read are F*D (gate, needed in full for the score) + F*D * (fraction of neurons
kept by at least one of the expert's tokens) (up) + up to F*D (down); with one token per expert about
2/3 + 1/3 * keep_ratio of the dense expert.
Numerics: fp32 accumulation (``tl.dot``, IEEE for fp32 inputs), ``g`` and ``h`` rounded to the input dtype
like the training path's GEMM outputs. Under ``TRITON_INTERPRET=1`` bf16/fp16 dot operands are upcast to fp32
first (``UPCAST_DOT``): the interpreter multiplies bf16 bit patterns in ``tl.dot`` (triton-lang/triton#11584);
products of 16-bit floats are exact in fp32, so this is the GPU's math (fp32 accumulation) and costs the GPU nothing.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from kernels.grouped_gemm import group_offsets
from kernels.runtime import interpreter_on, row_block
from kernels.select_swiglu import Score, select_swiglu
from kernels.topk_select import abs_bits, keep_mask


@triton.jit
def _silu_keep(g_ptr, thr_ptr, cut_ptr, rows, row_ok, f, f_ok, F, PRE_ACT: tl.constexpr):
    """``silu(g)`` (fp32) and the kept mask for a tile of rows x neurons ``f``."""
    tile_ok = row_ok[:, None] & f_ok[None, :]
    g = tl.load(g_ptr + rows[:, None] * F + f[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    a = g * tl.sigmoid(g)
    bits = abs_bits(g) if PRE_ACT else abs_bits(a)
    thr = tl.load(thr_ptr + rows, mask=row_ok, other=0)
    cut = tl.load(cut_ptr + rows, mask=row_ok, other=0)
    return a, keep_mask(bits, f[None, :], thr[:, None], cut[:, None]) & tile_ok


@triton.jit
def _expert_union_kernel(g_ptr, thr_ptr, cut_ptr, row_start_ptr, kept_ptr, n_kept_ptr, F,
                         BLOCK_F: tl.constexpr, PRE_ACT: tl.constexpr):
    """Program per expert: neurons kept by any of its tokens, compacted in ascending order."""
    e = tl.program_id(0)
    start = tl.load(row_start_ptr + e)
    n_rows = tl.load(row_start_ptr + e + 1) - start
    f = tl.arange(0, BLOCK_F)
    union = tl.zeros((BLOCK_F,), dtype=tl.int32)
    for n0 in range(0, n_rows, 16):
        n = n0 + tl.arange(0, 16)
        _, keep = _silu_keep(g_ptr, thr_ptr, cut_ptr, (start + n).to(tl.int64), n < n_rows, f, f < F, F, PRE_ACT)
        union = tl.maximum(union, tl.max(keep.to(tl.int32), axis=0))
    slot = tl.cumsum(union, axis=0) - 1
    tl.store(kept_ptr + e.to(tl.int64) * F + slot, f, mask=union > 0)
    tl.store(n_kept_ptr + e, tl.sum(union, axis=0))


@triton.jit
def _expert_rows_kernel(x_ptr, w_ptr, g_ptr, thr_ptr, cut_ptr, kept_ptr, n_kept_ptr, out_ptr, row_start_ptr,
                        F, D, stride_we, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                        GATHER: tl.constexpr, PRE_ACT: tl.constexpr, EVEN_D: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Program (expert e, block of neuron slots): ``out[n, j] = W[e, f_j] . x[n]`` for the expert's tokens.
    Plain (gate): ``f_j = j`` over all F. GATHER (up): ``f_j = kept[e, j]`` for ``j < n_kept[e]`` only, and
    ``out = keep * silu(g) * (W x)`` (the SwiGLU product) in compacted columns."""
    e = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    if GATHER:
        n_slots = tl.load(n_kept_ptr + e)
        if tl.program_id(1) * BLOCK_F >= n_slots:
            return
        f_ok = j < n_slots
        f = tl.load(kept_ptr + e.to(tl.int64) * F + j, mask=f_ok, other=0)
    else:
        f_ok = j < F
        f = j
    start = tl.load(row_start_ptr + e)
    n_rows = tl.load(row_start_ptr + e + 1) - start
    w_base = w_ptr + e.to(tl.int64) * stride_we + f[:, None].to(tl.int64) * D
    for n0 in range(0, n_rows, BLOCK_N):  # decode: one chunk; more tokens stay correct (weights re-read)
        n = n0 + tl.arange(0, BLOCK_N)
        row_ok = n < n_rows
        rows = (start + n).to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_F), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D if not EVEN_D else d >= 0
            x = tl.load(x_ptr + rows[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            w = tl.load(w_base + d[None, :], mask=f_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST_DOT:
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        if GATHER:
            a, keep = _silu_keep(g_ptr, thr_ptr, cut_ptr, rows, row_ok, f, f_ok, F, PRE_ACT)
            acc = tl.where(keep, a * acc, 0.0)
        tl.store(out_ptr + rows[:, None] * F + j[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & f_ok[None, :])


@triton.jit
def _expert_down_kernel(h_ptr, w_ptr, kept_ptr, n_kept_ptr, y_ptr, row_start_ptr, F, D, stride_we,
                        BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Program (expert e, hidden block): ``y[n, d] = sum_j h[n, j] W_down[e, d, kept[e, j]]`` over the
    compacted kept neurons only (``W_down`` contiguous ``[E, D, F]``)."""
    e = tl.program_id(0)
    start = tl.load(row_start_ptr + e)
    n_rows = tl.load(row_start_ptr + e + 1) - start
    n_slots = tl.load(n_kept_ptr + e)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    w_base = w_ptr + e.to(tl.int64) * stride_we + d[None, :].to(tl.int64) * F
    for n0 in range(0, n_rows, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        row_ok = n < n_rows
        rows = (start + n).to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for j0 in range(0, n_slots, BLOCK_F):
            j = j0 + tl.arange(0, BLOCK_F)
            j_ok = j < n_slots
            f = tl.load(kept_ptr + e.to(tl.int64) * F + j, mask=j_ok, other=0)
            h = tl.load(h_ptr + rows[:, None] * F + j[None, :], mask=row_ok[:, None] & j_ok[None, :], other=0.0)
            w = tl.load(w_base + f[:, None], mask=j_ok[:, None] & (d < D)[None, :], other=0.0)
            if UPCAST_DOT:
                h, w = h.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(h, w, acc, input_precision=PRECISION)
        tl.store(y_ptr + rows[:, None] * D + d[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (d < D)[None, :])


def _largest_pow2_block(D: int, cap: int) -> int:
    block = 16
    while block * 2 <= cap and D % (block * 2) == 0:
        block *= 2
    return block


def row_starts(tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """``[E + 1]`` int32 first row of each expert, then the end of the live rows, on the counts' device (what the
    decode kernels take; no host sync)."""
    return torch.nn.functional.pad(group_offsets(tokens_per_expert_E), (1, 0))


@torch.no_grad()
def mone_decode(x_ND: torch.Tensor, row_start_E1: torch.Tensor, w_gate_EFD: torch.Tensor, w_up_EFD: torch.Tensor,
                w_down_EDF: torch.Tensor, keep_k: int, score: Score) -> torch.Tensor:
    """Inference forward of grouped MoNE experts (no grad). ``row_start_E1`` on the device (see :func:`row_starts`)
    keeps the call free of host syncs, so it can be captured in a CUDA graph. Correct for any token count;
    fast while experts have few tokens (each chunk of 16 tokens re-reads the kept weights)."""
    N, D = x_ND.shape
    E, F, _ = w_gate_EFD.shape
    w_gate_EFD, w_up_EFD, w_down_EDF = w_gate_EFD.contiguous(), w_up_EFD.contiguous(), w_down_EDF.contiguous()
    upcast = interpreter_on() and x_ND.dtype != torch.float32
    common = dict(BLOCK_N=16, PRECISION="ieee" if x_ND.dtype == torch.float32 or upcast else "tf32",
                  UPCAST_DOT=upcast)
    block_d = _largest_pow2_block(D, 256)
    rows_kw = dict(BLOCK_F=16, BLOCK_D=block_d, PRE_ACT=score == "pre_act", EVEN_D=D % block_d == 0, **common)
    grid_f = (E, triton.cdiv(F, 16))
    g_NF = x_ND.new_empty(N, F)
    _expert_rows_kernel[grid_f](x_ND, w_gate_EFD, None, None, None, None, None, g_NF, row_start_E1, F, D, F * D,
                                GATHER=False, **rows_kw)
    _, thr_N, cut_N = select_swiglu(g_NF, None, keep_k, score)
    kept_EJ = torch.empty(E, F, dtype=torch.int32, device=x_ND.device)
    n_kept_E = torch.empty(E, dtype=torch.int32, device=x_ND.device)
    _expert_union_kernel[(E,)](g_NF, thr_N, cut_N, row_start_E1, kept_EJ, n_kept_E, F, BLOCK_F=row_block(F),
                               PRE_ACT=score == "pre_act", num_warps=8 if F > 2048 else 4)
    h_NJ = torch.empty_like(g_NF)
    _expert_rows_kernel[grid_f](x_ND, w_up_EFD, g_NF, thr_N, cut_N, kept_EJ, n_kept_E, h_NJ, row_start_E1, F, D,
                                F * D, GATHER=True, **rows_kw)
    y_ND = x_ND.new_empty(N, D)
    _expert_down_kernel[(E, triton.cdiv(D, 64))](h_NJ, w_down_EDF, kept_EJ, n_kept_E, y_ND, row_start_E1, F, D,
                                                 F * D, BLOCK_F=64, BLOCK_D=64, **common)
    return y_ND
