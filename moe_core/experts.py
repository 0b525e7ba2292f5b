"""SwiGLU routed experts (single device): a grouped implementation and a dense per-expert reference.

Shape legend: ``N`` token rows grouped by expert, ``E`` local experts, ``D`` hidden, ``F`` expert FFN width.
Expert e on x: ``W_down[e] (silu(W_gate[e] x) * (W_up[e] x))``; neuron i is row i of ``W_gate``/``W_up`` and
column i of ``W_down``. With MoNE enabled the hidden activations are masked per row (see ``moe_core/mone.py``) and
the optional neuron balance loss is attached to the output with :class:`AuxLossAutoScaler`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_core.config import MoNEConfig
from moe_core.aux_loss import AuxLossAutoScaler
from moe_core.grouped import swiglu_grouped
from moe_core.mone import keep_count, mone_swiglu_torch, neuron_balance_loss, neuron_selector, resolve_mone_fn


def swiglu_reference(x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, w_gate_EFD: torch.Tensor,
                     w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor) -> torch.Tensor:
    """Dense per-expert reference: one plain SwiGLU per expert on its rows (no MoNE, no grouped GEMM; reads the
    counts on the host). Returns the live rows only (``sum(tokens_per_expert_E)`` of them)."""
    outs = []
    splits = tokens_per_expert_E.tolist()
    for e, x_nD in enumerate(x_ND[:sum(splits)].split(splits, dim=0)):
        outs.append(F.linear(F.silu(F.linear(x_nD, w_gate_EFD[e])) * F.linear(x_nD, w_up_EFD[e]), w_down_EDF[e]))
    return torch.cat(outs, dim=0)


class SwiGLUExperts(nn.Module):
    """Experts ``first_expert .. first_expert + num_local_experts - 1`` of a layer.

    ``forward(x_ND, tokens_per_expert_E)``: rows of ``x_ND`` grouped by local expert in order, then dead rows
    (outputs unspecified); ``tokens_per_expert_E`` int64 counts per local expert on x's device (never read on the
    host). ``functional`` runs the same math on given weights (LLEP computes foreign experts with them).
    """

    def __init__(self, num_local_experts: int, hidden: int, ffn: int, mone: MoNEConfig, first_expert: int = 0):
        super().__init__()
        if num_local_experts < 1 or hidden < 1 or ffn < 1:
            raise ValueError(f"SwiGLUExperts needs positive sizes, got experts={num_local_experts} "
                             f"hidden={hidden} ffn={ffn}")
        self.num_local_experts, self.hidden, self.ffn = num_local_experts, hidden, ffn
        self.first_expert, self.mone = first_expert, mone
        self.recompute_act = False
        """``train.recompute_modules: [moe_act]``: the activation and down projection are recomputed in backward
        (``moe_core.grouped.swiglu_down``; the Triton MoNE kernel keeps no more than that already)."""
        self.keep_k = keep_count(mone.keep_ratio, ffn) if mone.enabled else ffn
        self.w_gate_EFD = nn.Parameter(torch.empty(num_local_experts, ffn, hidden))
        self.w_up_EFD = nn.Parameter(torch.empty(num_local_experts, ffn, hidden))
        self.w_down_EDF = nn.Parameter(torch.empty(num_local_experts, hidden, ffn))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for w in (self.w_gate_EFD, self.w_up_EFD, self.w_down_EDF):
            nn.init.normal_(w, std=std)

    @property
    def kept_fraction(self) -> float:
        """Fraction of expert neurons each routed token uses (1.0 without MoNE)."""
        return self.keep_k / self.ffn

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        return self.functional(x_ND, tokens_per_expert_E, self.w_gate_EFD, self.w_up_EFD, self.w_down_EDF)

    @property
    def balance_loss_enabled(self) -> bool:
        """Whether a training call attaches the MoNE neuron balance loss (``moe.mone.balance_loss_coeff > 0``)."""
        return self.mone.enabled and self.mone.balance_loss_coeff > 0 and self.training

    def functional(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, w_gate_EFD: torch.Tensor,
                   w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor, balance_loss: bool = True) -> torch.Tensor:
        """``forward``'s math on the given weights. ``balance_loss=False`` leaves the neuron balance loss out: a
        caller whose expert's rows are split over several calls (LLEP) computes it itself from
        ``moe_core.mone.neuron_balance_stats`` of each call, so it is the loss of all of the expert's rows."""
        if not self.mone.enabled:
            return swiglu_grouped(x_ND, tokens_per_expert_E, w_gate_EFD, w_up_EFD, w_down_EDF,
                                  recompute_act=self.recompute_act)
        mone_fn = resolve_mone_fn(self.mone.backend, x_ND.device)
        if mone_fn is mone_swiglu_torch and self.recompute_act:  # the torch path with its moe_act region
            y_ND = swiglu_grouped(x_ND, tokens_per_expert_E, w_gate_EFD, w_up_EFD, w_down_EDF,
                                  neuron_selector(self.keep_k, self.mone.score), recompute_act=True)
        else:
            y_ND = mone_fn(x_ND, tokens_per_expert_E, w_gate_EFD, w_up_EFD, w_down_EDF, self.keep_k, self.mone.score)
        if balance_loss and self.balance_loss_enabled:
            balance = neuron_balance_loss(x_ND, tokens_per_expert_E, w_gate_EFD, self.keep_k, self.mone.score)
            y_ND = AuxLossAutoScaler.apply(y_ND, self.mone.balance_loss_coeff * balance)
        return y_ND
