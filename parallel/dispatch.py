"""Expert-parallel all-to-all dispatcher, and :func:`shard_moe_layer` to turn a single-device MoELayer into this
rank's piece of an EP (and TP) layer.

Shape legend: ``T`` tokens given to the layer (TP-replicated), ``t`` this TP rank's ``T/tp`` of them, ``K`` routed
experts per token, ``N`` routing slots this rank sends (kept slots of its ``t`` tokens), ``M`` slots it receives
and computes, ``D`` hidden, ``E`` experts, ``L`` local experts (``E/ep``), ``P`` EP ranks.

Layout (docs/architecture.md): experts are not tensor-parallel; EP rank r owns experts ``[r*L, (r+1)*L)``. With
TP>1 every TP rank routes the same tokens, keeps its contiguous ``1/tp`` slice, dispatches that over the EP group,
and the outputs are all-gathered over TP, so no expert computes a token twice and the router (which sees the
full replicated batch) gets identical gradients on every TP rank.

Phases (``moe_core.dispatcher``; the TP split in ``dispatch_preprocess`` is local in forward and an all-gather in
backward):
  dispatch_preprocess   local       TP slice of tokens/routing; group the kept slots by global expert
                                    (``moe_core.permute``)
  token_dispatch        collective  all-to-all of per-expert counts over EP, ONE device-to-host copy of them (the
                                    split sizes), all-to-all of the kept rows
  dispatch_postprocess  local       received rows (source rank, local expert) -> grouped by local expert
  compute_experts       local       the local experts (the protocol's default)
  combine_preprocess    local       undo the regroup
  token_combine         collective  all-to-all of outputs back to the source ranks
  combine_postprocess   local       unpermute + router-weighted combine (fp32 accumulation, cast back;
                                    ``unpermute_tokens``)
  gather_output         collective  all-gather of the outputs over TP

Gradients: each all-to-all's backward is the reverse all-to-all, so an expert's weight gradient on its owner rank
is the sum over every token routed to it from the whole EP group; expert-DP reduction happens elsewhere
(``parallel/optim/grads.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from moe_core.dispatcher import DispatchState, TokenDispatcher
from moe_core.experts import SwiGLUExperts
from moe_core.layer import MoELayer
from moe_core.permute import make_permutation, permute_tokens, sort_by_expert, unpermute_tokens
from parallel.comm import ProcessGroup, all_to_all, check_group, gather_dim0, group_rank, group_size, split_dim0

__all__ = ["AllToAllDispatcher", "EPState", "shard_moe_layer"]


@dataclass
class EPState(DispatchState):
    """One call's bookkeeping: who sends what to whom (the same numbers serve forward and backward)."""

    send_splits: list[int] = field(default_factory=list)
    """Rows this rank sends to each EP rank (its kept slots grouped by destination); set by ``token_dispatch``."""
    recv_splits: list[int] = field(default_factory=list)
    """Rows this rank receives from each EP rank; set by ``token_dispatch``."""
    recv_PL: Optional[torch.Tensor] = None
    """int64 ``recv_PL[s, l]`` = rows EP rank ``s`` sends to this rank's local expert ``l``, on the token device."""
    regroup_M: Optional[torch.Tensor] = None
    """int64 order taking received rows (by source rank, then local expert) to rows grouped by local expert;
    None when that order already is grouped (one EP rank or one local expert), which saves two row copies."""


class AllToAllDispatcher(TokenDispatcher):
    """The :class:`~moe_core.dispatcher.TokenDispatcher` phases over all-to-all, with ``experts`` holding only this
    EP rank's experts (``experts.first_expert == ep_rank * E/ep``).

    Groups are passed in explicitly (megatron-core's TP group and expert-model-parallel group); a group of one
    rank costs no communication, so the same class serves EP only (tp=1), TP only (ep=1) and both.
    """

    traceable = False  # host split sizes and collectives: eager under train.compile (parallel/compile.py)

    def __init__(self, tp_group: ProcessGroup, ep_group: ProcessGroup, num_experts: int):
        check_group(tp_group, f"{type(self).__name__} tp_group")
        check_group(ep_group, f"{type(self).__name__} ep_group")
        self.tp_group, self.ep_group, self.num_experts = tp_group, ep_group, num_experts
        self.ep_size, self.ep_rank = group_size(ep_group), group_rank(ep_group)
        if num_experts % self.ep_size:
            raise ValueError(f"AllToAllDispatcher: moe.num_experts ({num_experts}) must be divisible by the EP "
                             f"group size ({self.ep_size}); change moe.num_experts or parallel.ep")
        self.num_local = num_experts // self.ep_size
        self.state_type: type[EPState] = EPState
        """The state class ``dispatch_preprocess`` makes (a subclass adds its own bookkeeping)."""

    def check_experts(self, experts: SwiGLUExperts) -> None:
        first = self.ep_rank * self.num_local
        if experts.num_local_experts != self.num_local or experts.first_expert != first:
            raise ValueError(
                f"AllToAllDispatcher on EP rank {self.ep_rank}/{self.ep_size} expects experts "
                f"[{first}, {first + self.num_local}) but got experts [{experts.first_expert}, "
                f"{experts.first_expert + experts.num_local_experts}); build the layer with "
                f"parallel.dispatch.shard_moe_layer (or SwiGLUExperts(E/ep, ..., first_expert=ep_rank*E/ep))")

    # -- phases -------------------------------------------------------------------------------------------------

    def dispatch_preprocess(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                            experts: SwiGLUExperts) -> tuple[torch.Tensor, EPState]:
        """Local-only (backward all-gathers over TP): this TP rank's contiguous ``t = T/tp`` tokens, their routing
        slots grouped by global expert (kept rows first, then dead rows, which are never sent). The weights go
        through ``split_dim0`` too, so the router gets the grads of every TP rank's slice."""
        self.check_experts(experts)
        x_tD, idx_tK, weight_tK = (split_dim0(t, self.tp_group) for t in (x_TD, topk_idx_TK, topk_weight_TK))
        perm = make_permutation(idx_tK, self.num_experts)
        return permute_tokens(x_tD, perm), self.state_type(experts, perm, weight_tK)

    def token_dispatch(self, x_ND: torch.Tensor, state: EPState) -> torch.Tensor:
        """Collective-only: exchange the per-expert counts, read them on the host once (the split sizes), send the
        kept rows."""
        splits = [self.num_local] * self.ep_size
        recv_PL = all_to_all(state.perm.tokens_per_expert_E, splits, splits, self.ep_group)
        recv_PL = recv_PL.view(self.ep_size, self.num_local)
        send_rows, recv_rows = torch.stack([state.perm.tokens_per_expert_E.view(self.ep_size, self.num_local),
                                            recv_PL]).tolist()
        self.set_splits(state, send_rows, recv_rows, recv_PL)
        return self.send_rows(x_ND, state)

    @staticmethod
    def set_splits(state: EPState, send_rows: list[list[int]], recv_rows: list[list[int]],
                   recv_PL: torch.Tensor) -> None:
        """Host bookkeeping, no sync: ``send_rows[r][l]`` = slots this rank sends to rank r's local expert l;
        ``recv_rows[s][l]`` (host) and ``recv_PL`` (int64 on the token device, same values) = slots rank s sends
        to this rank's local expert l."""
        state.send_splits, state.recv_splits = [sum(r) for r in send_rows], [sum(r) for r in recv_rows]
        state.recv_PL = recv_PL

    def send_rows(self, x_ND: torch.Tensor, state: EPState) -> torch.Tensor:
        """Collective-only: the kept rows (the first ``sum(send_splits)``) to their experts' ranks."""
        return all_to_all(x_ND[:sum(state.send_splits)], state.recv_splits, state.send_splits, self.ep_group)

    def dispatch_postprocess(self, x_MD: torch.Tensor, state: EPState) -> torch.Tensor:
        """Local-only: received rows -> rows grouped by local expert (source-rank order kept inside an expert)."""
        if self.ep_size > 1 and self.num_local > 1:
            # Received rows come grouped by source rank, then local expert; label each with its local expert and
            # stable-sort by label to group them by local expert.
            local_expert_M = torch.arange(self.num_local, device=state.recv_PL.device).repeat(self.ep_size)
            local_expert_M = torch.repeat_interleave(local_expert_M, state.recv_PL.reshape(-1),
                                                     output_size=sum(state.recv_splits))
            state.regroup_M, _ = sort_by_expert(local_expert_M, self.num_local)
        state.tokens_per_expert = state.recv_PL.sum(0)
        return x_MD if state.regroup_M is None else x_MD.index_select(0, state.regroup_M)

    def combine_preprocess(self, y_MD: torch.Tensor, state: EPState) -> torch.Tensor:
        """Local-only: undo the regroup (back to received order)."""
        if state.regroup_M is None:
            return y_MD
        return torch.empty_like(y_MD).index_copy(0, state.regroup_M, y_MD)

    def token_combine(self, y_MD: torch.Tensor, state: EPState) -> torch.Tensor:
        """Collective-only: outputs back to the ranks their rows came from."""
        return all_to_all(y_MD, state.send_splits, state.recv_splits, self.ep_group)

    def combine_postprocess(self, y_ND: torch.Tensor, state: EPState) -> torch.Tensor:
        """Local-only: unpermute + router-weighted combine of this TP rank's tokens."""
        return unpermute_tokens(y_ND, state.perm, state.topk_weight_TK, state.perm.row_TK.shape[0])

    def gather_output(self, y_tD: torch.Tensor, state: EPState) -> torch.Tensor:
        """Collective-only: all-gather of the TP ranks' tokens (backward keeps this rank's slice)."""
        return gather_dim0(y_tD, self.tp_group)


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
