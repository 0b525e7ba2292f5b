"""Grouped expert GEMMs on device-resident group sizes (no host sync): ``torch._grouped_mm`` with fallbacks.

Shape legend: ``N`` rows grouped by expert, ``E`` experts (groups), ``O``/``I`` a weight's output/input width.
``tokens_per_expert_E`` (int64 tensor of E counts on the rows' device) says how many consecutive rows belong to
each group; rows past its sum are dead rows (capacity-dropped slots, ``moe_core/permute.py``): their outputs are
unspecified (not zeroed) and they contribute nothing to any weight gradient.

Every function is one ``torch._grouped_mm`` call (a single grouped GEMM on CUDA, a correct kernel on CPU) with the
group offsets computed on the device, wherever that op takes the operands (:func:`grouped_mm_usable`), and a
per-expert loop otherwise (fp64, no rows, or CUDA dtypes/strides it rejects: fp32 on CUDA). The loop reads the
counts on the host (one sync), so bf16 on CUDA and fp32/bf16 on CPU never take it; fp32 training on a GPU does
(train.precision says so). All compute in the input
dtype with fp32 accumulation inside the GEMM.
"""
from __future__ import annotations

import torch

_GROUPED_MM_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16), "cuda": (torch.bfloat16,)}
_ALIGN_BYTES = 16  # torch._grouped_mm needs 16-byte aligned row strides (CPU and CUDA)


def grouped_mm_usable(x_NI: torch.Tensor, w_EOI: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` accepts these operands (otherwise the per-expert loop is used)."""
    if not hasattr(torch, "_grouped_mm") or x_NI.dtype != w_EOI.dtype or x_NI.shape[0] == 0:
        # no rows: torch._grouped_mm's backward rejects the stride-0 [0, O] gradient (which .contiguous() keeps)
        return False
    if x_NI.dtype not in _GROUPED_MM_DTYPES.get(x_NI.device.type, ()):
        return False
    elem = x_NI.element_size()
    return (w_EOI.shape[1] * elem) % _ALIGN_BYTES == 0 and (w_EOI.shape[2] * elem) % _ALIGN_BYTES == 0


def check_groups(x_NI: torch.Tensor, num_groups: int, tokens_per_expert_E: torch.Tensor) -> None:
    """Static checks only (shape, dtype, device): the counts' values stay on the device and are not read."""
    if not isinstance(tokens_per_expert_E, torch.Tensor):
        raise TypeError(f"tokens_per_expert_E must be an int64 tensor on the rows' device, got "
                        f"{type(tokens_per_expert_E).__name__}: keep the counts on the device (no host round trip)")
    if tokens_per_expert_E.shape != (num_groups,) or tokens_per_expert_E.dtype != torch.int64:
        raise ValueError(f"tokens_per_expert_E must be an int64 tensor of shape ({num_groups},) (one count per "
                         f"expert), got {tokens_per_expert_E.dtype} {tuple(tokens_per_expert_E.shape)}")
    if tokens_per_expert_E.device != x_NI.device:
        raise ValueError(f"tokens_per_expert_E is on {tokens_per_expert_E.device} but the rows are on "
                         f"{x_NI.device}; keep the counts on the token device (no host round trip)")


def group_offsets(tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """int32 ``[E]`` end row of each group (``cumsum``) on the counts' device: ``torch._grouped_mm``'s ``offs``."""
    return tokens_per_expert_E.cumsum(0).to(torch.int32)


def group_of_rows(end_E: torch.Tensor, num_rows: int) -> torch.Tensor:
    """int64 ``[num_rows]``: the group of each row given each group's end row ``end_E`` (cumulative, any integer
    dtype, on the device); ``E`` for rows past the last group (dead rows). No host sync."""
    rows_N = torch.arange(num_rows, device=end_E.device, dtype=end_E.dtype)
    return torch.searchsorted(end_E, rows_N, right=True)


def _host_splits(x_NI: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> tuple[list[int], int]:
    splits = tokens_per_expert_E.tolist()  # the loop fallback's one host sync
    return splits, x_NI.shape[0] - sum(splits)


def _loop_matmul(x_NI: torch.Tensor, w_EIO: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Per-expert ``x[rows of e] @ w_EIO[e]`` (differentiable; one host sync); dead rows get zeros."""
    splits, dead = _host_splits(x_NI, tokens_per_expert_E)
    outs = [x_nI @ w_EIO[e] for e, x_nI in enumerate(x_NI[:x_NI.shape[0] - dead].split(splits))]
    return torch.cat(outs + [x_NI.new_zeros(dead, w_EIO.shape[2])])


def grouped_matmul(x_NI: torch.Tensor, w_EIO: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """``y_NO``: rows of group e times ``w_EIO[e]`` (``[I, O]``, any strides), not differentiable (kernels' own
    backward passes use it). Dead rows: unspecified on the grouped GEMM, zeros on the loop."""
    check_groups(x_NI, w_EIO.shape[0], tokens_per_expert_E)
    if grouped_mm_usable(x_NI, w_EIO):
        return torch._grouped_mm(x_NI.contiguous(), w_EIO, offs=group_offsets(tokens_per_expert_E))
    return _loop_matmul(x_NI, w_EIO, tokens_per_expert_E)


def grouped_weight_grad(dy_NO: torch.Tensor, x_NI: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """``dw_EOI[e] = dy[rows of e]^T @ x[rows of e]`` (zeros for a group with no rows; dead rows ignored)."""
    E = tokens_per_expert_E.shape[0]
    check_groups(x_NI, E, tokens_per_expert_E)
    if grouped_mm_usable(x_NI, dy_NO.new_empty(1, dy_NO.shape[1], x_NI.shape[1])):
        return torch._grouped_mm(dy_NO.t(), x_NI.contiguous(), offs=group_offsets(tokens_per_expert_E))
    splits, dead = _host_splits(x_NI, tokens_per_expert_E)
    live = x_NI.shape[0] - dead
    dw = [dy_nO.t() @ x_nI for dy_nO, x_nI in zip(dy_NO[:live].split(splits), x_NI[:live].split(splits))]
    return torch.stack(dw) if dw else dy_NO.new_zeros(0, dy_NO.shape[1], x_NI.shape[1])


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (``torch._grouped_mm``'s backward rejects
    stride-0 gradients such as the one ``y.sum()`` produces)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> torch.Tensor:
        return grad_y.contiguous()


def loop_linear(x_NI: torch.Tensor, w_EOI: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Per-expert ``F.linear`` over the groups, differentiable (the fallback and the reference for
    :func:`grouped_linear`; one host sync). Dead rows get zeros."""
    check_groups(x_NI, w_EOI.shape[0], tokens_per_expert_E)
    return _loop_matmul(x_NI, w_EOI.transpose(-2, -1), tokens_per_expert_E)


def grouped_linear(x_NI: torch.Tensor, w_EOI: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Differentiable ``y_NO``: rows of group e times ``w_EOI[e].T``; one grouped GEMM (autograd's backward is
    grouped GEMMs too) where :func:`grouped_mm_usable`, :func:`loop_linear` otherwise.

    Errors: ValueError for counts that are not an int64 ``[E]`` tensor on the rows' device or a width mismatch."""
    if x_NI.shape[1] != w_EOI.shape[2]:
        raise ValueError(f"x has width {x_NI.shape[1]} but the expert weights expect {w_EOI.shape[2]}")
    if not grouped_mm_usable(x_NI, w_EOI):
        return loop_linear(x_NI, w_EOI, tokens_per_expert_E)
    check_groups(x_NI, w_EOI.shape[0], tokens_per_expert_E)
    y_NO = torch._grouped_mm(x_NI.contiguous(), w_EOI.contiguous().transpose(-2, -1),
                             offs=group_offsets(tokens_per_expert_E))
    return _ContiguousGrad.apply(y_NO)
