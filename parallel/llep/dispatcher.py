"""LLEP rebalancing dispatcher: plain EP, except that overloaded experts' tokens are computed on helper ranks
that receive the expert's weights for the step (arXiv 2601.17111; the planner is :mod:`parallel.llep.plan`).

Shape legend: ``t`` this TP rank's tokens, ``K`` routed experts per token, ``N`` rows sent by this rank, ``M`` rows
received by this rank, ``D`` hidden, ``F`` expert FFN width, ``E`` experts, ``L`` local experts, ``P`` EP ranks,
``R`` foreign experts received, ``S`` weight copies sent, ``X`` experts computed here (``L + R``), ``V`` experts
moved this call (any rank).

Rows: a call below ``imbalance_threshold`` is ``AllToAllDispatcher``'s deduplicated dispatch (one row per (token,
EP rank) pair). A rebalanced call sends one row per routing slot (as plain EP did before deduplication): where a
slot is computed depends on the plan, which needs the global counts first, so the deduplicated row counts of a
rebalanced layout would need a second count exchange and host read after planning (one more device-to-host sync
per layer call); per-slot rows cost at most what a plain EP call cost before deduplication.

Phases (``moe_core.dispatcher``; ``gather_output`` is ``AllToAllDispatcher``'s, whose TP split is local forward
and an all-gather backward):
  dispatch_preprocess   local       ``AllToAllDispatcher.route`` (TP slice, deduplicated layout); the rows are
                                    gathered in ``token_dispatch``, once the plan says which layout is sent
  token_dispatch        collective  all-gather the per-rank counts over EP (slots per expert, deduplicated rows
                                    per rank); ONE device-to-host copy of them; the plan (host numpy, the same pure
                                    function of the same counts on every rank). Below ``imbalance_threshold`` the
                                    call continues exactly as ``AllToAllDispatcher`` (split sizes from the gathered
                                    counts, so no count all-to-all is added). Otherwise the slots grouped by expert
                                    (``make_permutation``) and this rank's layout on the host (row indices built
                                    on the device from one small host-to-device copy of segment tables, no
                                    device-to-host traffic), then expert weights to helpers by batched async P2P
                                    (``batch_isend_irecv``, sent straight from the parameter storage), overlapped
                                    with the token all-to-all; then wait for both
  dispatch_postprocess  local       received rows -> home experts' rows, then foreign experts' rows
  compute_experts       local       home experts on the parameters, foreign experts on the received weights
                                    (with the MoNE neuron balance loss on: its per-expert sums, :class:`NeuronBalance`)
  combine_preprocess    local       back to the order the rows were received in
  token_combine         collective  (balance loss on, experts moved: all-reduce of the moved experts' kept counts)
                                    all-to-all of the outputs back to the ranks the tokens came from
  combine_postprocess   local       back to expert-sorted order, then the router-weighted sum per token (balance
                                    loss on: this rank's part of plain EP's loss attached to the output)

Host syncs per call: the count copy of ``token_dispatch`` (``make_permutation`` and the layout need none), never
more than plain EP (tests/parallel/test_llep_syncs.py counts them).

Gradients: the weight exchange's backward sends the gradient of every received weight back to its home rank by
batched P2P, overlapped with the token-gradient all-to-all, and adds it in place into the gradient of the home
weights (the home experts read the parameters through the same autograd node, so no parameter-sized temporary is
made). A home expert's parameter thus gets exactly the gradient plain EP gives it. Every rank issues every
collective whatever its token count (an empty split is still a call), in a fixed order, and whether the weight P2P
happens at all is a property of the plan (the same on every rank); so no rank waits on a collective another rank
issues in a different order, also under activation checkpointing or with several pipeline micro-batches in flight
(the layout is saved per call in its ``LLEPState``, never read back from the dispatcher).

Memory bound (extra expert-weight bytes per rank, ``W`` = one expert's gate+up+down bytes): received weights
``R*W`` with ``R <= max_foreign_experts``, their gradients ``R*W`` during backward, and the returned gradients of
this rank's spilled experts ``S*W`` with ``S <= max_helpers_per_expert * spilled_home_experts``:
``W * (2*max_foreign_experts + max_helpers_per_expert * experts_per_rank)`` at most (:func:`extra_weight_bytes_bound`).
Nothing is copied on the send side: a hot expert spilled to ``h`` helpers is sent ``h`` times from one storage.

Overlap: on gloo the posted P2P progresses on gloo's own threads while the all-to-all runs. On NCCL, ops of one
process group share its communicator's stream, so the weight P2P and the token all-to-all of the same EP group are
serialised on the device; true overlap there needs the P2P on a second group over the same ranks (not done yet).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from moe_core.aux_loss import AuxLossAutoScaler
from moe_core.experts import SwiGLUExperts
from moe_core.mone import neuron_balance_stats
from moe_core.permute import Permutation, make_permutation, permute_tokens, unpermute_tokens
from parallel.comm import ProcessGroup, all_to_all, gather_dim0
from parallel.config import LLEPConfig
from parallel.dispatch import AllToAllDispatcher, DispatchCounts, EPState
from parallel.llep.balance import NeuronBalance, balance_loss_here, sum_moved_kept_counts
from parallel.llep.plan import LLEPPlan, RankLayout, plan_llep, rank_layout

__all__ = ["LLEPDispatcher", "extra_weight_bytes_bound", "plan_llep"]


def extra_weight_bytes_bound(cfg: LLEPConfig, experts_per_rank: int, expert_bytes: int) -> int:
    """Most extra expert-weight bytes LLEP holds on one rank in a step (see the module docstring)."""
    return expert_bytes * (2 * cfg.max_foreign_experts + cfg.max_helpers_per_expert * experts_per_rank)


def _rows(starts: np.ndarray, lengths: np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 row index concatenating the row ranges ``[start, start + length)`` in order, built on ``device``
    from the (small) segment table: one host-to-device copy, no device-to-host traffic."""
    total = int(lengths.sum())
    shift_lengths = torch.from_numpy(np.stack([starts - (np.cumsum(lengths) - lengths), lengths])).to(device)
    return torch.arange(total, device=device) + torch.repeat_interleave(shift_lengths[0], shift_lengths[1],
                                                                        output_size=total)


def _unorder(y_ND: torch.Tensor, order_N: torch.Tensor) -> torch.Tensor:
    """Inverse of ``y.index_select(0, order_N)`` for a permutation ``order_N``."""
    return y_ND.new_empty(y_ND.shape).index_copy(0, order_N, y_ND)


def _weights(experts: SwiGLUExperts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return experts.w_gate_EFD, experts.w_up_EFD, experts.w_down_EDF


def _p2p(sends: list[tuple[torch.Tensor, int, int]], recvs: list[tuple[torch.Tensor, int, int]],
         group: ProcessGroup) -> list:
    """Post ``(tensor, group rank, tag)`` sends and receives as one batch of async P2P ops; returns the works."""
    ops = [dist.P2POp(dist.isend, t, dist.get_global_rank(group, r), group, tag) for t, r, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, r), group, tag) for t, r, tag in recvs]
    return dist.batch_isend_irecv(ops) if ops else []


def _tag(expert: int, part: int) -> int:
    return 3 * expert + part


class _Exchange(torch.autograd.Function):
    """Collective-only (``token_dispatch`` of a rebalanced call). Forward: post the weight P2P (home experts'
    parameter slices to helpers, received into ``R``-row buffers), run the token all-to-all while it flies, wait.
    Returns the received tokens, the home weights (pass-through, so their gradient comes back through this node)
    and the received weights.
    Backward: the same overlap for the gradients of the received weights (back to their homes) and the token
    gradients; returned weight gradients are added in place into the home weights' gradients."""

    @staticmethod
    def forward(ctx, x_ND, w_gate_LFD, w_up_LFD, w_down_LDF, layout: RankLayout, group):
        ctx.layout, ctx.group = layout, group
        homes = (w_gate_LFD, w_up_LFD, w_down_LDF)
        received = tuple(w.new_empty((len(layout.weights_recv),) + w.shape[1:]) for w in homes)
        works = _p2p([(w[local], helper, _tag(e, part))
                      for local, e, helper in layout.weights_send for part, w in enumerate(homes)],
                     [(buf[i], home, _tag(e, part))
                      for i, (e, home) in enumerate(layout.weights_recv) for part, buf in enumerate(received)], group)
        x_MD = all_to_all(x_ND, layout.recv_splits, layout.send_splits, group)
        for work in works:
            work.wait()
        return (x_MD, *(w.view_as(w) for w in homes), *received)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x_MD, *grads):
        lay, group = ctx.layout, ctx.group
        grad_homes, grad_received = grads[:3], grads[3:]
        returned = tuple(g.new_empty((len(lay.weights_send),) + g.shape[1:]) for g in grad_homes)
        works = _p2p([(g[i].contiguous(), home, _tag(e, part))
                      for i, (e, home) in enumerate(lay.weights_recv) for part, g in enumerate(grad_received)],
                     [(buf[i], helper, _tag(e, part))
                      for i, (_, e, helper) in enumerate(lay.weights_send) for part, buf in enumerate(returned)], group)
        grad_x_ND = all_to_all(grad_x_MD, lay.send_splits, lay.recv_splits, group)
        for work in works:
            work.wait()
        if lay.weights_send:
            local_S = torch.tensor([local for local, _, _ in lay.weights_send], dtype=torch.int64)
            local_S = local_S.to(grad_homes[0].device)
            for g, r in zip(grad_homes, returned):
                g.index_add_(0, local_S, r)
        return (grad_x_ND, *grad_homes, None, None)


@dataclass
class LLEPState(EPState):
    """One call's bookkeeping: ``EPState`` (its splits, which a rebalanced call takes from ``layout``) and, when the
    plan rebalanced, this rank's layout and the tensors the later phases need."""

    layout: Optional[RankLayout] = None
    """This rank's part of the plan; None for a plain EP call (then the ``EPState`` fields alone drive it)."""
    expert_perm: Optional[Permutation] = None
    """This rank's slots grouped by global expert, one row per slot (rebalanced calls)."""
    send_N: Optional[torch.Tensor] = None
    """int64 permuted rows in send order (rebalanced calls)."""
    order_M: Optional[torch.Tensor] = None
    """int64 received rows in compute order: home experts' rows, then foreign experts' (rebalanced calls)."""
    weights: tuple[torch.Tensor, ...] = ()
    """The exchange's home (gate, up, down) then received (gate, up, down) weights (rebalanced calls)."""
    plan: Optional[LLEPPlan] = None
    """The call's plan (rebalanced calls)."""
    balance: Optional[NeuronBalance] = None
    """The MoNE neuron balance loss's sums (rebalanced calls with ``moe.mone.balance_loss_coeff > 0``)."""


class LLEPDispatcher(AllToAllDispatcher):
    """Least-loaded EP dispatcher: the :class:`AllToAllDispatcher` phases, groups and TP handling, with the expert
    computation rebalanced per call (a plain EP call goes through the parent's phases unchanged).

    ``last_stats`` (plain floats, for metrics) describes the last call: ``imbalance_before`` / ``imbalance_after``
    (max/mean EP-rank load), ``tokens_moved`` (slots computed off their expert's home rank), ``weights_moved``
    (expert weight copies sent), ``weight_bytes_moved``, ``weight_buffer_bytes`` (this rank's received-weight and
    returned-gradient buffers), ``planner_ms`` (planner + layout, this rank) and ``rebalanced`` (1 when the
    imbalance reached ``imbalance_threshold``, else 0 and the call was plain EP).
    """

    def __init__(self, tp_group: ProcessGroup, ep_group: ProcessGroup, num_experts: int, cfg: LLEPConfig):
        super().__init__(tp_group, ep_group, num_experts)
        cfg.validate()  # fail at build, not step 1
        self.cfg = cfg
        self.state_type = LLEPState
        self.last_stats: dict[str, float] = {}
        self.last_plan: Optional[LLEPPlan] = None
        """The last call's plan (for inspection and tests; never read back by the dispatcher)."""

    # -- helpers of token_dispatch --------------------------------------------------------------------------------

    def gather_counts(self, counts_X: torch.Tensor) -> np.ndarray:
        """Collective-only: ``counts_PX[s]`` = EP rank ``s``'s ``counts_X``, on the host (one device-to-host
        copy)."""
        return gather_dim0(counts_X.unsqueeze(0), self.ep_group).cpu().numpy()

    def plan(self, counts_PE: np.ndarray) -> tuple[LLEPPlan, Optional[RankLayout], float]:
        """Host only: the plan, this rank's layout (None for a plain EP plan) and the milliseconds taken."""
        start, cfg = time.perf_counter(), self.cfg
        plan = plan_llep(counts_PE.sum(0), self.ep_size, self.num_local, cfg)
        layout = rank_layout(plan, counts_PE, self.ep_rank) if plan.rebalanced else None
        return plan, layout, (time.perf_counter() - start) * 1e3

    def _record(self, plan: LLEPPlan, layout: Optional[RankLayout], planner_ms: float,
                experts: SwiGLUExperts) -> None:
        expert_bytes = sum(w[0].numel() * w.element_size() for w in _weights(experts))
        buffers = 0 if layout is None else 2 * len(layout.weights_recv) + len(layout.weights_send)
        self.last_plan = plan
        self.last_stats = {
            "imbalance_before": plan.imbalance_before, "imbalance_after": plan.imbalance_after,
            "tokens_moved": float(plan.tokens_moved), "weights_moved": float(len(plan.transfers)),
            "weight_bytes_moved": float(len(plan.transfers) * expert_bytes),
            "weight_buffer_bytes": float(buffers * expert_bytes), "planner_ms": planner_ms,
            "rebalanced": float(plan.rebalanced),
        }

    # -- phases ---------------------------------------------------------------------------------------------------

    def dispatch_preprocess(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                            experts: SwiGLUExperts) -> tuple[torch.Tensor, LLEPState]:
        """Local-only (backward all-gathers over TP): ``AllToAllDispatcher.route``; returns this TP rank's tokens
        ``x_tD`` (their rows are gathered in ``token_dispatch``, in the layout the plan picks)."""
        return self.route(x_TD, topk_idx_TK, topk_weight_TK, experts)

    def token_dispatch(self, x_tD: torch.Tensor, state: LLEPState) -> torch.Tensor:
        """Collective-only: counts all-gather and host copy, the plan, then the rows (and, rebalanced, the
        weights) to the ranks that compute them."""
        E, routing = self.num_experts, state.routing
        counts_PX = self.gather_counts(torch.cat([routing.slots_per_expert_E, state.perm.tokens_per_expert_E]))
        counts_PE = counts_PX[:, :E]  # slots per expert; then [:, E:] deduplicated rows per destination rank
        plan, layout, planner_ms = self.plan(counts_PE)
        self._record(plan, layout, planner_ms, state.experts)
        if layout is None:  # plain EP: AllToAllDispatcher's deduplicated rows, split sizes from the gathered counts
            L, me = self.num_local, self.ep_rank
            self.set_splits(state, counts_PX[me, E:].tolist(), counts_PX[:, E + me].tolist(),
                            int(counts_PE[:, me * L:(me + 1) * L].sum()), int(counts_PE[me].sum()))
            return self.send_rows(permute_tokens(x_tD, state.perm), state)
        state.plan, state.layout = plan, layout
        state.send_splits, state.recv_splits = layout.send_splits, layout.recv_splits
        slots = sum(layout.send_splits)  # one row per slot
        self.last_counts = DispatchCounts(state.perm.row_TK.shape[0], slots, slots)
        state.expert_perm = make_permutation(state.topk_idx_TK, E)
        state.send_N = _rows(layout.send_starts, layout.send_lengths, x_tD.device)
        x_ND = permute_tokens(x_tD, state.expert_perm)
        x_MD, *weights = _Exchange.apply(x_ND.index_select(0, state.send_N), *_weights(state.experts), layout,
                                         self.ep_group)
        state.weights = tuple(weights)
        return x_MD

    def dispatch_postprocess(self, x_MD: torch.Tensor, state: LLEPState) -> torch.Tensor:
        """Local-only: rebalanced, the received rows in compute order (home experts', then foreign experts')."""
        if state.layout is None:
            return super().dispatch_postprocess(x_MD, state)
        state.order_M = _rows(state.layout.compute_starts, state.layout.compute_lengths, x_MD.device)
        return x_MD.index_select(0, state.order_M)

    def compute_experts(self, x_MD: torch.Tensor, state: LLEPState) -> torch.Tensor:
        """Local-only: rebalanced, home experts on the parameters, foreign experts on the received weights; with
        the neuron balance loss on, its sums over these rows (:class:`NeuronBalance`) instead of a loss per call."""
        layout, experts = state.layout, state.experts
        if layout is None:
            return super().compute_experts(x_MD, state)
        x_home, x_foreign = x_MD.split([sum(layout.home_tokens), sum(layout.foreign_tokens)], dim=0)

        def counts(host: list[int]) -> torch.Tensor:  # the plan's counts back on the device (planned on the host)
            return torch.tensor(host, dtype=torch.int64, device=x_MD.device)

        calls = [(x_home, counts(layout.home_tokens), state.weights[:3])]
        if layout.foreign_experts:
            calls.append((x_foreign, counts(layout.foreign_tokens), state.weights[3:]))
        y_MD = torch.cat([experts.functional(x, n, *w, balance_loss=False) for x, n, w in calls], dim=0)
        if experts.balance_loss_enabled:
            kept, share = zip(*(neuron_balance_stats(x, n, w[0], experts.keep_k, experts.mone.score)
                                for x, n, w in calls))
            first = self.ep_rank * self.num_local
            state.balance = NeuronBalance([*range(first, first + self.num_local), *layout.foreign_experts],
                                          torch.cat(kept), torch.cat(share))
        return y_MD

    def combine_preprocess(self, y_MD: torch.Tensor, state: LLEPState) -> torch.Tensor:
        """Local-only: back to the order the rows were received in."""
        if state.layout is None:
            return super().combine_preprocess(y_MD, state)
        return _unorder(y_MD, state.order_M)

    def token_combine(self, y_MD: torch.Tensor, state: LLEPState) -> torch.Tensor:
        """Collective-only: with the neuron balance loss on and experts moved, first the all-reduce of the moved
        experts' kept counts (:class:`NeuronBalance`); then ``AllToAllDispatcher``'s all-to-all."""
        if state.balance is not None and state.plan.transfers:
            sum_moved_kept_counts(state.balance, state.plan, self.ep_group)
        return super().token_combine(y_MD, state)

    def combine_postprocess(self, y_ND: torch.Tensor, state: LLEPState) -> torch.Tensor:
        """Local-only: rebalanced, back to expert-sorted order, then the router-weighted sum per token (fp32
        accumulation); plain, ``AllToAllDispatcher``'s; with the neuron balance loss on, this rank's part of it
        attached to the output (``AuxLossAutoScaler``)."""
        if state.layout is None:
            return super().combine_postprocess(y_ND, state)
        perm = state.expert_perm
        y_tD = unpermute_tokens(_unorder(y_ND, state.send_N), perm, state.topk_weight_TK, perm.row_TK.shape[0])
        if state.balance is None:
            return y_tD
        mone = state.experts.mone
        return AuxLossAutoScaler.apply(y_tD, mone.balance_loss_coeff * balance_loss_here(
            state.balance, state.plan, self.ep_size, state.experts.keep_k))
