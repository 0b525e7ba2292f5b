"""Data-parallel gradient reduction, the de-duplicated global grad norm, and clipping (collective-only).

Reduction: the loss is the mean over the DP ranks' losses, L = (1/dp) sum_d L_d (the trainer scales each rank's
L_d by dp / the global label-token count, so L is the token-weighted mean: launcher/train/token_loss.py).
  * dense params are replicated over the DP group: sum their grads over DP, divide by dp;
  * expert params are replicated over the expert-DP group. After the EP all-to-all backward, an expert's grad on
    its owner already sums the contributions of every token its EP group sent it; summing over expert-DP adds the
    other EP groups, so the sum covers every DP rank's tokens exactly once -> divide by the DENSE dp as well.
Per-head q/k-norm weights under TP are first summed over TP (each rank saw only its heads). The embedding copy
MTP puts on the last pipeline stage (``parallel.sharding.share_embedding``) is summed with the first stage's over
the embedding group after the DP reduction (:func:`sum_pipeline_copies`), so both copies take the same update.
Norm: sum over local params of ||g||^2 / (number of ranks holding that same shard), all-reduced over the world:
every distinct shard is counted exactly once, whatever the TP/PP/EP layout.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from parallel.groups import ParallelGroups
from parallel.sharding import expert_and_dense, get_spec, pipeline_shared, replication

_BUCKET_ELEMS = 1 << 24


def _allreduce_bucketed(grads: list[torch.Tensor], group, scale: float) -> None:
    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        nonlocal bucket, size
        if not bucket:
            return
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=group)
        flat.mul_(scale)
        for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(synced)
        bucket, size = [], 0

    for g in grads:
        bucket.append(g)
        size += g.numel()
        if size >= _BUCKET_ELEMS:
            flush()
    flush()


def _ensure_grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Params that got no gradient this step (an expert no token reached) still take part with zeros, so every
    rank issues identical collectives."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def sync_grads(model: nn.Module, groups: ParallelGroups) -> None:
    expert, dense = expert_and_dense(model)
    dense_grads, expert_grads = _ensure_grads(dense), _ensure_grads(expert)
    if not groups.distributed:
        return
    partial = [p.grad for p in dense if get_spec(p).tp_partial_grad]
    if partial:  # per-head norms under TP: each rank holds the sum over its own heads only
        _allreduce_bucketed(partial, groups.tp_group, 1.0)
    scale = 1.0 / groups.dp_size
    if groups.dp_size > 1:
        _allreduce_bucketed(dense_grads, groups.dp_group, scale)
    if groups.edp_size > 1:
        _allreduce_bucketed(expert_grads, groups.edp_group, scale)
    elif scale != 1.0:
        for g in expert_grads:
            g.mul_(scale)
    sum_pipeline_copies([p.grad for p in pipeline_shared(model)], groups)


def sum_pipeline_copies(grads: list[torch.Tensor], groups: ParallelGroups) -> None:
    """Sum the gradients of parameters held by the first and the last pipeline stage (the MTP embedding copy) over
    ``groups.embedding_group``, in place. Collective-only over that group; a no-op when ``grads`` is empty."""
    if not grads:
        return
    if groups.embedding_group is None:
        raise RuntimeError("parameters with pipeline copies need groups.embedding_group (parallel.groups.initialize "
                           "sets it at PP > 1)")
    _allreduce_bucketed(grads, groups.embedding_group, 1.0)


def global_grad_norm_sq(model: nn.Module, groups: ParallelGroups) -> torch.Tensor:
    """Squared L2 norm of the full model's gradient (every distinct shard once), float64 0-dim on the model's
    device, no host read; inf/nan propagate."""
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in model.parameters():
        if p.grad is not None:
            total += p.grad.detach().double().pow(2).sum() / replication(get_spec(p), groups)
    if groups.distributed:
        dist.all_reduce(total)
    return total


def clip_grads(model: nn.Module, norm: float, max_norm: float) -> None:
    if max_norm <= 0 or not math.isfinite(norm) or norm <= max_norm:
        return
    coef = max_norm / (norm + 1e-6)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(coef)
