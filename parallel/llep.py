"""LLEP rebalancing dispatcher: plain EP, except that overloaded experts' tokens are computed on helper ranks
that receive the expert's weights for the step (arXiv 2601.17111; the planner is :mod:`parallel.llep_plan`).

Shape legend: ``t`` this TP rank's tokens, ``K`` routed experts per token, ``N`` routing slots sent by this rank,
``M`` slots received (= computed) by this rank, ``D`` hidden, ``F`` expert FFN width, ``E`` experts, ``L`` local
experts, ``P`` EP ranks, ``R`` foreign experts received, ``S`` weight copies sent.

One call, phase by phase (each phase is local-only or collective-only; phase 1's TP split is local forward and
an all-gather backward, exactly as in ``AllToAllDispatcher``):
  1. local       TP slice of the tokens; group the routing slots by expert (``moe_core.permute``)
  2. collective  all-gather the per-rank, per-expert counts over EP; ONE device-to-host copy of them
  3. local       plan (host numpy, the same pure function of the same counts on every rank). Below
                 ``imbalance_threshold`` the call continues exactly as ``AllToAllDispatcher`` phases 3-10 (its
                 layout is derived from the gathered counts, so no count all-to-all is added); otherwise:
  4. local       this rank's layout on the host; its row indices are built on the device from one small
                 host-to-device copy of segment tables (no device-to-host traffic)
  5. collective  expert weights to helpers by batched async P2P (``batch_isend_irecv``, sent straight from the
                 parameter storage), overlapped with the token all-to-all; then wait for both
  6. local       home experts on the parameters, foreign experts on the received weights
  7. collective  all-to-all of the outputs back to the ranks the tokens came from
  8. local       back to expert-sorted order, then the router-weighted sum per token
  9. collective  all-gather of the outputs over TP

Host syncs per call: the count copy of phase 2 plus what ``make_permutation`` needs, never more than plain EP
(tests/parallel/test_llep_syncs.py counts them).

Gradients: phase 5's backward sends the gradient of every received weight back to its home rank by batched P2P,
overlapped with the token-gradient all-to-all, and adds it in place into the gradient of the home weights (the
home experts read the parameters through the same autograd node, so no parameter-sized temporary is made). A home
expert's parameter thus gets exactly the gradient plain EP gives it. Every rank issues every collective whatever
its token count (an empty split is still a call), in a fixed order, and whether the weight P2P happens at all is a
property of the plan (the same on every rank); so no rank waits on a collective another rank issues in a different
order, also under activation checkpointing or with several pipeline micro-batches in flight (the layout is saved
per call, never read back from the dispatcher).

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
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from moe_core.experts import SwiGLUExperts
from moe_core.permute import make_permutation, permute_tokens, unpermute_tokens
from parallel.comm import ProcessGroup, all_to_all, gather_dim0
from parallel.config import LLEPConfig
from parallel.dispatch import AllToAllDispatcher
from parallel.llep_plan import LLEPPlan, RankLayout, plan_llep, rank_layout

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
    """Collective-only (phase 5). Forward: post the weight P2P (home experts' parameter slices to helpers, received
    into ``R``-row buffers), run the token all-to-all while it flies, wait. Returns the received tokens, the home
    weights (pass-through, so their gradient comes back through this node) and the received weights.
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


class LLEPDispatcher(AllToAllDispatcher):
    """Least-loaded EP dispatcher: the :class:`AllToAllDispatcher` protocol, groups and TP handling (its
    ``tp_slice`` / ``check_experts`` / layout phases are reused), with the expert computation rebalanced per call.

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
        self.last_stats: dict[str, float] = {}
        self.last_plan: Optional[LLEPPlan] = None
        """The last call's plan (for inspection and tests; never read back by the dispatcher)."""

    # -- phases -------------------------------------------------------------------------------------------------

    def gather_counts(self, tokens_per_expert_E: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Collective-only: ``counts_PE[s, e]`` = slots EP rank ``s`` routes to expert ``e``, on the device and
        (one device-to-host copy) on the host."""
        counts_PE = gather_dim0(tokens_per_expert_E.unsqueeze(0), self.ep_group)
        return counts_PE, counts_PE.cpu().numpy()

    def plan(self, counts_PE: np.ndarray) -> tuple[LLEPPlan, Optional[RankLayout], float]:
        """Local-only, host: the plan, this rank's layout (None for a plain EP plan) and the milliseconds taken."""
        start, cfg = time.perf_counter(), self.cfg
        plan = plan_llep(counts_PE.sum(0), self.ep_size, self.num_local, cfg)
        layout = rank_layout(plan, counts_PE, self.ep_rank) if plan.rebalanced else None
        return plan, layout, (time.perf_counter() - start) * 1e3

    def plain_layout(self, counts_dev_PE: torch.Tensor, counts_PE: np.ndarray):
        """Local-only, no host sync: ``AllToAllDispatcher``'s layout from the gathered counts."""
        L, first = self.num_local, self.ep_rank * self.num_local
        return self.layout_from_host(counts_PE[self.ep_rank].reshape(self.ep_size, L).tolist(),
                                     counts_PE[:, first:first + L].tolist(), counts_dev_PE[:, first:first + L])

    @staticmethod
    def compute(x_MD: torch.Tensor, weights: tuple[torch.Tensor, ...], layout: RankLayout,
                experts: SwiGLUExperts) -> torch.Tensor:
        """Local-only: received rows -> expert outputs, both in receive order. ``weights`` = the exchange's
        home (gate, up, down) then received (gate, up, down)."""
        order_M = _rows(layout.compute_starts, layout.compute_lengths, x_MD.device)
        x_home, x_foreign = x_MD.index_select(0, order_M).split(
            [sum(layout.home_tokens), sum(layout.foreign_tokens)], dim=0)
        def counts(host: list[int]) -> torch.Tensor:  # the plan's counts back on the device (LLEP planned on the host)
            return torch.tensor(host, dtype=torch.int64, device=x_MD.device)

        y_parts = [experts.functional(x_home, counts(layout.home_tokens), *weights[:3])]
        if layout.foreign_experts:
            y_parts.append(experts.functional(x_foreign, counts(layout.foreign_tokens), *weights[3:]))
        return _unorder(torch.cat(y_parts, dim=0), order_M)

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

    # -- call ---------------------------------------------------------------------------------------------------

    @torch.compiler.disable  # host split sizes and collectives: eager under train.compile (parallel/compile.py)
    def __call__(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                 experts: SwiGLUExperts) -> torch.Tensor:
        self.check_experts(experts)
        x_tD, idx_tK, weight_tK = self.tp_slice(x_TD, topk_idx_TK, topk_weight_TK)          # 1 local
        perm = make_permutation(idx_tK, self.num_experts)
        x_ND = permute_tokens(x_tD, perm)
        counts_dev_PE, counts_PE = self.gather_counts(perm.tokens_per_expert_E)             # 2 collective
        plan, layout, planner_ms = self.plan(counts_PE)                                      # 3 local
        if layout is None:  # plain EP: AllToAllDispatcher's phases 3-9, unchanged
            y_tD = self.exchange_and_compute(x_ND, perm, weight_tK, self.plain_layout(counts_dev_PE, counts_PE),
                                             experts)
        else:
            send_N = _rows(layout.send_starts, layout.send_lengths, x_ND.device)            # 4 local
            x_MD, *weights = _Exchange.apply(x_ND.index_select(0, send_N), *_weights(experts), layout,
                                             self.ep_group)                                  # 5 collective
            y_MD = self.compute(x_MD, tuple(weights), layout, experts)                       # 6 local
            y_ND = all_to_all(y_MD, layout.send_splits, layout.recv_splits, self.ep_group)  # 7 collective
            y_tD = unpermute_tokens(_unorder(y_ND, send_N), perm, weight_tK, x_tD.shape[0])  # 8 local
        self._record(plan, layout, planner_ms, experts)
        return gather_dim0(y_tD, self.tp_group)                                              # 9 collective
