"""Expert-parallel all-to-all dispatcher, and :func:`shard_moe_layer` to turn a single-device MoELayer into this
rank's piece of an EP (and TP) layer.

Shape legend: ``T`` tokens given to the layer (TP-replicated), ``t`` this TP rank's ``T/tp`` of them, ``K`` routed
experts per token, ``N`` rows this rank sends (one per (token, EP rank) pair with a kept slot), ``M`` rows it
receives, ``S`` routing slots it computes (the received rows expanded into one row per slot), ``D`` hidden, ``E``
experts, ``L`` local experts (``E/ep``), ``P`` EP ranks.

Layout (docs/architecture.md): experts are not tensor-parallel; EP rank r owns experts ``[r*L, (r+1)*L)``. With
TP>1 every TP rank routes the same tokens, keeps its contiguous ``1/tp`` slice, dispatches that over the EP group,
and the outputs are all-gathered over TP, so no expert computes a token twice and the router (which sees the
full replicated batch) gets identical gradients on every TP rank.

Deduplicated dispatch: a token crosses the all-to-all once per EP rank it is routed to, not once per slot (a token
with two experts on one rank sends one row there; with group-limited routing whose groups map onto EP ranks,
``moe.num_groups`` a multiple of ``parallel.ep``, a token reaches at most ``moe.group_topk`` ranks). Beside each row
travel its slots' local expert ids and router weights (``[N, 2K]`` fp32, one more all-to-all); the receiving rank
expands the row into one row per slot for its experts' grouped GEMMs and sums their weighted outputs back into one
row, so each (token, rank) pair also returns one row. Never more rows than one per slot (``T*K``), fewer whenever
a token has two slots on one rank. Numerics: the weighted sum of a token's outputs is split into one partial sum
per EP rank (fp32 accumulation each, rounded to the activation dtype) and the sum of the partials; in fp32 that is
a reordering of the additions, in bf16 one more rounding per partial sum (megatron-core's DeepEP dispatcher
also sums a token's local expert outputs before its return exchange).

Phases (``moe_core.dispatcher``; the TP split in ``dispatch_preprocess`` is local in forward and an all-gather in
backward):
  dispatch_preprocess   local       TP slice of tokens/routing; one row per (token, EP rank) pair, grouped by rank
                                    (``moe_core.permute.group_by_device``)
  token_dispatch        collective  all-to-all of the counts (slots per expert, rows per rank), ONE
                                    device-to-host copy of them (the split sizes), all-to-all of the rows and of
                                    their slots (local expert ids and router weights)
  dispatch_postprocess  local       received rows expanded into one row per slot, grouped by local expert
  compute_experts       local       the local experts (the protocol's default)
  combine_preprocess    local       router-weighted sum of each received row's slots: one output row per row
  token_combine         collective  all-to-all of outputs back to the source ranks
  combine_postprocess   local       sum of each token's rows (one per EP rank it reached; fp32 accumulation)
  gather_output         collective  all-gather of the outputs over TP

Gradients: each all-to-all's backward is the reverse all-to-all (the router weights' gradients come back with the
slots' all-to-all), so an expert's weight gradient on its owner rank is the sum over every token routed to it from
the whole EP group; expert-DP reduction happens elsewhere (``parallel/optim/grads.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from moe_core.dispatcher import DispatchState, TokenDispatcher
from moe_core.experts import SwiGLUExperts
from moe_core.layer import MoELayer
from moe_core.permute import DeviceRouting, Permutation, group_by_device, make_permutation, permute_tokens, \
    sum_tokens, unpermute_tokens
from parallel.comm import ProcessGroup, all_to_all, check_group, gather_dim0, group_rank, group_size, split_dim0

__all__ = ["AllToAllDispatcher", "DispatchCounts", "EPState", "shard_moe_layer"]


@dataclass(frozen=True)
class DispatchCounts:
    """What one call of an EP dispatcher sent from this rank (host ints the call reads anyway; for metrics and
    benchmarks, never read back by a dispatcher)."""

    tokens: int
    """This rank's tokens (its TP slice of the layer's tokens)."""
    slots: int
    """Their kept routing slots: the rows a dispatch without deduplication sends (``T*K`` without dropping)."""
    rows: int
    """Rows sent: one per (token, EP rank) pair, or one per slot where the dispatch is not deduplicated."""


@dataclass
class EPState(DispatchState):
    """One call's bookkeeping: who sends what to whom (the same numbers serve forward and backward). ``perm`` is
    ``routing.perm``: this rank's (token, EP rank) rows."""

    routing: Optional[DeviceRouting] = None
    """The deduplicated layout of this rank's tokens; set by ``dispatch_preprocess``."""
    topk_idx_TK: Optional[torch.Tensor] = None
    """int64 global expert ids of this rank's tokens' slots (-1 = dropped); set by ``dispatch_preprocess``."""
    send_splits: list[int] = field(default_factory=list)
    """Rows this rank sends to each EP rank; set by ``token_dispatch``."""
    recv_splits: list[int] = field(default_factory=list)
    """Rows this rank receives from each EP rank; set by ``token_dispatch``."""
    expert_slots: int = 0
    """Routing slots this rank's experts compute (all received rows expanded); set by ``token_dispatch``."""
    local_expert_MK: Optional[torch.Tensor] = None
    """int64 local expert ids of the received rows' slots (-1 = none here); set by ``token_dispatch``."""
    weight_MK: Optional[torch.Tensor] = None
    """fp32 router weights of those slots (0 where none), differentiable; set by ``token_dispatch``."""
    expand: Optional[Permutation] = None
    """The received rows' slots grouped by local expert; set by ``dispatch_postprocess``."""


class AllToAllDispatcher(TokenDispatcher):
    """The :class:`~moe_core.dispatcher.TokenDispatcher` phases over all-to-all, with ``experts`` holding only this
    EP rank's experts (``experts.first_expert == ep_rank * E/ep``); deduplicated (module docstring).

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
        self.last_counts: Optional[DispatchCounts] = None
        """What the last call sent from this rank (for metrics; None before the first call)."""

    def check_experts(self, experts: SwiGLUExperts) -> None:
        first = self.ep_rank * self.num_local
        if experts.num_local_experts != self.num_local or experts.first_expert != first:
            raise ValueError(
                f"AllToAllDispatcher on EP rank {self.ep_rank}/{self.ep_size} expects experts "
                f"[{first}, {first + self.num_local}) but got experts [{experts.first_expert}, "
                f"{experts.first_expert + experts.num_local_experts}); build the layer with "
                f"parallel.dispatch.shard_moe_layer (or SwiGLUExperts(E/ep, ..., first_expert=ep_rank*E/ep))")

    def route(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
              experts: SwiGLUExperts) -> tuple[torch.Tensor, EPState]:
        """Local-only (backward all-gathers over TP): this TP rank's contiguous ``t = T/tp`` tokens ``x_tD`` and
        the call's state with their deduplicated layout. The weights go through ``split_dim0`` too, so the router
        gets the grads of every TP rank's slice."""
        self.check_experts(experts)
        x_tD, idx_tK, weight_tK = (split_dim0(t, self.tp_group) for t in (x_TD, topk_idx_TK, topk_weight_TK))
        routing = group_by_device(idx_tK, weight_tK, self.num_local, self.ep_size)
        return x_tD, self.state_type(experts, routing.perm, weight_tK, routing=routing, topk_idx_TK=idx_tK)

    # -- phases -------------------------------------------------------------------------------------------------

    def dispatch_preprocess(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                            experts: SwiGLUExperts) -> tuple[torch.Tensor, EPState]:
        """Local-only (backward all-gathers over TP): :meth:`route`, then one row per (token, EP rank) pair,
        grouped by EP rank (dead rows last, never sent)."""
        x_tD, state = self.route(x_TD, topk_idx_TK, topk_weight_TK, experts)
        return permute_tokens(x_tD, state.perm), state

    def token_dispatch(self, x_ND: torch.Tensor, state: EPState) -> torch.Tensor:
        """Collective-only: exchange the counts (per destination rank: slots per expert there, then rows), read
        them on the host once (the split sizes), send the rows and their slots."""
        L, P = self.num_local, self.ep_size
        counts_PX = torch.cat([state.routing.slots_per_expert_E.view(P, L),
                               state.perm.tokens_per_expert_E.view(P, 1)], dim=1)  # [P, L + 1]
        splits = [L + 1] * P
        recv_PX = all_to_all(counts_PX.reshape(-1), splits, splits, self.ep_group).view(P, L + 1)
        send, recv = torch.stack([counts_PX, recv_PX]).tolist()
        self.set_splits(state, [r[L] for r in send], [r[L] for r in recv], sum(sum(r[:L]) for r in recv),
                        sum(sum(r[:L]) for r in send))
        return self.send_rows(x_ND, state)

    def set_splits(self, state: EPState, send_rows: list[int], recv_rows: list[int], expert_slots: int,
                   slots_sent: int) -> None:
        """Host bookkeeping, no sync: rows this rank sends to / receives from each EP rank, the routing slots its
        experts compute, and ``last_counts`` (``slots_sent``: the kept slots of this rank's tokens)."""
        state.send_splits, state.recv_splits, state.expert_slots = send_rows, recv_rows, expert_slots
        self.last_counts = DispatchCounts(state.perm.row_TK.shape[0], slots_sent, sum(send_rows))

    def send_rows(self, x_ND: torch.Tensor, state: EPState) -> torch.Tensor:
        """Collective-only: the rows (the first ``sum(send_splits)``) to their EP ranks, and beside them their
        slots (local expert ids and router weights, one fp32 all-to-all; ids < 2**24 are exact in fp32)."""
        rows, routing, K = sum(state.send_splits), state.routing, state.perm.row_TK.shape[1]
        slots_NC = torch.cat([routing.weight_NK[:rows].float(), routing.local_expert_NK[:rows].float()], dim=1)
        slots_MC = all_to_all(slots_NC, state.recv_splits, state.send_splits, self.ep_group)
        state.weight_MK, state.local_expert_MK = slots_MC[:, :K], slots_MC[:, K:].detach().long()
        return all_to_all(x_ND[:rows], state.recv_splits, state.send_splits, self.ep_group)

    def dispatch_postprocess(self, x_MD: torch.Tensor, state: EPState) -> torch.Tensor:
        """Local-only: each received row once per slot it carries, grouped by local expert (source-rank order,
        then token order inside an expert, as the rows arrived)."""
        state.expand = make_permutation(state.local_expert_MK, self.num_local)
        state.tokens_per_expert = state.expand.tokens_per_expert_E
        return permute_tokens(x_MD, state.expand, rows=state.expert_slots)

    def combine_preprocess(self, y_SD: torch.Tensor, state: EPState) -> torch.Tensor:
        """Local-only: the router-weighted sum of each received row's expert outputs (fp32 accumulation, cast
        back): one output row per received row."""
        return unpermute_tokens(y_SD, state.expand, state.weight_MK, state.local_expert_MK.shape[0])

    def token_combine(self, y_MD: torch.Tensor, state: EPState) -> torch.Tensor:
        """Collective-only: outputs back to the ranks their rows came from."""
        return all_to_all(y_MD, state.send_splits, state.recv_splits, self.ep_group)

    def combine_postprocess(self, y_ND: torch.Tensor, state: EPState) -> torch.Tensor:
        """Local-only: each token's output, the sum of its rows (one per EP rank it reached)."""
        return sum_tokens(y_ND, state.perm, state.perm.row_TK.shape[0])

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
    local.recompute_act = full.recompute_act
    with torch.no_grad():
        for name, param in local.named_parameters():
            param.copy_(getattr(full, name)[first:first + n])
    layer.experts, layer.dispatcher = local, dispatcher
    return layer
