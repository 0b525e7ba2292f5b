"""The SwiGLU expert on grouped GEMMs (single device; the GEMMs are kernels/grouped_gemm.py).

Shape legend: ``N`` permuted token rows grouped by expert, ``E`` experts, ``D`` hidden, ``F`` expert FFN width.
``tokens_per_expert_E``: int64 device tensor of rows per expert; rows past its sum are dead rows, whose outputs are
unspecified (see kernels/grouped_gemm.py). No host sync on the grouped-GEMM path.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from kernels.grouped_gemm import grouped_linear

NeuronSelect = Callable[[torch.Tensor], torch.Tensor]
"""``select(pre_act_NF) -> keep_NF`` (bool): the neurons each row keeps (MoNE, ``moe_core.mone.select_neurons``)."""


def masked_swiglu(pre_act_NF: torch.Tensor, up_NF: torch.Tensor, keep_NF: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` on kept neurons, exact 0 elsewhere (MoNE step 4 in moe_core/mone.py).

    The mask selects the SwiGLU inputs (``torch.where``), it never multiplies: a dropped neuron whose ``g`` or
    ``u`` is inf/NaN gives 0, not ``inf * 0 = NaN``, and gets exactly zero gradient (``where``'s backward)."""
    return F.silu(torch.where(keep_NF, pre_act_NF, 0)) * torch.where(keep_NF, up_NF, 0)


def swiglu_grouped(x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, w_gate_EFD: torch.Tensor,
                   w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor,
                   select: Optional[NeuronSelect] = None) -> torch.Tensor:
    """``y = W_down[e] (silu(W_gate[e] x) * (W_up[e] x))`` for each row's expert e; with ``select`` only the kept
    neurons of each row enter (:func:`masked_swiglu`)."""
    pre_act_NF = grouped_linear(x_ND, w_gate_EFD, tokens_per_expert_E)
    up_NF = grouped_linear(x_ND, w_up_EFD, tokens_per_expert_E)
    if select is None:
        hidden_NF = F.silu(pre_act_NF) * up_NF
    else:
        hidden_NF = masked_swiglu(pre_act_NF, up_NF, select(pre_act_NF))
    return grouped_linear(hidden_NF, w_down_EDF, tokens_per_expert_E)
