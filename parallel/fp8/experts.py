"""FP8 stand-ins for ``moe_core.experts.SwiGLUExperts`` (both FP8 backends build on :class:`ExpertsProxy`).

Shape legend: ``N`` token rows grouped by local expert (rows past ``tokens_per_expert_E.sum()`` are dead rows,
their outputs unspecified), ``P`` rows of the 16-aligned padded layout (parallel/fp8/grouped.py), ``E`` local
experts, ``D`` hidden, ``F`` expert FFN width.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.grouped_gemm import check_groups
from moe_core.grouped import swiglu_down
from parallel.fp8.grouped import PaddedGroups, check_aligned, fp8_grouped_mm


class ExpertsProxy(nn.Module):
    """Keeps the original SwiGLUExperts (not as a submodule, so its Parameters are not registered twice) and answers
    attribute reads it does not define from it (first_expert, num_local_experts, kept_fraction, ...), so the MoE
    layer and the dispatchers see the same interface."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        object.__setattr__(self, "_hp", experts)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            hp = self.__dict__["_hp"]
            if name in hp._parameters:  # Parameters are this module's own business (shared or replaced)
                raise
            return getattr(hp, name)

    def functional(self, *args, **kwargs):
        """LLEP's foreign experts (weights received this step): the original module's math, model dtype."""
        return self._hp.functional(*args, **kwargs)


class Float8GroupedExperts(ExpertsProxy):
    """``fp8.backend=torchao`` experts: the same Parameters under the same names (``w_gate_EFD``, ``w_up_EFD``,
    ``w_down_EDF``; optimizer, sharding specs and checkpoints see no difference), each projection ONE grouped FP8
    GEMM with rowwise scales (:func:`parallel.fp8.grouped.fp8_grouped_mm`).

    Dense experts: the rows are padded once into the 16-aligned layout, gate/up/SwiGLU/down run there, and the N
    rows are gathered back. MoNE experts: only the gate projection is FP8; the neuron selection, the kept-neuron
    up/down path and the balance loss run in the model dtype on that same gate output (:func:`mone_from_gate`).
    ``forward`` makes no host sync (the counts stay on the device).

    Errors: ValueError at construction when D or F is not a multiple of 16 (FP8 GEMM widths)."""

    def __init__(self, experts: nn.Module):
        super().__init__(experts)
        self.w_gate_EFD, self.w_up_EFD, self.w_down_EDF = experts.w_gate_EFD, experts.w_up_EFD, experts.w_down_EDF
        for name in ("w_gate_EFD", "w_up_EFD", "w_down_EDF"):
            check_aligned(name, getattr(self, name))
        self.mone_enabled = experts.mone.enabled

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        check_groups(x_ND, self.w_gate_EFD.shape[0], tokens_per_expert_E)
        groups = PaddedGroups.build(tokens_per_expert_E, x_ND.shape[0])
        x_PD = groups.pad(x_ND)
        gate_PF = fp8_grouped_mm(x_PD, self.w_gate_EFD, groups.offs_E)
        if self.mone_enabled:
            return mone_from_gate(self._hp, x_ND, tokens_per_expert_E, groups.unpad(gate_PF))
        up_PF = fp8_grouped_mm(x_PD, self.w_up_EFD, groups.offs_E)
        y_PD = swiglu_down(gate_PF, up_PF, None, lambda h_PF: fp8_grouped_mm(h_PF, self.w_down_EDF, groups.offs_E),
                           self.recompute_act)
        return groups.unpad(y_PD)


def mone_from_gate(experts: nn.Module, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                   gate_NF: torch.Tensor) -> torch.Tensor:
    """MoNE expert output from an already computed (FP8) gate projection ``gate_NF``; the rest is moe_core's MoNE
    math in the model dtype: neuron selection on ``gate_NF``, the masked SwiGLU on that same ``gate_NF``, up/down
    grouped GEMMs, and the optional neuron balance loss (moe_core/mone.py defines the selection)."""
    from kernels.grouped_gemm import grouped_linear
    from moe_core.aux_loss import AuxLossAutoScaler
    from moe_core.mone import neuron_balance_loss, select_neurons

    mone = experts.mone
    keep_NF = select_neurons(gate_NF, experts.keep_k, mone.score)
    up_NF = grouped_linear(x_ND, experts.w_up_EFD, tokens_per_expert_E)
    y_ND = swiglu_down(gate_NF, up_NF, keep_NF,
                       lambda h_NF: grouped_linear(h_NF, experts.w_down_EDF, tokens_per_expert_E), experts.recompute_act)
    if mone.balance_loss_coeff > 0 and experts.training:
        balance = neuron_balance_loss(x_ND, tokens_per_expert_E, experts.w_gate_EFD, experts.keep_k, mone.score)
        y_ND = AuxLossAutoScaler.apply(y_ND, mone.balance_loss_coeff * balance)
    return y_ND
