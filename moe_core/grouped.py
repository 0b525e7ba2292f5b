"""The SwiGLU expert on grouped GEMMs (single device; the GEMMs are kernels/grouped_gemm.py).

Shape legend: ``N`` permuted token rows grouped by expert, ``E`` experts, ``D`` hidden, ``F`` expert FFN width.
``tokens_per_expert_E``: int64 device tensor of rows per expert; rows past its sum are dead rows, whose outputs are
unspecified (see kernels/grouped_gemm.py). No host sync on the grouped-GEMM path.

``recompute_act`` (``train.recompute_modules: [moe_act]``, moe_core/recompute.py): the activation and the down
projection are one recompute region whose inputs are the gate/up GEMM outputs and the keep-mask, so backward
recomputes ``h`` from the first pass's ``g, u`` and neuron choices.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from kernels.grouped_gemm import grouped_linear
from moe_core.recompute import maybe_checkpointed

NeuronSelect = Callable[[torch.Tensor], torch.Tensor]
"""``select(pre_act_NF) -> keep_NF`` (bool): the neurons each row keeps (MoNE, ``moe_core.mone.select_neurons``)."""


def masked_swiglu(pre_act_NF: torch.Tensor, up_NF: torch.Tensor, keep_NF: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` on kept neurons, exact 0 elsewhere (MoNE step 4 in moe_core/mone.py).

    The mask selects the SwiGLU inputs (``torch.where``), it never multiplies: a dropped neuron whose ``g`` or
    ``u`` is inf/NaN gives 0, not ``inf * 0 = NaN``, and gets exactly zero gradient (``where``'s backward)."""
    return F.silu(torch.where(keep_NF, pre_act_NF, 0)) * torch.where(keep_NF, up_NF, 0)


def _activate_down(pre_act_NF: torch.Tensor, up_NF: torch.Tensor, keep_NF: Optional[torch.Tensor],
                   down: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    hidden_NF = F.silu(pre_act_NF) * up_NF if keep_NF is None else masked_swiglu(pre_act_NF, up_NF, keep_NF)
    return down(hidden_NF)


def swiglu_down(pre_act_NF: torch.Tensor, up_NF: torch.Tensor, keep_NF: Optional[torch.Tensor],
                down: Callable[[torch.Tensor], torch.Tensor], recompute_act: bool) -> torch.Tensor:
    """``down(h)`` with ``h = silu(g) * u`` (:func:`masked_swiglu` by ``keep_NF`` when given): the part of an
    expert after its gate/up GEMMs, one recompute region when ``recompute_act`` (module docstring; every expert
    implementation, FP8 included, goes through here)."""
    return maybe_checkpointed(recompute_act, _activate_down, pre_act_NF, up_NF, keep_NF, down)


def swiglu_grouped(x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, w_gate_EFD: torch.Tensor,
                   w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor,
                   select: Optional[NeuronSelect] = None, recompute_act: bool = False) -> torch.Tensor:
    """``y = W_down[e] (silu(W_gate[e] x) * (W_up[e] x))`` for each row's expert e; with ``select`` only the kept
    neurons of each row enter (:func:`masked_swiglu`); ``recompute_act``: :func:`swiglu_down`'s region."""
    pre_act_NF = grouped_linear(x_ND, w_gate_EFD, tokens_per_expert_E)
    up_NF = grouped_linear(x_ND, w_up_EFD, tokens_per_expert_E)
    keep_NF = None if select is None else select(pre_act_NF)
    return swiglu_down(pre_act_NF, up_NF, keep_NF, lambda h_NF: grouped_linear(h_NF, w_down_EDF, tokens_per_expert_E),
                       recompute_act)
