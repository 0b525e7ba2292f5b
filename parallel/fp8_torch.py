"""Torch-native FP8 backend (``fp8.backend=torch``): per-tensor-scaled FP8 GEMMs through ``torch._scaled_mm``.

Shape legend: ``M`` rows (tokens), ``K`` input features, ``N`` output features, ``G`` GEMMs in a group
(experts; a plain Linear is G=1), ``L`` amax history length.

Numerics
--------
A tensor ``x`` is stored in FP8 as ``q = saturate(x * scale)`` cast to E4M3 (activations and weights; largest
finite value 448) or E5M2 (gradients in the "hybrid" format; largest finite 57344). Saturation matters: a cast
of an out-of-range value gives NaN (E4M3) or inf (E5M2), so values are clamped first. The GEMM multiplies FP8
operands on the tensor cores, accumulates in fp32 and multiplies by ``scale_inv_a * scale_inv_b`` before the cast
to the output dtype, i.e. ``y = (q_a / scale_a) @ (q_b / scale_b)^T`` as if the dequantised operands had been
multiplied in fp32. The scale maps an amax (largest |value|) onto the format's range:
``scale = fp8_max / amax / 2**margin``; an amax that is 0 or not finite keeps the previous scale.

Recipes
-------
- ``delayed`` (Transformer Engine's DelayedScaling): the scale a tensor is quantised with comes from the amax
  history of earlier steps; the tensor's own amax is written into history row 0. At the start of the next pass
  (``ScalingState.begin``) the amax is reduced over the history (max over all L rows, or row 0 for
  ``most_recent``), the history is rolled one row (row 0 becomes the oldest and is zeroed, so the window holds
  the last L amaxes) and the scales are recomputed. A slot that never had an amax (first use after
  construction or resume: the state is not checkpointed) is scaled from its own amax once instead of TE's
  initial scale 1, so step 1 neither saturates activations nor flushes small gradients to zero.
- ``current``: every tensor is scaled from its own amax (one extra reduction per tensor, no lag). History
  row 0 holds the last amax so that metrics look the same for both recipes.

Bookkeeping layout (shape-for-shape with TE's ``fp8_meta`` of a GroupedLinear with G GEMMs):
  forward  ``amax_history [L, 3G]``, ``scale [3G]``: slots ``[inputs 0..G-1 | weights G..2G-1 | outputs 2G..]``
  backward ``amax_history [L, 2G]``, ``scale [2G]``: slots ``[grad_outputs 0..G-1 | grad_inputs G..2G-1]``
The output and grad-input slots exist for layout parity with TE (whose FP8 outputs are off by default); they
stay at amax 0 / scale 1.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}

# gemm(a_MK_fp8, a_scale_inv, b_NK_fp8, b_scale_inv, out_dtype) -> a @ b^T dequantised, [M, N] in out_dtype
Fp8Gemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]

_FP8_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("moetron_fp8_active", default=False)


@contextmanager
def fp8_active():
    """FP8 modules of this backend run their GEMMs in FP8 only inside this context (like TE's autocast)."""
    token = _FP8_ACTIVE.set(True)
    try:
        yield
    finally:
        _FP8_ACTIVE.reset(token)


def is_fp8_active() -> bool:
    return _FP8_ACTIVE.get()


def compute_scale(amax: torch.Tensor, old_scale: torch.Tensor, fp8_max: float, margin: int) -> torch.Tensor:
    """``fp8_max / amax / 2**margin`` where that is a finite positive number, else the old scale."""
    scale = fp8_max / amax.float() / (2.0 ** margin)
    valid = (amax > 0) & torch.isfinite(amax) & torch.isfinite(scale)
    return torch.where(valid, scale, old_scale)


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Saturating cast of ``x * scale`` to ``dtype`` (an out-of-range cast would give NaN/inf)."""
    fp8_max = FP8_MAX[dtype]
    return (x.float() * scale).clamp_(-fp8_max, fp8_max).to(dtype)


class ScalingState(nn.Module):
    """Amax history and scales for ``num_slots`` tensors quantised to one FP8 dtype (see module docstring).

    Buffers are not persistent: FP8 scaling state is transient and re-seeds itself after a resume.
    """

    def __init__(self, num_slots: int, dtype: torch.dtype, recipe: str, history_len: int,
                 compute_algo: str = "max", margin: int = 0):
        super().__init__()
        if recipe not in ("delayed", "current"):
            raise ValueError(f"fp8.recipe={recipe!r} is not supported by fp8.backend=torch "
                             "(use delayed or current, or fp8.backend=te for mxfp8)")
        self.dtype, self.recipe, self.compute_algo, self.margin = dtype, recipe, compute_algo, margin
        self.fp8_max = FP8_MAX[dtype]
        self.register_buffer("amax_history", torch.zeros(history_len, num_slots), persistent=False)
        self.register_buffer("scale", torch.ones(num_slots), persistent=False)
        self.register_buffer("seeded", torch.zeros(num_slots, dtype=torch.bool), persistent=False)
        self._pending = False  # an amax was recorded since the last begin()

    def begin(self) -> None:
        """Start of a forward (or backward) pass: fold the amaxes recorded in the last pass into the scales."""
        if not self._pending or self.recipe != "delayed":
            return
        with torch.no_grad():
            if self.compute_algo == "max":
                amax = self.amax_history.max(dim=0).values
            else:
                amax = self.amax_history[0].clone()
            if self.amax_history.shape[0] > 1:
                self.amax_history.copy_(torch.roll(self.amax_history, -1, dims=0))
            self.amax_history[0].zero_()
            self.scale.copy_(compute_scale(amax, self.scale, self.fp8_max, self.margin))
        self._pending = False

    def record(self, amax_G: torch.Tensor, first_slot: int) -> torch.Tensor:
        """Record the amaxes of G tensors quantised now into slots ``first_slot..+G``; returns the G scales to
        quantise them with. Vectorised over the group (a fixed handful of small kernels per group, not per
        GEMM) and free of host syncs (no ``.item()``), so the GPU never waits for the bookkeeping."""
        slots = slice(first_slot, first_slot + amax_G.shape[0])
        with torch.no_grad():
            amax_G = amax_G.float()
            own_scale_G = compute_scale(amax_G, self.scale[slots], self.fp8_max, self.margin)
            if self.recipe == "current":
                self.scale[slots] = own_scale_G
                self.amax_history[0, slots] = amax_G
            else:  # unseeded slots scale from their own amax once; max: a slot may be quantised twice a pass
                self.scale[slots] = torch.where(self.seeded[slots], self.scale[slots], own_scale_G)
                self.amax_history[0, slots] = torch.maximum(self.amax_history[0, slots], amax_G)
            self.seeded[slots] |= amax_G > 0
            self._pending = True
            return self.scale[slots].clone()

    def quantize_rows(self, x_MK: torch.Tensor, splits: list[int], first_slot: int):
        """Quantise consecutive row groups of ``x_MK`` (sizes ``splits``), group e with slot ``first_slot + e``.
        Returns ``(x_fp8_MK, scale_inv_G)``; an empty group records amax 0 (its scale is kept)."""
        with torch.no_grad():
            if len(splits) == 1:
                scale_G = self.record(x_MK.abs().amax().reshape(1), first_slot)
                row_scale = scale_G
            else:
                lengths = torch.tensor(splits, device=x_MK.device)
                amax_G = torch.segment_reduce(x_MK.abs().amax(dim=1).float(), "max", lengths=lengths,
                                              unsafe=True, initial=0.0)
                scale_G = self.record(amax_G, first_slot)
                row_scale = torch.repeat_interleave(scale_G, lengths, output_size=x_MK.shape[0])[:, None]
            return quantize(x_MK, row_scale, self.dtype), scale_G.reciprocal()

    def quantize_stacked(self, w_GNK: torch.Tensor, first_slot: int):
        """Quantise each ``w_GNK[e]`` with slot ``first_slot + e``; returns ``(w_fp8_GNK, scale_inv_G)``."""
        with torch.no_grad():
            scale_G = self.record(w_GNK.abs().amax(dim=(1, 2)), first_slot)
            return quantize(w_GNK, scale_G[:, None, None], self.dtype), scale_G.reciprocal()


class Fp8Meta(nn.Module):
    """Forward and backward scaling state of a group of G GEMMs (TE's fp8_meta layout, see module docstring)."""

    def __init__(self, num_gemms: int, fp8_cfg, device=None):
        super().__init__()
        grad_dtype = torch.float8_e5m2 if fp8_cfg.format == "hybrid" else torch.float8_e4m3fn
        common = dict(recipe=fp8_cfg.recipe, history_len=fp8_cfg.amax_history_len,
                      compute_algo=fp8_cfg.amax_compute_algo, margin=fp8_cfg.margin)
        self.num_gemms = num_gemms
        self.fwd = ScalingState(3 * num_gemms, torch.float8_e4m3fn, **common)
        self.bwd = ScalingState(2 * num_gemms, grad_dtype, **common)
        self.to(device)


# ---------------------------------------------------------------- GEMMs

def _pad_to_16(t: torch.Tensor) -> torch.Tensor:
    """Zero-pad both dims of a 2-D FP8 tensor to multiples of 16 (torch._scaled_mm's alignment rule)."""
    pad_rows, pad_cols = -t.shape[0] % 16, -t.shape[1] % 16
    if pad_rows == 0 and pad_cols == 0:
        return t
    # F.pad has no float8 kernels; the all-zero bit pattern is +0.0 in both FP8 formats.
    return F.pad(t.view(torch.uint8), (0, pad_cols, 0, pad_rows)).view(t.dtype)


def scaled_mm(a_MK: torch.Tensor, a_scale_inv: torch.Tensor, b_NK: torch.Tensor, b_scale_inv: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b^T`` on FP8 tensor cores. _scaled_mm wants a row-major and b column-major: ``b_NK.t()`` is."""
    M, N = a_MK.shape[0], b_NK.shape[0]
    a, b = _pad_to_16(a_MK.contiguous()), _pad_to_16(b_NK.contiguous())
    # The scales arrive as views into a per-group [G] tensor; cuBLASLt answered CUBLAS_STATUS_NOT_SUPPORTED for
    # such offset scale pointers on an H100, so it gets standalone scalars (two 4-byte copies).
    y = torch._scaled_mm(a, b.t(), scale_a=a_scale_inv.clone(), scale_b=b_scale_inv.clone(), out_dtype=out_dtype)
    return y[:M, :N]


class _Fp8GroupedMM(torch.autograd.Function):
    """``y_e = x_e @ w_e^T`` for consecutive row groups ``x_e`` of ``x_MK`` (sizes ``splits``), all GEMMs in FP8.

    Forward: inputs (slots e) and weights (slots G+e) in E4M3. Backward: grad_output (slot e) in the grad dtype;
    dgrad ``g_e @ w_e`` and wgrad ``g_e^T @ x_e`` reuse the FP8 copies saved by the forward (saving FP8 instead
    of bf16 activations also halves their memory).
    """

    @staticmethod
    def forward(ctx, x_MK, w_GNK, splits, meta: Fp8Meta, gemm: Fp8Gemm, out_dtype: torch.dtype):
        G = w_GNK.shape[0]
        meta.fwd.begin()
        xq_MK, x_inv_G = meta.fwd.quantize_rows(x_MK, splits, first_slot=0)
        wq_GNK, w_inv_G = meta.fwd.quantize_stacked(w_GNK, first_slot=G)
        y_parts = [gemm(xq_e, x_inv_G[e], wq_GNK[e], w_inv_G[e], out_dtype) if xq_e.shape[0]
                   else x_MK.new_zeros(0, w_GNK.shape[1], dtype=out_dtype)
                   for e, xq_e in enumerate(xq_MK.split(splits))]
        ctx.save_for_backward(xq_MK, x_inv_G, wq_GNK, w_inv_G)
        ctx.splits, ctx.meta, ctx.gemm, ctx.x_dtype, ctx.w_dtype = splits, meta, gemm, x_MK.dtype, w_GNK.dtype
        return _cat(y_parts)

    @staticmethod
    def backward(ctx, g_MN):
        xq_MK, x_inv_G, wq_GNK, w_inv_G = ctx.saved_tensors
        ctx.meta.bwd.begin()
        gq_MN, g_inv_G = ctx.meta.bwd.quantize_rows(g_MN, ctx.splits, first_slot=0)
        wq_GKN = wq_GNK.transpose(1, 2).contiguous()  # dgrad wants w_e^T row-major: one transpose for all e
        dx_parts, dw_GNK = [], g_MN.new_zeros(wq_GNK.shape, dtype=ctx.w_dtype)
        for e, (gq_e, xq_e) in enumerate(zip(gq_MN.split(ctx.splits), xq_MK.split(ctx.splits))):
            if gq_e.shape[0] == 0:
                dx_parts.append(g_MN.new_zeros(0, xq_MK.shape[1], dtype=ctx.x_dtype))
                continue
            dx_parts.append(ctx.gemm(gq_e, g_inv_G[e], wq_GKN[e], w_inv_G[e], ctx.x_dtype))    # [M,N]x[K,N]^T
            dw_GNK[e] = ctx.gemm(gq_e.t().contiguous(), g_inv_G[e], xq_e.t().contiguous(), x_inv_G[e],
                                 ctx.w_dtype)                                                # [N,M]x[K,M]^T
        return _cat(dx_parts), dw_GNK, None, None, None, None


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def fp8_grouped_mm(x_MK: torch.Tensor, w_GNK: torch.Tensor, splits: list[int], meta: Fp8Meta,
                   gemm: Fp8Gemm = scaled_mm) -> torch.Tensor:
    if len(splits) != w_GNK.shape[0] or sum(splits) != x_MK.shape[0]:
        raise ValueError(f"fp8_grouped_mm: splits {splits} must have one count per weight ({w_GNK.shape[0]}) "
                         f"and sum to the rows of x ({x_MK.shape[0]})")
    # Under torch.autocast (fp32 master weights, bf16 compute) the output takes the autocast dtype like F.linear;
    # the weights are quantised straight from fp32 and their gradient stays fp32.
    device = x_MK.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_MK.dtype
    return _Fp8GroupedMM.apply(x_MK, w_GNK, list(splits), meta, gemm, out_dtype)


# ---------------------------------------------------------------- modules

class Fp8Linear(nn.Module):
    """Drop-in for ``nn.Linear`` that shares its Parameters (so optimizer, sharding and checkpoints are
    unchanged) and runs the GEMM in FP8 inside :func:`fp8_active`; outside it is the plain linear."""

    def __init__(self, linear: nn.Linear, fp8_cfg, gemm: Fp8Gemm = scaled_mm):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.fp8_meta = Fp8Meta(1, fp8_cfg, linear.weight.device)
        self.gemm = gemm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_fp8_active():
            return F.linear(x, self.weight, self.bias)
        x_MK = x.reshape(-1, self.in_features)
        y_MN = fp8_grouped_mm(x_MK, self.weight.unsqueeze(0), [x_MK.shape[0]], self.fp8_meta, self.gemm)
        y = y_MN.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class ExpertsProxy(nn.Module):
    """Base of the FP8 expert modules: keeps the original SwiGLUExperts (not as a submodule, so its Parameters
    are not registered twice) and answers attribute reads it does not define from it (first_expert,
    num_local_experts, kept_fraction, ...), so the MoE layer and dispatchers see the same interface."""

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
        """LLEP's foreign experts (weights received this step, no scaling history): high precision."""
        return self._hp.functional(*args, **kwargs)


class Fp8SwiGLUExperts(ExpertsProxy):
    """FP8 twin of ``moe_core.experts.SwiGLUExperts``: same Parameters under the same names (w_gate_EFD,
    w_up_EFD, w_down_EDF), so checkpoints, sharding specs and the optimizer see no difference.

    Dense experts: gate, up and down projections are grouped FP8 GEMMs (one per local expert).
    MoNE experts: only the gate projection is FP8; neuron selection and the sparse kept-neuron up/down path
    run in the model dtype (:func:`mone_from_gate`; gathered rows are too small and irregular to gain).
    Outside :func:`fp8_active`, and for LLEP's foreign experts (``functional``), the original module runs.
    """

    def __init__(self, experts: nn.Module, fp8_cfg, gemm: Fp8Gemm = scaled_mm):
        super().__init__(experts)
        self.w_gate_EFD, self.w_up_EFD, self.w_down_EDF = experts.w_gate_EFD, experts.w_up_EFD, experts.w_down_EDF
        num_local = self.w_gate_EFD.shape[0]
        self.mone_enabled = experts.mone.enabled
        self.gate_meta = Fp8Meta(num_local, fp8_cfg, self.w_gate_EFD.device)
        if not self.mone_enabled:
            self.up_meta = Fp8Meta(num_local, fp8_cfg, self.w_up_EFD.device)
            self.down_meta = Fp8Meta(num_local, fp8_cfg, self.w_down_EDF.device)
        self.gemm = gemm

    def forward(self, x_ND: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        if not is_fp8_active():
            return self._hp(x_ND, tokens_per_expert)
        gate_NF = fp8_grouped_mm(x_ND, self.w_gate_EFD, tokens_per_expert, self.gate_meta, self.gemm)
        if self.mone_enabled:
            return mone_from_gate(self._hp, x_ND, tokens_per_expert, gate_NF)
        up_NF = fp8_grouped_mm(x_ND, self.w_up_EFD, tokens_per_expert, self.up_meta, self.gemm)
        return fp8_grouped_mm(F.silu(gate_NF) * up_NF, self.w_down_EDF, tokens_per_expert, self.down_meta,
                              self.gemm)


def mone_from_gate(experts: nn.Module, x_ND: torch.Tensor, tokens_per_expert: list[int],
                   gate_NF: torch.Tensor) -> torch.Tensor:
    """MoNE expert output from an already computed (FP8) gate projection; the rest is moe_core's MoNE math in the
    model dtype: neuron selection on the gate, masked up/down grouped GEMMs, optional neuron balance loss."""
    from moe_core.aux_loss import AuxLossAutoScaler
    from moe_core.grouped import grouped_linear, masked_swiglu
    from moe_core.mone import neuron_balance_loss, select_neurons

    mone = experts.mone
    keep_NF = select_neurons(gate_NF, experts.keep_k, mone.score)
    h_NF = masked_swiglu(gate_NF, grouped_linear(x_ND, experts.w_up_EFD, tokens_per_expert), keep_NF)
    y_ND = grouped_linear(h_NF, experts.w_down_EDF, tokens_per_expert)
    if mone.balance_loss_coeff > 0 and experts.training:
        balance = neuron_balance_loss(x_ND, tokens_per_expert, experts.w_gate_EFD, experts.keep_k, mone.score)
        y_ND = AuxLossAutoScaler.apply(y_ND, mone.balance_loss_coeff * balance)
    return y_ND


def scaling_states(model: nn.Module):
    """(qualified name, Fp8Meta) of every torch-backend FP8 GEMM group in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Fp8Meta)]


class _Fp8TPForwardImpl:
    """Replacement for megatron-core's ``_forward_impl`` of Column/RowParallelLinear: the same TP communication
    (sequence-parallel all-gather of the input, or the dgrad all-reduce) around an FP8 GEMM. Megatron's own
    layer keeps doing the rest (bias, gather_output, row-parallel reduce/reduce-scatter)."""

    def __init__(self, original, meta: Fp8Meta, gemm: Fp8Gemm):
        self.original, self.meta, self.gemm = original, meta, gemm

    def __call__(self, input, weight, bias, allreduce_dgrad, sequence_parallel, tp_group,
                 gradient_accumulation_fusion=False, grad_output_buffer=None, **kwargs):
        if not is_fp8_active():
            return self.original(input=input, weight=weight, bias=bias, allreduce_dgrad=allreduce_dgrad,
                                 sequence_parallel=sequence_parallel, tp_group=tp_group,
                                 gradient_accumulation_fusion=gradient_accumulation_fusion,
                                 grad_output_buffer=grad_output_buffer, **kwargs)
        if gradient_accumulation_fusion or grad_output_buffer is not None:
            raise NotImplementedError("fp8.backend=torch does not support megatron's gradient_accumulation_fusion "
                                      "or deferred embedding wgrad: turn them off or use fp8.backend=te")
        from megatron.core.tensor_parallel import mappings

        if sequence_parallel:
            input = mappings.gather_from_sequence_parallel_region(input, group=tp_group)
        elif allreduce_dgrad:
            input = mappings.copy_to_tensor_model_parallel_region(input, group=tp_group)
        x_MK = input.reshape(-1, input.shape[-1])
        y_MN = fp8_grouped_mm(x_MK, weight.unsqueeze(0), [x_MK.shape[0]], self.meta, self.gemm)
        y = y_MN.reshape(*input.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias


def convert_module(module: nn.Module, fp8_cfg, gemm: Fp8Gemm = scaled_mm) -> Optional[nn.Module]:
    """FP8 replacement for ``module`` (the module itself when converted in place), or None if it is not a
    projection this backend converts (the caller then looks at its children)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if isinstance(module, nn.Linear):
        return Fp8Linear(module, fp8_cfg, gemm)
    if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
        module.fp8_meta = Fp8Meta(1, fp8_cfg, module.weight.device)
        module._forward_impl = _Fp8TPForwardImpl(module._forward_impl, module.fp8_meta, gemm)
        return module
    if all(hasattr(module, n) for n in ("w_gate_EFD", "w_up_EFD", "w_down_EDF")):
        return Fp8SwiGLUExperts(module, fp8_cfg, gemm)
    return None
