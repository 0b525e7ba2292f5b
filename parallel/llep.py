"""LLEP rebalancing dispatcher: plain EP, except that overloaded experts' tokens are computed on helper ranks
that receive the expert's weights for the step (arXiv 2601.17111; the planner is :mod:`parallel.llep_plan`).

Shape legend: ``T`` local tokens, ``K`` routed experts per token, ``N`` routing slots sent by this rank,
``M`` slots received (= computed) by this rank, ``D`` hidden, ``F`` expert FFN width, ``E`` experts,
``W`` one expert's flattened weights (``3*F*D``), ``S``/``R`` expert weights sent/received.

One call, phase by phase (each phase is local-only or collective-only; phase 1's TP split is local forward and
an all-gather backward, exactly as in ``AllToAllDispatcher``):
  1. local       TP slice of the tokens; group the routing slots by expert (``moe_core.permute``)
  2. collective  all-gather the per-rank, per-expert counts over the EP group
  3. local       plan (same pure function of the same counts on every rank) and this rank's layout
  4. collective  one all-to-all of tokens and one of expert weights, inside ONE autograd node
  5. local       compute home experts with the parameters, foreign experts with the received weights
  6. collective  all-to-all of the outputs back to the ranks the tokens came from
  7. local       back to expert-sorted order, then the router-weighted sum per token
  8. collective  all-gather of the outputs over TP

Gradients: phase 4's backward sends the gradient of every received weight back to its home rank, where the
autograd graph of the weight gather (``index_select`` of the parameters) adds it to the parameter's gradient;
so a home expert's parameter gets exactly the gradient plain EP gives it (summed over every rank that computed
some of its tokens). Both of phase 4's backward all-to-alls live in one node and are issued in a fixed order, and
every rank issues every collective whatever its token count (an empty split is still a call), so no rank can wait
on a collective another rank issues in a different order; that also holds when the forward is recomputed under
activation checkpointing or when several pipeline micro-batches are in flight (the plan is saved per call,
never read back from the dispatcher).
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from parallel.config import LLEPConfig
from moe_core.experts import SwiGLUExperts
from moe_core.permute import make_permutation, permute_tokens, unpermute_tokens
from parallel.comm import ProcessGroup, all_to_all, gather_dim0
from parallel.dispatch import AllToAllDispatcher
from parallel.llep_plan import LLEPPlan, RankLayout, check_hyperparameters, plan_llep, rank_layout

__all__ = ["LLEPDispatcher", "plan_llep"]


def _segments_index(segments: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """int64 row index that concatenates the row ranges ``(start, length)`` in order."""
    starts = torch.tensor([s for s, _ in segments], dtype=torch.int64)
    lengths = torch.tensor([n for _, n in segments], dtype=torch.int64)
    total = int(lengths.sum())
    seg_of_row = torch.repeat_interleave(torch.arange(len(segments)), lengths, output_size=total)
    first_row = torch.cumsum(lengths, 0) - lengths
    return (starts[seg_of_row] + torch.arange(total) - first_row[seg_of_row]).to(device)


def _send_order(layout: RankLayout, device: torch.device) -> Optional[torch.Tensor]:
    """Row index from expert-sorted order to send order; None when they coincide, which is exactly when no
    expert is split (every row goes to its expert's home rank, and experts are contiguous per rank)."""
    return _segments_index(layout.send_segments, device) if layout.weights_move else None


def _take(x_ND: torch.Tensor, index_N: Optional[torch.Tensor]) -> torch.Tensor:
    return x_ND if index_N is None else x_ND.index_select(0, index_N)


def _inverse(index_N: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Inverse of a permutation given as a row index (None = identity)."""
    if index_N is None:
        return None
    inv_N = torch.empty_like(index_N)
    inv_N[index_N] = torch.arange(index_N.numel(), device=index_N.device)
    return inv_N


class _Exchange(torch.autograd.Function):
    """Collective-only. Forward: tokens to the ranks that compute them, then expert weights to helper ranks.
    Backward: token gradients, then weight gradients, back to where they came from. The weight exchange is skipped
    on every rank alike when the plan moves no weights. (Inside an autograd Function ``comm.all_to_all`` runs
    without recording a graph, so it is the plain exchange here.)"""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, w_SW: torch.Tensor, layout: RankLayout, group) -> tuple[torch.Tensor, ...]:
        ctx.layout, ctx.group = layout, group
        x_MD = all_to_all(x_ND, layout.recv_splits, layout.send_splits, group)
        if not layout.weights_move:
            return x_MD, w_SW.new_empty(w_SW.shape)
        return x_MD, all_to_all(w_SW, layout.weights_recv_splits, layout.weights_send_splits, group)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x_MD: torch.Tensor, grad_w_RW: torch.Tensor):
        lay = ctx.layout
        # An output that reached no loss (e.g. no foreign experts here) has a zero gradient; it is still sent so
        # every rank issues the same two collectives.
        grad_x_ND = all_to_all(grad_x_MD, lay.send_splits, lay.recv_splits, ctx.group)
        if not lay.weights_move:
            return grad_x_ND, None, None, None
        grad_w_SW = all_to_all(grad_w_RW, lay.weights_send_splits, lay.weights_recv_splits, ctx.group)
        return grad_x_ND, grad_w_SW, None, None


def _flat_weights(experts: SwiGLUExperts, layout: RankLayout) -> torch.Tensor:
    """``w_SW``: the home experts' gate, up and down weights this rank sends, one flat row per copy, gathered
    from the parameters with autograd (the gather's backward adds the returned gradients into the parameters').

    Whether ``w_SW`` requires grad must be the same on every rank, or ranks would disagree on whether phase 4's
    backward (a collective) runs: so it is a parameter gather whenever ANY rank moves weights, even if this rank
    sends none, and a tensor outside the graph only when no rank does."""
    weights = (experts.w_gate_EFD, experts.w_up_EFD, experts.w_down_EDF)
    if not layout.weights_move:
        return weights[0].new_empty(0, sum(w[0].numel() for w in weights))
    idx = torch.tensor(layout.weights_send_local, dtype=torch.int64, device=weights[0].device)
    return torch.cat([w.index_select(0, idx).flatten(1) for w in weights], dim=1)


def _unflat_weights(w_RW: torch.Tensor, experts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_flat_weights` for received rows: ``(w_gate_RFD, w_up_RFD, w_down_RDF)``."""
    _, F, D = experts.w_gate_EFD.shape
    gate, up, down = w_RW.split([F * D, F * D, D * F], dim=1)
    return gate.view(-1, F, D), up.view(-1, F, D), down.view(-1, D, F)


class LLEPDispatcher(AllToAllDispatcher):
    """Least-loaded EP dispatcher: the :class:`AllToAllDispatcher` protocol, groups and TP handling (its
    ``tp_slice`` / ``check_experts`` phases are reused), with the expert computation rebalanced per call.

    ``last_stats`` (plain floats, for metrics) describes the last call: ``imbalance_before`` / ``imbalance_after``
    (max/mean EP-rank load), ``tokens_moved`` (slots computed off their expert's home rank), ``weights_moved``
    (expert weight copies sent), ``weight_bytes_moved``, ``planner_ms`` (planner + layout, this rank) and
    ``rebalanced`` (1 when the imbalance reached ``imbalance_threshold``, else 0 and the call was plain EP).
    """

    def __init__(self, tp_group: ProcessGroup, ep_group: ProcessGroup, num_experts: int, cfg: LLEPConfig):
        super().__init__(tp_group, ep_group, num_experts)
        check_hyperparameters(cfg.imbalance_threshold, cfg.capacity_factor, cfg.min_tokens_per_gemm,
                              cfg.max_foreign_experts)  # fail when the model is built, not at the first step
        self.cfg = cfg
        self.last_stats: dict[str, float] = {}
        self.last_plan: Optional[LLEPPlan] = None
        """The last call's plan (for inspection and tests; never read back by the dispatcher)."""

    # -- phases -------------------------------------------------------------------------------------------------

    def gather_counts(self, tokens_per_expert_E: torch.Tensor) -> list[list[int]]:
        """Collective-only: ``counts_PE[s][e]`` = slots EP rank ``s`` routes to expert ``e`` (no autograd)."""
        return gather_dim0(tokens_per_expert_E.unsqueeze(0), self.ep_group).tolist()

    def plan(self, counts_PE: list[list[int]]) -> tuple[LLEPPlan, RankLayout, float]:
        """Local-only: the plan, this rank's layout and the milliseconds both took."""
        start, cfg = time.perf_counter(), self.cfg
        plan = plan_llep([sum(col) for col in zip(*counts_PE)], self.ep_size, self.num_local,
                         imbalance_threshold=cfg.imbalance_threshold, capacity_factor=cfg.capacity_factor,
                         min_tokens_per_gemm=cfg.min_tokens_per_gemm, max_foreign_experts=cfg.max_foreign_experts)
        layout = rank_layout(plan, counts_PE, self.ep_rank)
        return plan, layout, (time.perf_counter() - start) * 1e3

    @staticmethod
    def compute(x_MD: torch.Tensor, w_RW: torch.Tensor, layout: RankLayout, experts: SwiGLUExperts) -> torch.Tensor:
        """Local-only: received rows -> expert outputs, both in receive order."""
        order_M = _segments_index(layout.compute_segments, x_MD.device)
        x_home, x_foreign = x_MD.index_select(0, order_M).split(
            [sum(layout.home_tokens), sum(layout.foreign_tokens)], dim=0)
        y_parts = [experts(x_home, list(layout.home_tokens))]
        if layout.foreign_experts:
            y_parts.append(experts.functional(x_foreign, list(layout.foreign_tokens),
                                              *_unflat_weights(w_RW, experts)))
        return torch.cat(y_parts, dim=0).index_select(0, _inverse(order_M))

    def _record(self, plan: LLEPPlan, planner_ms: float, experts: SwiGLUExperts) -> None:
        weight_bytes = sum(w[0].numel() * w.element_size()
                           for w in (experts.w_gate_EFD, experts.w_up_EFD, experts.w_down_EDF))
        self.last_plan = plan
        self.last_stats = {
            "imbalance_before": plan.imbalance_before, "imbalance_after": plan.imbalance_after,
            "tokens_moved": float(plan.tokens_moved), "weights_moved": float(len(plan.transfers)),
            "weight_bytes_moved": float(len(plan.transfers) * weight_bytes), "planner_ms": planner_ms,
            "rebalanced": float(plan.rebalanced),
        }

    # -- call ---------------------------------------------------------------------------------------------------

    def __call__(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                 experts: SwiGLUExperts) -> torch.Tensor:
        self.check_experts(experts)
        x_tD, idx_tK, weight_tK = self.tp_slice(x_TD, topk_idx_TK, topk_weight_TK)          # 1 local
        perm = make_permutation(idx_tK, self.num_experts)
        counts_PE = self.gather_counts(perm.tokens_per_expert_E)                             # 2 collective
        plan, layout, planner_ms = self.plan(counts_PE)                                      # 3 local
        send_N = _send_order(layout, x_tD.device)
        x_ND = _take(permute_tokens(x_tD, perm), send_N)
        w_SW = _flat_weights(experts, layout)
        x_MD, w_RW = _Exchange.apply(x_ND, w_SW, layout, self.ep_group)                     # 4 collective
        y_MD = self.compute(x_MD, w_RW, layout, experts)                                     # 5 local
        y_ND = all_to_all(y_MD, layout.send_splits, layout.recv_splits, self.ep_group)      # 6 collective
        y_tD = unpermute_tokens(_take(y_ND, _inverse(send_N)), perm, weight_tK, x_tD.shape[0])  # 7 local
        self._record(plan, planner_ms, experts)
        return gather_dim0(y_tD, self.tp_group)                                              # 8 collective
