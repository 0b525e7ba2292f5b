"""torchao backend (``fp8.backend=torchao``, the default): torchao float8 training for the dense projections and a
grouped FP8 GEMM for the experts. Imported only when FP8 is on (parallel/fp8/swap.py).

- ``nn.Linear`` -> torchao ``Float8Linear`` through the public ``torchao.float8.convert_to_float8_training`` (the
  same Parameters under the same names). Recipes ``Float8LinearConfig.from_recipe_name``: ``tensorwise`` (dynamic
  per-tensor scales; E4M3 input/weight, E5M2 grad_output) or ``rowwise`` (power-of-2 per-row scales, E4M3).
  Scales are computed from each tensor as it is cast (no amax history, no state to sync or checkpoint); under
  ``torch.compile`` the amax/scale/cast ops fuse into neighbouring kernels. A linear whose widths are not
  multiples of 16 (FP8 GEMM alignment) stays in the model dtype, as torchao's own filters do.
- megatron-core Column/RowParallelLinear keep their class; their ``_forward_impl`` gets torchao's float8 matmul
  (``torchao.prototype.moe_training.utils._to_fp8_then_scaled_mm``, i.e. ``matmul_with_hp_or_float8_args`` with the
  recipe's config) inside megatron's own TP communication, so TP > 1 works (each rank scales its own shard).
- SwiGLU experts -> :class:`parallel.fp8.experts.Float8GroupedExperts` (rowwise grouped FP8 GEMMs; MoNE: gate only).

On CPU, ``torch._scaled_mm`` exists, so the dense path above is the real torchao code in CI; the experts' grouped
FP8 GEMM runs torchao's CUDA kernels only on a GPU and the emulation on CPU (parallel/fp8/grouped.py).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from parallel.fp8.experts import Float8GroupedExperts
from parallel.fp8.grouped import ALIGN


def op_config(recipe: str):
    """torchao's ``Float8TrainingOpConfig`` for ``fp8.recipe`` (tensorwise | rowwise): it carries the
    ``Float8LinearConfig`` of that recipe and the matching ``LinearMMConfig`` the float8 matmul takes."""
    from torchao.prototype.moe_training.config import Float8TrainingOpConfig

    return Float8TrainingOpConfig(float8_linear_recipe=recipe)


def _aligned(linear: nn.Module) -> bool:
    out_features, in_features = linear.weight.shape
    return out_features % ALIGN == 0 and in_features % ALIGN == 0


class _Float8TPForwardImpl:
    """Replacement for megatron-core's ``_forward_impl`` of Column/RowParallelLinear: the same TP communication
    (sequence-parallel all-gather of the input, or the identity whose backward all-reduces the input gradient)
    around torchao's float8 matmul. Megatron's layer keeps doing the rest (bias, gather_output, the row-parallel
    all-reduce / reduce-scatter of the output)."""

    def __init__(self, config):
        self.config = config

    def __call__(self, input, weight, bias, allreduce_dgrad, sequence_parallel, tp_group,
                 gradient_accumulation_fusion=False, grad_output_buffer=None, **kwargs):
        if gradient_accumulation_fusion or grad_output_buffer is not None:
            raise NotImplementedError("fp8.backend=torchao does not support megatron's gradient_accumulation_fusion "
                                      "or deferred embedding wgrad: turn them off or use fp8.backend=te")
        from megatron.core.tensor_parallel import mappings
        from torchao.prototype.moe_training.utils import _to_fp8_then_scaled_mm

        if sequence_parallel:
            input = mappings.gather_from_sequence_parallel_region(input, group=tp_group)
        elif allreduce_dgrad:
            input = mappings.copy_to_tensor_model_parallel_region(input, group=tp_group)
        y = _to_fp8_then_scaled_mm(input, weight, self.config)
        return y if bias is None else y + bias


def convert_module(module: nn.Module, fp8_cfg) -> Optional[nn.Module]:
    """FP8 replacement for ``module`` (the module itself when converted in place or kept as it is), or None if it
    is not a projection this backend converts (the caller then looks at its children)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from torchao.float8 import convert_to_float8_training

    if isinstance(module, nn.Linear):
        if not _aligned(module):
            return module
        return convert_to_float8_training(module, config=op_config(fp8_cfg.recipe)._float8_linear_config)
    if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
        if _aligned(module):
            module._forward_impl = _Float8TPForwardImpl(op_config(fp8_cfg.recipe))
        return module
    if all(hasattr(module, n) for n in ("w_gate_EFD", "w_up_EFD", "w_down_EDF")):
        return Float8GroupedExperts(module)
    return None
