"""Expert-parallel all-to-all dispatcher, and :func:`shard_moe_layer` to turn a single-device MoELayer into this
rank's piece of an EP (and TP) layer.

Shape legend: ``T`` tokens given to the layer (TP-replicated), ``t`` this TP rank's ``T/tp`` of them, ``K`` routed
experts per token, ``N`` routing slots this rank sends (kept slots of its ``t`` tokens), ``M`` slots it receives
and computes, ``D`` hidden, ``E`` experts, ``L`` local experts (``E/ep``), ``P`` EP ranks.

Layout (docs/architecture.md): experts are not tensor-parallel; EP rank r owns experts ``[r*L, (r+1)*L)``. With
TP>1 every TP rank routes the same tokens, keeps its contiguous ``1/tp`` slice, dispatches that over the EP group,
and the outputs are all-gathered over TP, so no expert computes a token twice and the router (which sees the
full replicated batch) gets identical gradients on every TP rank.

One call, phase by phase (each phase is local-only or collective-only; "local" phases that split over TP are
local in forward and all-gather in backward):
   1. local       TP slice of tokens/routing; group the kept slots by global expert (``moe_core.permute``)
   2. collective  all-to-all of per-expert counts over EP
   3. local       split sizes per EP rank (Python lists) and the regroup order of the received rows
   4. collective  all-to-all of token rows
   5. local       received rows (source rank, local expert) -> grouped by local expert
   6. local       experts
   7. local       undo the regroup
   8. collective  all-to-all of outputs back to the source ranks
   9. local       unpermute + router-weighted combine (fp32 accumulation, cast back; ``unpermute_tokens``)
  10. collective  all-gather of the outputs over TP

Gradients: each all-to-all's backward is the reverse all-to-all, so an expert's weight gradient on its owner rank
is the sum over every token routed to it from the whole EP group; expert-DP reduction happens elsewhere
(``parallel/grads.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moe_core.experts import SwiGLUExperts
from moe_core.layer import MoELayer
from moe_core.permute import make_permutation, permute_tokens, sort_by_expert, unpermute_tokens
from moe_core.profiling import phase
from parallel.comm import ProcessGroup, all_to_all, check_group, gather_dim0, group_rank, group_size, split_dim0

__all__ = ["AllToAllDispatcher", "EPLayout", "shard_moe_layer"]


@dataclass(frozen=True)
class EPLayout:
    """Who sends what to whom in one call (the same numbers serve forward and backward)."""

    send_splits: list[int]
    """Rows this rank sends to each EP rank (its kept slots grouped by destination)."""
    recv_splits: list[int]
    """Rows this rank receives from each EP rank."""
    tokens_per_local_expert_L: torch.Tensor
    """int64 received rows per local expert, summed over source ranks, on the token device."""
    regroup_M: Optional[torch.Tensor]
    """int64 order taking received rows (by source rank, then local expert) to rows grouped by local expert;
    None when that order already is grouped (one EP rank or one local expert), which saves two row copies."""


class AllToAllDispatcher:
    """``__call__(x_TD, topk_idx_TK, topk_weight_TK, experts) -> y_TD`` (the MoELayer dispatcher protocol) with
    ``experts`` holding only this EP rank's experts (``experts.first_expert == ep_rank * E/ep``).

    Groups are passed in explicitly (megatron-core's TP group and expert-model-parallel group); a group of one
    rank costs no communication, so the same class serves EP only (tp=1), TP only (ep=1) and both.
    """

    def __init__(self, tp_group: ProcessGroup, ep_group: ProcessGroup, num_experts: int):
        check_group(tp_group, f"{type(self).__name__} tp_group")
        check_group(ep_group, f"{type(self).__name__} ep_group")
        self.tp_group, self.ep_group, self.num_experts = tp_group, ep_group, num_experts
        self.ep_size, self.ep_rank = group_size(ep_group), group_rank(ep_group)
        if num_experts % self.ep_size:
            raise ValueError(f"AllToAllDispatcher: moe.num_experts ({num_experts}) must be divisible by the EP "
                             f"group size ({self.ep_size}); change moe.num_experts or parallel.ep")
        self.num_local = num_experts // self.ep_size

    # -- phases (public so other dispatchers, e.g. LLEP, can reuse them) -----------------------------------------

    def tp_slice(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor,
                 topk_weight_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Local-only (backward all-gathers over TP): this TP rank's contiguous ``t = T/tp`` tokens and their
        routing. The weights go through ``split_dim0`` too, so the router gets the grads of every TP rank's slice."""
        return tuple(split_dim0(t, self.tp_group) for t in (x_TD, topk_idx_TK, topk_weight_TK))

    def exchange_counts(self, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Collective-only: ``recv_PL[s, l]`` = slots EP rank ``s`` sends to this rank's local expert ``l``."""
        splits = [self.num_local] * self.ep_size
        return all_to_all(tokens_per_expert_E, splits, splits, self.ep_group).view(self.ep_size, self.num_local)

    def layout(self, tokens_per_expert_E: torch.Tensor, recv_PL: torch.Tensor) -> EPLayout:
        """Local-only: split sizes (one device-to-host copy) and the regroup order of the received rows."""
        send_rows, recv_rows = torch.stack([tokens_per_expert_E.view(self.ep_size, self.num_local), recv_PL]).tolist()
        return self.layout_from_host(send_rows, recv_rows, recv_PL)

    def layout_from_host(self, send_rows: list[list[int]], recv_rows: list[list[int]],
                         recv_PL: torch.Tensor) -> EPLayout:
        """Local-only, no host sync: the layout from counts already on the host. ``send_rows[r][l]`` = slots this
        rank sends to rank r's local expert l; ``recv_rows[s][l]`` (host) and ``recv_PL`` (int64 on the token
        device, same values) = slots rank s sends to this rank's local expert l."""
        send_splits, recv_splits = [sum(r) for r in send_rows], [sum(r) for r in recv_rows]
        regroup_M = None
        if self.ep_size > 1 and self.num_local > 1:
            # Received rows come grouped by source rank, then local expert; label each with its local expert and
            # stable-sort by label to group them by local expert (source-rank order kept inside an expert).
            local_expert_M = torch.arange(self.num_local, device=recv_PL.device).repeat(self.ep_size)
            local_expert_M = torch.repeat_interleave(local_expert_M, recv_PL.reshape(-1),
                                                     output_size=sum(recv_splits))
            regroup_M, _ = sort_by_expert(local_expert_M, self.num_local)
        return EPLayout(send_splits, recv_splits, recv_PL.sum(0), regroup_M)

    @staticmethod
    def regroup(x_MD: torch.Tensor, layout: EPLayout) -> torch.Tensor:
        """Local-only: received rows -> rows grouped by local expert."""
        return x_MD if layout.regroup_M is None else x_MD.index_select(0, layout.regroup_M)

    @staticmethod
    def undo_regroup(y_MD: torch.Tensor, layout: EPLayout) -> torch.Tensor:
        """Local-only: inverse of :meth:`regroup` (back to received order)."""
        if layout.regroup_M is None:
            return y_MD
        return torch.empty_like(y_MD).index_copy(0, layout.regroup_M, y_MD)

    # -- call -----------------------------------------------------------------------------------------------------

    def check_experts(self, experts: SwiGLUExperts) -> None:
        first = self.ep_rank * self.num_local
        if experts.num_local_experts != self.num_local or experts.first_expert != first:
            raise ValueError(
                f"AllToAllDispatcher on EP rank {self.ep_rank}/{self.ep_size} expects experts "
                f"[{first}, {first + self.num_local}) but got experts [{experts.first_expert}, "
                f"{experts.first_expert + experts.num_local_experts}); build the layer with "
                f"parallel.dispatch.shard_moe_layer (or SwiGLUExperts(E/ep, ..., first_expert=ep_rank*E/ep))")

    @torch.compiler.disable  # host split sizes and collectives: eager under train.compile (parallel/compile.py)
    def __call__(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                 experts: SwiGLUExperts) -> torch.Tensor:
        self.check_experts(experts)
        x_tD, idx_tK, weight_tK = self.tp_slice(x_TD, topk_idx_TK, topk_weight_TK)          # 1 local
        with phase("permute"):
            perm = make_permutation(idx_tK, self.num_experts)
            x_ND = permute_tokens(x_tD, perm)
        recv_PL = self.exchange_counts(perm.tokens_per_expert_E)                              # 2 collective
        layout = self.layout(perm.tokens_per_expert_E, recv_PL)                               # 3 local
        y_tD = self.exchange_and_compute(x_ND, perm, weight_tK, layout, experts)              # 4-9
        return gather_dim0(y_tD, self.tp_group)                                               # 10 collective

    def exchange_and_compute(self, x_ND: torch.Tensor, perm, weight_tK: torch.Tensor, layout: EPLayout,
                             experts: SwiGLUExperts) -> torch.Tensor:
        """Phases 4-9: permuted rows ``x_ND`` (kept rows first, then dead rows, which are not sent) -> this TP
        rank's combined outputs ``y_tD``."""
        x_MD = all_to_all(x_ND[:sum(layout.send_splits)], layout.recv_splits, layout.send_splits,
                          self.ep_group)                                                      # 4 collective
        x_grouped_MD = self.regroup(x_MD, layout)                                             # 5 local
        with phase("experts"):
            y_grouped_MD = experts(x_grouped_MD, layout.tokens_per_local_expert_L)            # 6 local
        y_MD = self.undo_regroup(y_grouped_MD, layout)                                        # 7 local
        y_ND = all_to_all(y_MD, layout.send_splits, layout.recv_splits, self.ep_group)       # 8 collective
        with phase("unpermute"):
            return unpermute_tokens(y_ND, perm, weight_tK, perm.row_TK.shape[0])              # 9 local


def shard_moe_layer(layer: MoELayer, groups) -> MoELayer:
    """In place: keep only this EP rank's experts (weights copied from the full layer's) and install an
    :class:`AllToAllDispatcher` over ``groups.tp_group`` / ``groups.ep_group`` (a ``ParallelGroups``).

    The router stays whole (it is replicated). Call it on a layer that still holds all ``moe.num_experts``
    experts, built identically (same seed) on every rank. Returns the layer.
    """
    full, num_experts = layer.experts, layer.cfg.num_experts
    if full.num_local_experts != num_experts or full.first_expert != 0:
        raise ValueError(f"shard_moe_layer needs a layer holding all {num_experts} experts, got experts "
                         f"[{full.first_expert}, {full.first_expert + full.num_local_experts}) (already sharded?)")
    dispatcher = AllToAllDispatcher(groups.tp_group, groups.ep_group, num_experts)
    first, n = dispatcher.ep_rank * dispatcher.num_local, dispatcher.num_local
    with torch.device("meta"):  # no init: weights are copied below, and the global RNG stream stays untouched
        local = SwiGLUExperts(n, full.hidden, full.ffn, full.mone, first_expert=first)
    local = local.to_empty(device=full.w_gate_EFD.device).to(full.w_gate_EFD.dtype).train(full.training)
    with torch.no_grad():
        for name, param in local.named_parameters():
            param.copy_(getattr(full, name)[first:first + n])
    layer.experts, layer.dispatcher = local, dispatcher
    return layer
