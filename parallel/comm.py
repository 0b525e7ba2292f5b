"""Autograd-aware collectives over an explicit process group (works on gloo and NCCL).

Every function takes the process group as an argument (never a global) and is the identity, with no
communication, when the group has a single rank. A group is a ``torch.distributed.ProcessGroup`` (megatron's
groups, or ``dist.group.WORLD`` when the world really is meant) or :data:`SINGLE_PROCESS` (this process alone, no
torch.distributed needed). ``None`` is rejected with a ValueError: torch.distributed would read it as the whole
world, which silently turned a forgotten TP group into a TP group of every rank (issue 17).

- ``all_to_all(x, output_splits, input_splits, group)``: variable-size all-to-all along dim 0. Split sizes are
  Python lists of ints (gloo requires lists; NCCL accepts them). Backward is the reverse all-to-all.
- ``split_dim0(x, group)``: keep this rank's contiguous 1/size slice of dim 0; backward all-gathers the grads.
  Use it on a tensor that is replicated across the group, whose every slice feeds a different rank.
- ``gather_dim0(x, group)``: all-gather along dim 0; backward keeps this rank's slice of the grad with NO
  reduction, because the loss downstream is computed identically on every rank (the incoming grad is replicated).
- ``all_reduce_sum(x, group)``: sum over the group; backward sums the gradients over the group too, because each
  rank feeds the sum into its OWN computation (a norm over a TP-split projection), not a replicated one.
- ``all_reduce_counts(counts, group)``: summed copy of an integer tensor (no autograd).

Numerics: these move bytes; nothing is added except integer counts, so results are exact. Uneven all-gather and
reduce-scatter are rejected by gloo, so split/gather demand dim 0 divisible by the group size (checked with an
error naming the fix) and only ``all_to_all`` handles ragged sizes.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.distributed as dist


class SingleProcess:
    """The explicit group of this process alone: every collective on it is the identity."""

    def __repr__(self) -> str:
        return "SINGLE_PROCESS"

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


SINGLE_PROCESS = SingleProcess()
ProcessGroup = Union[dist.ProcessGroup, SingleProcess]

# torch >= 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns); keep older torch working.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def check_group(group: ProcessGroup, what: str = "process group") -> ProcessGroup:
    """``group`` itself; ValueError if it is None (a missing group is never the world)."""
    if group is None:
        raise ValueError(f"{what} is None: pass the process group explicitly (megatron's group from "
                         f"parallel.groups.ParallelGroups, dist.group.WORLD if the world is meant, or "
                         f"parallel.comm.SINGLE_PROCESS for one process); None is never taken as the world")
    return group


def group_size(group: ProcessGroup) -> int:
    if isinstance(check_group(group), SingleProcess):
        return 1
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup) -> int:
    if isinstance(check_group(group), SingleProcess):
        return 0
    return dist.get_rank(group)


def _check_splits(name: str, splits: Sequence[int], group: ProcessGroup) -> list[int]:
    if isinstance(splits, torch.Tensor) or not all(isinstance(s, int) and s >= 0 for s in splits):
        raise TypeError(f"all_to_all: {name} must be a list of non-negative Python ints (call .tolist() on a "
                        f"counts tensor; gloo rejects tensors), got {splits!r}")
    if len(splits) != group_size(group):
        raise ValueError(f"all_to_all: {name} has {len(splits)} entries but the group has {group_size(group)} ranks")
    return list(splits)


def _all_to_all_raw(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                    group: ProcessGroup) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return _all_to_all_raw(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_out):
        output_splits, input_splits = ctx.splits
        # Rows received from rank r came from r's send buffer, so their grads go back by the reverse exchange.
        return _all_to_all_raw(grad_out, input_splits, output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
               group: ProcessGroup) -> torch.Tensor:
    """Send rows ``x[sum(input_splits[:r]) : ... + input_splits[r]]`` to rank r; receive ``output_splits[r]`` rows
    from rank r, concatenated in rank order. Differentiable in ``x``."""
    output_splits = _check_splits("output_splits", output_splits, group)
    input_splits = _check_splits("input_splits", input_splits, group)
    if sum(input_splits) != x.shape[0]:
        raise ValueError(f"all_to_all: input_splits sum to {sum(input_splits)} but x has {x.shape[0]} rows")
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, output_splits, input_splits, group)


def _check_divisible(fn: str, rows: int, size: int) -> None:
    if rows % size:
        raise ValueError(f"{fn}: dim 0 ({rows} rows) must be divisible by the group size ({size}); with tensor "
                         f"parallelism make micro_batch_size * seq_length divisible by parallel.tp")


def _own_slice(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    rows = x.shape[0] // group_size(group)
    return x.narrow(0, group_rank(group) * rows, rows).contiguous()


def _gather_raw(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((x.shape[0] * group_size(group),) + tuple(x.shape[1:]))
    _all_gather_single(out, x, group=group)
    return out


class _SplitDim0(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _own_slice(x, group)

    @staticmethod
    def backward(ctx, grad_out):
        # Each rank holds the grad of its own slice only; gathering them gives the full replicated-input grad.
        return _gather_raw(grad_out, ctx.group), None


class _GatherDim0(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_raw(x, group)

    @staticmethod
    def backward(ctx, grad_out):
        # The gathered output feeds an identical computation on every rank, so grad_out is already the full
        # gradient on each rank: summing over ranks would multiply it by the group size.
        return _own_slice(grad_out, ctx.group), None


def split_dim0(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """This rank's contiguous ``1/size`` slice of dim 0 (backward: all-gather of the slice grads)."""
    size = group_size(group)
    _check_divisible("split_dim0", x.shape[0], size)
    return x if size == 1 else _SplitDim0.apply(x, group)


def gather_dim0(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 in rank order (backward: keep own slice, no reduction).
    Every rank must pass the same shape."""
    return x if group_size(group) == 1 else _GatherDim0.apply(x, group)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # Every rank's loss term depends on every rank's x through the sum: d/dx_r = sum over ranks of grad_out.
        grad = grad_out.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sum of ``x`` over the group (every rank passes the same shape), differentiable: the backward sums the
    gradients over the group as well (each rank uses the sum in its own, rank-specific computation)."""
    return x if group_size(group) == 1 else _AllReduceSum.apply(x, group)


def all_reduce_counts(counts: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sum of an integer counts tensor over the group (a new tensor; the input is left unchanged)."""
    if counts.is_floating_point():
        raise TypeError(f"all_reduce_counts expects an integer tensor, got {counts.dtype}")
    out = counts.clone()
    if group_size(group) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
