"""Non-interleaved 1F1B pipeline schedule over the megatron-core pipeline group (and its PP=1 special case).

Stage s runs ``pp - s - 1`` warm-up forwards, then alternates one forward / one backward, then drains the
remaining backwards; so at most ``pp - s`` micro-batches' activations are alive on stage s (GPipe keeps all).
Sends are non-blocking (``isend``) and receives blocking; with this order every receive has a matching send that
is already issued or will be issued without waiting on it, so the schedule cannot deadlock. Activations travel
in fp32 between stages whatever the compute dtype (the receiving stage casts them to its own).

The last stage's output of each micro-batch (a scalar loss) is multiplied by ``loss_scale`` before its backward
(the trainer's outputs are loss sums and its scale dp / the step's label tokens, so the gradient is that of the
token-weighted mean loss: ``launcher/train/token_loss.py``). A last stage may instead return ``(loss, extra)``:
``loss`` is reported and scaled as above, ``extra`` (a 0-dim objective already scaled, e.g. the multi-token
prediction loss) is added to the backward as it is. The MoE aux-loss scale is set to 1/micro-batches: the
aux and z losses are per-micro-batch means, averaged over the step's micro-batches (and over DP by the gradient
reduction).
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, Union

import torch
import torch.distributed as dist

from moe_core.aux_loss import AuxLossAutoScaler
from parallel.groups import ParallelGroups

# forward_fn(model, micro_batch, input_BSD_or_None) -> output (hidden [B,S,D] or, on the last stage, a loss scalar
# or (loss scalar, extra scaled objective scalar))
ForwardFn = Callable[[torch.nn.Module, dict, Optional[torch.Tensor]],
                     Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]


class _P2P:
    """Point-to-point activations/gradients between neighbouring stages (collective-only)."""

    def __init__(self, groups: ParallelGroups, shape: tuple[int, ...], device: torch.device):
        self.groups, self.shape, self.device = groups, shape, device
        self.pending: list[dist.Work] = []

    def _peer(self, offset: int) -> int:
        return self.groups.pp_ranks[self.groups.pp_rank + offset]

    def send(self, tensor: torch.Tensor, offset: int) -> None:
        self.pending.append(dist.isend(tensor.detach().float().contiguous(), self._peer(offset),
                                       group=self.groups.pp_group))

    def recv(self, offset: int) -> torch.Tensor:
        buf = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        dist.recv(buf, self._peer(offset), group=self.groups.pp_group)
        return buf

    def drain(self) -> None:
        for work in self.pending:
            work.wait()
        self.pending.clear()


def forward_backward(model: torch.nn.Module, micro_batches: list[dict], forward_fn: ForwardFn,
                     groups: ParallelGroups, hidden_shape: tuple[int, ...],
                     loss_scale: Union[float, torch.Tensor] = 1.0, forward_only: bool = False,
                     no_sync: Callable[[], ContextManager] = contextlib.nullcontext) -> list[torch.Tensor]:
    """Run all micro-batches of one step through this stage; returns the (unscaled, detached) per-micro-batch
    last-stage outputs (0-dim losses) on the last stage, an empty list elsewhere. Each is multiplied by
    ``loss_scale`` (a float or a 0-dim device tensor; read on the last stage only) before its backward, and the
    MoE aux-loss scale is 1/len(micro_batches) meanwhile. Gradients accumulate (``.grad``, or the distributed
    optimizer's ``main_grad``). Every backward but the last runs inside ``no_sync()``, so a data-parallel reduction
    overlapped with backward starts only in the last one."""
    n = len(micro_batches)
    previous_scale = AuxLossAutoScaler.loss_scale()
    AuxLossAutoScaler.set_loss_scale(1.0 / n)
    try:
        return _run_schedule(model, micro_batches, forward_fn, groups, hidden_shape, loss_scale, forward_only, n,
                             no_sync)
    finally:  # the scale is process-global: leave it as found
        AuxLossAutoScaler.set_loss_scale(previous_scale)


def _run_schedule(model: torch.nn.Module, micro_batches: list[dict], forward_fn: ForwardFn, groups: ParallelGroups,
                  hidden_shape: tuple[int, ...], loss_scale: Union[float, torch.Tensor], forward_only: bool, n: int,
                  no_sync: Callable[[], ContextManager]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    p2p = _P2P(groups, hidden_shape, device)
    first, last = groups.is_first_stage, groups.is_last_stage
    pending: list[tuple[Optional[torch.Tensor], torch.Tensor]] = []
    losses: list[torch.Tensor] = []

    def run_forward(i: int) -> None:
        x = None
        if not first:
            x = p2p.recv(-1).requires_grad_(not forward_only)
        with torch.set_grad_enabled(not forward_only):
            out = forward_fn(model, micro_batches[i], x)
        if last:
            out, extra = out if isinstance(out, tuple) else (out, None)
            losses.append(out.detach())
            out = out * loss_scale if extra is None else out * loss_scale + extra
        else:
            p2p.send(out, +1)
        if not forward_only:
            pending.append((x, out))

    backwards = [0]

    def run_backward() -> None:
        x, out = pending.pop(0)
        grad = None if last else p2p.recv(+1).to(out.dtype)
        backwards[0] += 1
        with contextlib.nullcontext() if backwards[0] == n else no_sync():
            out.backward(grad)
        if not first:
            p2p.send(x.grad, -1)

    warmup = n if forward_only else min(groups.pp_size - groups.pp_rank - 1, n)
    for i in range(warmup):
        run_forward(i)
    for i in range(warmup, n):
        run_forward(i)
        run_backward()
    while pending:
        run_backward()
    p2p.drain()
    return losses
