"""Transformer Engine backend (``fp8.backend=te``): swap projections for TE modules, weights copied.

Imported only when FP8 with TE is configured (parallel/fp8/swap.py checks availability first).

Mapping of our stacked expert weights onto ``te.GroupedLinear`` (one GEMM per local expert):
  ``w_gate_EFD[e]`` -> gate GroupedLinear(E, in=D, out=F).weight{e}   (TE weights are [out, in], like nn.Linear)
  ``w_up_EFD[e]``   -> up   GroupedLinear(E, in=D, out=F).weight{e}
  ``w_down_EDF[e]`` -> down GroupedLinear(E, in=F, out=D).weight{e}
TE modules own their Parameters under those names; :func:`grouped_state_from_stacked` and
:func:`stacked_from_grouped_state` convert between the two layouts (checkpoint conversion, HF export).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from parallel.fp8.experts import ExpertsProxy, mone_from_gate


def grouped_state_from_stacked(w_ENK: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stacked expert weights [E, out, in] -> GroupedLinear state {"weight0": [out, in], ...}."""
    return {f"weight{e}": w_ENK[e] for e in range(w_ENK.shape[0])}


def stacked_from_grouped_state(state: dict[str, torch.Tensor], num_gemms: int) -> torch.Tensor:
    """GroupedLinear state {"weight0": [out, in], ...} -> stacked [E, out, in]."""
    missing = [f"weight{e}" for e in range(num_gemms) if f"weight{e}" not in state]
    if missing:
        raise KeyError(f"GroupedLinear state lacks {missing} (expected weight0..weight{num_gemms - 1})")
    return torch.stack([state[f"weight{e}"] for e in range(num_gemms)])


def _grouped_linear(w_ENK: torch.Tensor) -> nn.Module:
    import transformer_engine.pytorch as te

    E, N, K = w_ENK.shape
    gl = te.GroupedLinear(E, K, N, bias=False, params_dtype=w_ENK.dtype, device=w_ENK.device)
    with torch.no_grad():
        for name, w in grouped_state_from_stacked(w_ENK.detach()).items():
            getattr(gl, name).copy_(w)
    return gl


class TeSwiGLUExperts(ExpertsProxy):
    """SwiGLU experts as TE GroupedLinear modules (same call signature as moe_core SwiGLUExperts). With MoNE only
    the gate projection is a TE module; selection and the kept-neuron up/down path stay in the model dtype."""

    def __init__(self, experts: nn.Module, mone: bool):
        super().__init__(experts)
        self.mone_enabled = mone
        self.gate = _grouped_linear(experts.w_gate_EFD)
        if mone:
            self.w_up_EFD, self.w_down_EDF = experts.w_up_EFD, experts.w_down_EDF
        else:
            self.up, self.down = _grouped_linear(experts.w_up_EFD), _grouped_linear(experts.w_down_EDF)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """TE 2.x GroupedLinear takes the split sizes as host ints: this reads the counts (one host sync per
        call) and runs the live rows only; dead rows (past the counts' sum) get zeros."""
        splits = tokens_per_expert_E.tolist()
        live = sum(splits)
        x_LD = x_ND[:live]
        gate_LF = self.gate(x_LD, splits)
        if self.mone_enabled:
            y_LD = mone_from_gate(self._hp, x_LD, tokens_per_expert_E, gate_LF)
        else:
            y_LD = self.down(F.silu(gate_LF) * self.up(x_LD, splits), splits)
        return torch.cat([y_LD, y_LD.new_zeros(x_ND.shape[0] - live, y_LD.shape[1])])


class _TpLinearAdapter(nn.Module):
    """te.Linear standing in for moetron's TP linears (parallel/model.py), which return only the output."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if args or kwargs:
            raise TypeError("a TE-converted megatron linear takes only the input tensor")
        return self.linear(x)


def _te_linear_like(module: nn.Module, parallel_mode: Optional[str], **tp) -> nn.Module:
    import transformer_engine.pytorch as te

    w = module.weight
    out_features, in_features = w.shape
    if parallel_mode == "column":
        out_features *= tp["tp_size"]
    elif parallel_mode == "row":
        in_features *= tp["tp_size"]
    lin = te.Linear(in_features, out_features, bias=module.bias is not None, params_dtype=w.dtype,
                    device=w.device, parallel_mode=parallel_mode, **tp)
    with torch.no_grad():  # TE allocates the local [out/tp, in] or [out, in/tp] shard: same shape as ours
        lin.weight.copy_(w)
        if module.bias is not None:
            lin.bias.copy_(module.bias)
    return lin


def convert_module(module: nn.Module, fp8_cfg) -> Optional[nn.Module]:
    """TE replacement for ``module``, or None if it is not a projection this backend converts."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, nn.Linear):
        return _te_linear_like(module, None)
    if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
        column = isinstance(module, ColumnParallelLinear)
        if (column and module.gather_output) or (not column and not module.input_is_parallel) \
                or module.skip_bias_add and module.bias is not None:
            raise NotImplementedError(f"{type(module).__name__} with gather_output / input_is_parallel=False / "
                                      "skip_bias_add has no TE equivalent here; use fp8.backend=torchao")
        tp = dict(tp_group=module.tp_group, tp_size=module.tp_group.size(),
                  sequence_parallel=module.sequence_parallel)
        return _TpLinearAdapter(_te_linear_like(module, "column" if column else "row", **tp))
    if all(hasattr(module, n) for n in ("w_gate_EFD", "w_up_EFD", "w_down_EDF")):
        return TeSwiGLUExperts(module, module.mone.enabled)
    return None
