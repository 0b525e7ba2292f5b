"""FP8 projections: availability checks, recipes, module swap-in and metrics. Details in docs/fp8.md.

What runs in FP8 (train.precision=fp8): attention QKV/output projections and the expert projections (with
MoNE: only the expert gate projection). The router stays fp32, norms/embedding/LM head stay in the model dtype,
and with ``fp8.keep_first_last_bf16`` the first and last transformer layers are not converted at all.

Backends (``fp8.backend``):
- ``te``: Transformer Engine modules (te.Linear, te.GroupedLinear) under ``te.fp8_autocast`` with the configured
  recipe (DelayedScaling, Float8CurrentScaling, MXFP8BlockScaling). Needs ``pip install 'moetron[gpu]'``.
- ``torch``: parallel/fp8_torch.py, per-tensor scaled ``torch._scaled_mm`` (delayed or current scaling) that
  shares the original Parameters; no TE needed.
Nothing here imports transformer_engine at module import, so bf16/fp32 runs never touch it.

Model wiring (what the model builder and trainer call):
    convert_to_fp8(layer, cfg, layer_idx)           # per transformer layer, after building, before the optimizer
    with fp8_context(cfg, amax_group=dp_tp_group):  # around the forward pass (backward needs no context)
        loss = model(batch)
    fp8_stats(model)                                # {tag: value} for TensorBoard
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from parallel.config import FP8Config, RunConfig

FP8_MIN_CAPABILITY = (8, 9)      # Ada / Hopper: FP8 tensor cores
MXFP8_MIN_CAPABILITY = (10, 0)   # Blackwell: block-scaled MXFP8
_INSTALL_TE = "install Transformer Engine (pip install 'moetron[gpu]', i.e. transformer-engine[pytorch])"


# ---------------------------------------------------------------- availability

@dataclass(frozen=True)
class Fp8Support:
    """What this machine offers for FP8: a CUDA device's compute capability and whether TE imports."""

    capability: Optional[tuple[int, int]]  # None: no CUDA GPU visible
    te_error: Optional[str]                # None: transformer_engine.pytorch imported fine


def probe_fp8_support(backend: str) -> Fp8Support:
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    te_error = None
    if backend == "te" and capability is not None:
        try:
            import transformer_engine.pytorch  # noqa: F401
        except Exception as e:  # noqa: BLE001 - ImportError, or a CUDA/ABI mismatch raised while loading
            te_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return Fp8Support(capability, te_error)


def fp8_unavailable_reason(fp8_cfg, support: Fp8Support) -> Optional[str]:
    """One line saying why ``train.precision=fp8`` cannot run with ``fp8_cfg`` here, or None if it can."""
    if fp8_cfg.amax_history_len < 1:
        return f"fp8.amax_history_len must be >= 1, got {fp8_cfg.amax_history_len}"
    if fp8_cfg.margin < 0:
        return f"fp8.margin must be >= 0, got {fp8_cfg.margin}"
    if fp8_cfg.recipe == "mxfp8" and fp8_cfg.backend != "te":
        return "fp8.recipe=mxfp8 needs fp8.backend=te (the torch backend has per-tensor scaling only)"
    if support.capability is None:
        return "train.precision=fp8 needs a CUDA GPU with FP8 tensor cores and none is visible: " \
               "use train.precision=bf16"
    cap = ".".join(map(str, support.capability))
    if support.capability < FP8_MIN_CAPABILITY:
        return f"train.precision=fp8 needs compute capability >= 8.9 (Ada/Hopper), this GPU has {cap}: " \
               "use train.precision=bf16"
    if fp8_cfg.backend == "te" and support.te_error is not None:
        return f"train.precision=fp8 with fp8.backend=te needs Transformer Engine ({support.te_error}): " \
               f"{_INSTALL_TE}, or set fp8.backend=torch, or use train.precision=bf16"
    if fp8_cfg.recipe == "mxfp8" and support.capability < MXFP8_MIN_CAPABILITY:
        return f"fp8.recipe=mxfp8 needs a Blackwell GPU (compute capability >= 10.0), this GPU has {cap}: " \
               "use fp8.recipe=delayed or current"
    return None


def fp8_unavailable_here(fp8_cfg: FP8Config) -> Optional[str]:
    """One line saying why ``train.precision=fp8`` cannot run on this machine with ``fp8_cfg``, or None if it
    can. ``launcher.config.validate`` turns it into a config error."""
    return fp8_unavailable_reason(fp8_cfg, probe_fp8_support(fp8_cfg.backend))


def fp8_layer_enabled(cfg: RunConfig, layer_idx: Optional[int] = None) -> bool:
    """Whether transformer layer ``layer_idx`` runs in FP8 (None: whether any layer does)."""
    if cfg.train.precision != "fp8":
        return False
    if layer_idx is None or not cfg.fp8.keep_first_last_bf16:
        return True
    return layer_idx not in (0, cfg.model.num_layers - 1)


# ---------------------------------------------------------------- autocast

def te_recipe_spec(fp8_cfg) -> tuple[str, dict]:
    """(class name in transformer_engine.common.recipe, kwargs) for the configured recipe."""
    fmt = "HYBRID" if fp8_cfg.format == "hybrid" else "E4M3"
    if fp8_cfg.recipe == "delayed":
        return "DelayedScaling", dict(fp8_format=fmt, amax_history_len=fp8_cfg.amax_history_len,
                                      amax_compute_algo=fp8_cfg.amax_compute_algo, margin=fp8_cfg.margin)
    if fp8_cfg.recipe == "current":
        return "Float8CurrentScaling", dict(fp8_format=fmt)
    return "MXFP8BlockScaling", dict(fp8_format=fmt)


def build_te_recipe(fp8_cfg):
    from transformer_engine.common import recipe as te_recipe

    name, kwargs = te_recipe_spec(fp8_cfg)
    kwargs["fp8_format"] = getattr(te_recipe.Format, kwargs["fp8_format"])
    return getattr(te_recipe, name)(**kwargs)


def fp8_context(cfg: RunConfig, layer_idx: Optional[int] = None, amax_group=None):
    """Context for a forward pass: FP8 autocast with the configured recipe, or a no-op when FP8 is off (or
    ``layer_idx`` is kept in bf16). Prefer one context around the whole model forward: TE then reduces the
    amaxes of all layers in one collective over ``amax_group`` (pass the DP x TP group so every replica scales
    alike). Layers that were not converted stay bf16 inside it."""
    if not fp8_layer_enabled(cfg, layer_idx):
        return contextlib.nullcontext()
    if cfg.fp8.backend == "torch":
        from parallel.fp8_torch import fp8_active

        return fp8_active()
    import transformer_engine.pytorch as te

    recipe = build_te_recipe(cfg.fp8)
    if hasattr(te, "autocast"):  # TE >= 2.8 renamed fp8_autocast
        return te.autocast(enabled=True, recipe=recipe, amax_reduction_group=amax_group)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=amax_group)


def sync_amax(model: nn.Module, group) -> None:
    """torch backend: all-reduce (MAX) the amaxes recorded this step over ``group`` so every replica derives the
    same scales (TE does this inside its autocast). Call after backward, before the next forward."""
    import torch.distributed as dist

    from parallel.fp8_torch import scaling_states

    states = [s for _, meta in scaling_states(model) for s in (meta.fwd, meta.bwd)]
    if not states or group is None or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([s.amax_history[0] for s in states])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
    for s, row in zip(states, flat.split([s.amax_history.shape[1] for s in states])):
        s.amax_history[0].copy_(row)


# ---------------------------------------------------------------- conversion

def convert_to_fp8(layer: nn.Module, cfg: RunConfig, layer_idx: int, gemm=None) -> nn.Module:
    """Swap the projections of transformer layer ``layer_idx`` to FP8 modules in place and return it; a no-op
    when FP8 is off for this layer. Converted: nn.Linear, megatron-core Column/RowParallelLinear and
    SwiGLU experts (modules with w_gate_EFD/w_up_EFD/w_down_EDF). Subtrees whose name contains "router"
    stay high precision. ``gemm`` (torch backend) replaces torch._scaled_mm; tests pass the CPU emulation."""
    if not fp8_layer_enabled(cfg, layer_idx):
        return layer
    if cfg.fp8.backend == "torch":
        from parallel import fp8_torch as backend

        kwargs = {} if gemm is None else {"gemm": gemm}
    else:
        from parallel import fp8_te as backend

        kwargs = {}
    _swap_children(layer, "", cfg.fp8, backend, kwargs)
    return layer


def _swap_children(module: nn.Module, prefix: str, fp8_cfg, backend, kwargs) -> None:
    for name, child in list(module.named_children()):
        qualified = f"{prefix}{name}"
        if "router" in qualified.lower():
            continue
        replacement = backend.convert_module(child, fp8_cfg, **kwargs)
        if replacement is None:
            _swap_children(child, qualified + ".", fp8_cfg, backend, kwargs)
        elif replacement is not child:
            setattr(module, name, replacement)


# ---------------------------------------------------------------- metrics

_FWD_KINDS, _BWD_KINDS = ("input", "weight"), ("grad_output",)


def fp8_stats(model: nn.Module) -> dict[str, float]:
    """Per FP8 module: ``train_fp8/<module>/<tensor>_amax`` (max over the history window and over the module's
    GEMMs) and ``train_fp8/<module>/<tensor>_scale`` (smallest scale, the most range-limited GEMM), tensor in
    input/weight/grad_output. Works for both backends (TE's delayed-scaling fp8_meta has the same layout)."""
    stats: dict[str, float] = {}
    for name, num_gemms, fwd, bwd in _scaling_tables(model):
        for kinds, (history, scale) in ((_FWD_KINDS, fwd), (_BWD_KINDS, bwd)):
            for i, kind in enumerate(kinds):
                slots = slice(i * num_gemms, (i + 1) * num_gemms)
                stats[f"train_fp8/{name}/{kind}_amax"] = float(history[:, slots].max())
                stats[f"train_fp8/{name}/{kind}_scale"] = float(scale[slots].min())
    return stats


def _scaling_tables(model: nn.Module):
    """(tag, G, (fwd amax_history, fwd scale), (bwd amax_history, bwd scale)) per FP8 GEMM group."""
    from parallel.fp8_torch import Fp8Meta

    for name, m in model.named_modules():
        if isinstance(m, Fp8Meta):  # <module>.fp8_meta, or <experts>.gate_meta / up_meta / down_meta
            tag = name.removesuffix(".fp8_meta").removesuffix("_meta")
            yield tag, m.num_gemms, (m.fwd.amax_history, m.fwd.scale), (m.bwd.amax_history, m.bwd.scale)
        meta = getattr(m, "fp8_meta", None)
        if isinstance(meta, dict) and "scaling_fwd" in meta and "scaling_bwd" in meta:  # a TE module
            fwd, bwd = meta["scaling_fwd"], meta["scaling_bwd"]
            yield name, getattr(m, "num_gemms", 1), (fwd.amax_history, fwd.scale), (bwd.amax_history, bwd.scale)
