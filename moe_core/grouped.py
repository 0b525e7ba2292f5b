"""Grouped expert GEMMs and the SwiGLU expert built on them (single device).

Shape legend: ``N`` permuted token rows grouped by expert, ``E`` experts, ``D`` hidden, ``F`` expert FFN width,
``O``/``I`` a weight's output/input width. ``tokens_per_expert`` (a list of E ints summing to N) says how many
consecutive rows of ``x`` belong to each expert.

``grouped_linear`` is one ``torch._grouped_mm`` call (a single grouped GEMM on CUDA, and a correct kernel on CPU)
wherever that op accepts the inputs and there is at least one row, and a loop of per-expert matmuls otherwise
(e.g. fp64, no rows, or CUDA tensors whose dtype/alignment the op rejects). Both paths compute
``y[rows of e] = x[rows of e] @ w[e].T`` in the input dtype with fp32 accumulation inside the GEMM.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CUDA_GROUPED_MM_DTYPES = (torch.bfloat16,)
_ALIGN_BYTES = 16  # torch._grouped_mm needs 16-byte aligned row strides (CPU and CUDA)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm``'s backward rejects stride-0 (expanded) gradients such as the one ``y.sum()`` produces.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> torch.Tensor:
        return grad_y.contiguous()


def grouped_mm_usable(x_NI: torch.Tensor, w_EOI: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` accepts these operands (otherwise the per-expert loop is used)."""
    if not hasattr(torch, "_grouped_mm") or x_NI.dtype != w_EOI.dtype:
        return False
    dtypes = {"cpu": _GROUPED_MM_DTYPES, "cuda": _CUDA_GROUPED_MM_DTYPES}.get(x_NI.device.type, ())
    if x_NI.dtype not in dtypes:
        return False
    elem = x_NI.element_size()
    return (w_EOI.shape[1] * elem) % _ALIGN_BYTES == 0 and (w_EOI.shape[2] * elem) % _ALIGN_BYTES == 0


def _check_groups(x_NI: torch.Tensor, w_EOI: torch.Tensor, tokens_per_expert: list[int]) -> None:
    if len(tokens_per_expert) != w_EOI.shape[0]:
        raise ValueError(f"tokens_per_expert has {len(tokens_per_expert)} entries but there are "
                         f"{w_EOI.shape[0]} expert weights")
    if sum(tokens_per_expert) != x_NI.shape[0]:
        raise ValueError(f"tokens_per_expert sums to {sum(tokens_per_expert)} but x has {x_NI.shape[0]} rows")
    if x_NI.shape[1] != w_EOI.shape[2]:
        raise ValueError(f"x has width {x_NI.shape[1]} but the expert weights expect {w_EOI.shape[2]}")


def loop_linear(x_NI: torch.Tensor, w_EOI: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
    """Per-expert matmuls over the row groups (the fallback and the reference for :func:`grouped_linear`)."""
    _check_groups(x_NI, w_EOI, tokens_per_expert)
    chunks = x_NI.split(tokens_per_expert, dim=0)
    return torch.cat([F.linear(x_nI, w_EOI[e]) for e, x_nI in enumerate(chunks)], dim=0)


def grouped_linear(x_NI: torch.Tensor, w_EOI: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
    """``y_NO``: rows of expert e multiplied by ``w_EOI[e].T``; one grouped GEMM where the backend allows."""
    if not grouped_mm_usable(x_NI, w_EOI) or x_NI.shape[0] == 0:
        # no rows: torch._grouped_mm's backward rejects the stride-0 [0, O] gradient (which .contiguous() keeps,
        # having no elements); the loop returns the same empty output and zero weight gradients
        return loop_linear(x_NI, w_EOI, tokens_per_expert)
    _check_groups(x_NI, w_EOI, tokens_per_expert)
    offsets_E = torch.tensor(tokens_per_expert, dtype=torch.int64).cumsum(0).to(torch.int32).to(x_NI.device)
    y_NO = torch._grouped_mm(x_NI.contiguous(), w_EOI.contiguous().transpose(-2, -1), offs=offsets_E)
    return _ContiguousGrad.apply(y_NO)


NeuronSelect = Callable[[torch.Tensor], torch.Tensor]
"""``select(pre_act_NF) -> keep_NF`` (bool): the neurons each row keeps (MoNE, ``moe_core.mone.select_neurons``)."""


def masked_swiglu(pre_act_NF: torch.Tensor, up_NF: torch.Tensor, keep_NF: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` on kept neurons, exact 0 elsewhere (MoNE step 4 in moe_core/mone.py).

    The mask selects the SwiGLU inputs (``torch.where``), it never multiplies: a dropped neuron whose ``g`` or
    ``u`` is inf/NaN gives 0, not ``inf * 0 = NaN``, and gets exactly zero gradient (``where``'s backward)."""
    return F.silu(torch.where(keep_NF, pre_act_NF, 0)) * torch.where(keep_NF, up_NF, 0)


def swiglu_grouped(x_ND: torch.Tensor, tokens_per_expert: list[int], w_gate_EFD: torch.Tensor,
                   w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor,
                   select: Optional[NeuronSelect] = None) -> torch.Tensor:
    """``y = W_down[e] (silu(W_gate[e] x) * (W_up[e] x))`` for each row's expert e; with ``select`` only the kept
    neurons of each row enter (:func:`masked_swiglu`)."""
    pre_act_NF = grouped_linear(x_ND, w_gate_EFD, tokens_per_expert)
    up_NF = grouped_linear(x_ND, w_up_EFD, tokens_per_expert)
    if select is None:
        hidden_NF = F.silu(pre_act_NF) * up_NF
    else:
        hidden_NF = masked_swiglu(pre_act_NF, up_NF, select(pre_act_NF))
    return grouped_linear(hidden_NF, w_down_EDF, tokens_per_expert)
