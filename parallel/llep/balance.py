"""The MoNE neuron balance loss of a rebalanced LLEP call (:class:`NeuronBalance`), made equal to plain EP's: the
sums each rank keeps, the all-reduce of the moved experts' kept counts and each rank's piece of the loss."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moe_core.mone import neuron_balance_per_expert
from parallel.comm import ProcessGroup, all_reduce_counts
from parallel.llep.plan import LLEPPlan


@dataclass
class NeuronBalance:
    """The MoNE neuron balance loss of a rebalanced call, made equal to plain EP's (``moe_core/mone.py``).

    Plain EP computes it per rank over the rows of its home experts: per expert ``F * sum_i f_i p_i`` from the
    expert's kept counts per neuron ``C`` (no gradient), its rows ``n`` and its share sums ``S``, then the mean over
    the rank's experts that have rows. LLEP splits a moved expert's rows over its home and helper ranks, so a loss
    per expert call (what ``SwiGLUExperts`` attaches) would use partial ``C`` and ``n``. Instead each rank computes
    the additive sums ``C`` and ``S`` of the rows it computed (``compute_experts``); ``n`` of every expert is in the
    plan's counts; the ``C`` of the moved experts are summed over the EP group by one all-reduce of
    ``moved experts x F`` integers in ``token_combine`` (the only extra communication; MoNE itself adds none, and
    it is tiny next to the ``3 F D`` weights moved per expert); then (``combine_postprocess``) each rank attaches
    ``sum_e per_expert(C_e, S_e(rows here), n_e) / experts_with_rows(home(e))`` over the experts it computed. The loss
    is linear in ``S`` given ``C`` and ``n``, so these pieces add up over the EP group to plain EP's per-rank losses
    and every gradient is plain EP's (up to fp32 round-off); a piece's value sits on the rank that computed the
    rows, so a single rank's value can differ from plain EP's (only the sum is the same; nothing reports it)."""

    experts_X: list[int]
    """Global ids of the experts computed here: the home experts, then the foreign ones."""
    kept_XF: torch.Tensor
    """fp32 kept slots per neuron: of the rows computed here, then (``token_combine``) of all of the rows."""
    share_XF: torch.Tensor
    """fp32 share sums of the rows computed here (differentiable)."""


def sum_moved_kept_counts(balance: NeuronBalance, plan: LLEPPlan, ep_group: ProcessGroup) -> None:
    """Collective-only: ``balance.kept_XF`` of the moved experts summed over the EP group (every rank issues
    it, with the same moved experts from the plan, whatever it computed)."""
    moved = sorted({e for e, _, _ in plan.transfers})
    slot_of = {e: m for m, e in enumerate(moved)}
    here = [(x, slot_of[e]) for x, e in enumerate(balance.experts_X) if e in slot_of]
    kept_XF = balance.kept_XF
    x_idx, v_idx = (torch.tensor([p[i] for p in here], dtype=torch.int64, device=kept_XF.device) for i in (0, 1))
    mine_VF = kept_XF.new_zeros(len(moved), kept_XF.shape[1], dtype=torch.int64)
    mine_VF.index_copy_(0, v_idx, kept_XF.index_select(0, x_idx).long())  # integer valued: exact
    all_VF = all_reduce_counts(mine_VF, ep_group)
    balance.kept_XF = kept_XF.index_copy(0, x_idx, all_VF.index_select(0, v_idx).to(kept_XF.dtype))


def balance_loss_here(balance: NeuronBalance, plan: LLEPPlan, ep_size: int, keep_k: int) -> torch.Tensor:
    """Local-only: this rank's pieces of plain EP's per-rank neuron balance losses (:class:`NeuronBalance`)."""
    rows_E, experts_per_rank = plan.counts_E, plan.experts_per_rank
    with_rows_P = np.maximum((rows_E.reshape(ep_size, experts_per_rank) > 0).sum(1), 1)
    device = balance.share_XF.device
    rows_X = torch.tensor(rows_E[balance.experts_X], dtype=torch.int64, device=device)
    divisor_X = torch.tensor(with_rows_P[np.array(balance.experts_X) // experts_per_rank], dtype=torch.float32,
                             device=device)
    per_expert_X = neuron_balance_per_expert(balance.kept_XF, balance.share_XF, rows_X, keep_k)
    return (per_expert_X / divisor_X).sum()
