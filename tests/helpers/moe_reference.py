"""Single-process reference of plain expert-parallel MoE math for the distributed dispatcher tests.

    ref = plain_ep_reference(weights, mone, ep_size, x_TD, idx_TK, w_TK, grad_TD)

runs ``LocalDispatcher`` over all ``E`` experts on one process and returns the output and the gradients (input,
routing weights, expert weights) of ``sum(y * grad_TD)`` plus, with ``mone.balance_loss_coeff > 0``, plain EP's MoNE
neuron balance loss: per EP rank the mean over that rank's experts (``E / ep_size`` consecutive ones) that have rows,
summed over the ranks (the single-device layer's loss is the mean over all ``E``; plain EP normalises per rank).
``device_pairs`` counts the rows a deduplicated EP dispatch sends.
"""
from __future__ import annotations

import dataclasses

import torch

from moe_core.config import MoNEConfig
from moe_core.dispatcher import dispatch_compute_combine
from moe_core.experts import SwiGLUExperts
from moe_core.layer import LocalDispatcher
from moe_core.mone import neuron_balance_loss
from moe_core.permute import make_permutation, permute_tokens


def plain_ep_reference(weights: list[torch.Tensor], mone: MoNEConfig, ep_size: int, x_TD: torch.Tensor,
                       idx_TK: torch.Tensor, w_TK: torch.Tensor, grad_TD: torch.Tensor) -> dict:
    """``dict(y, x, w, experts)``: output, grads of ``x_TD`` and ``w_TK`` and of the (gate, up, down) weights of all
    ``E`` experts. ``weights`` are the full ``[E, ...]`` expert weights; ``x_TD`` sets the experts' dtype."""
    E, F, D = weights[0].shape
    experts = SwiGLUExperts(E, D, F, dataclasses.replace(mone, balance_loss_coeff=0.0)).to(x_TD.dtype)
    with torch.no_grad():
        for p, w in zip((experts.w_gate_EFD, experts.w_up_EFD, experts.w_down_EDF), weights):
            p.copy_(w)
    x_TD, w_TK = x_TD.clone().requires_grad_(), w_TK.clone().requires_grad_()
    y_TD = dispatch_compute_combine(LocalDispatcher(), x_TD, idx_TK, w_TK, experts)
    loss = (y_TD * grad_TD).sum()
    if mone.enabled and mone.balance_loss_coeff > 0:
        perm = make_permutation(idx_TK, E)
        x_ND, counts_E, L = permute_tokens(x_TD, perm), perm.tokens_per_expert_E, E // ep_size
        ends = [0] + counts_E.cumsum(0)[L - 1::L].tolist()
        for r in range(ep_size):
            rows = slice(ends[r], ends[r + 1])
            loss = loss + mone.balance_loss_coeff * neuron_balance_loss(
                x_ND[rows], counts_E[r * L:(r + 1) * L], experts.w_gate_EFD[r * L:(r + 1) * L], experts.keep_k,
                mone.score)
    loss.backward()
    return dict(y=y_TD.detach(), x=x_TD.grad, w=w_TK.grad,
                experts=[torch.zeros_like(p) if p.grad is None else p.grad
                         for p in (experts.w_gate_EFD, experts.w_up_EFD, experts.w_down_EDF)])


def device_pairs(idx_TK: torch.Tensor, experts_per_device: int) -> int:
    """(token, device) pairs with a kept slot in ``idx_TK`` (-1 = dropped): the rows a deduplicated dispatch sends,
    counted on the host the plain way."""
    return len({(t, e // experts_per_device) for t, row in enumerate(idx_TK.tolist()) for e in row if e >= 0})
