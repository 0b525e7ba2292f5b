"""FP8 projections: config and availability checks, module swap-in, autocast and metrics. Details in docs/fp8.md.

What runs in FP8 (train.precision=fp8): attention QKV/output projections and the expert projections (with
MoNE: only the expert gate projection). The router stays fp32, norms/embedding/LM head stay in the model dtype,
and with ``fp8.keep_first_last_bf16`` the first and last transformer layers are not converted at all.

Backends (``fp8.backend``):
- ``torchao`` (default): parallel/fp8/torchao_backend.py, torchao float8 training for the dense projections (tensorwise or
  rowwise dynamic scaling) and a grouped rowwise FP8 GEMM for the experts (parallel/fp8/grouped.py). The converted
  modules always compute in FP8 (no context needed; :func:`fp8_context` is a no-op for this backend).
- ``te``: Transformer Engine modules (te.Linear, te.GroupedLinear) under ``te.autocast`` with the configured
  recipe (DelayedScaling, Float8CurrentScaling, MXFP8BlockScaling). Needs ``pip install 'moetron[gpu]'``.
Nothing here imports torchao or transformer_engine at module import, so bf16/fp32 runs never touch them.

Model wiring (what the model builder and trainer call):
    convert_to_fp8(layer, cfg, layer_idx)           # per transformer layer, after building, before the optimizer
    with fp8_context(cfg, amax_group=dp_tp_group):  # around the forward pass (backward needs no context)
        loss = model(batch)
    fp8_stats(model)                                # {tag: value} for TensorBoard (TE's amax/scale tables)
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
_INSTALL_TORCHAO = "reinstall moetron's pinned torchao (launcher/install.sh)"


# ---------------------------------------------------------------- availability

RECIPES = {"torchao": ("tensorwise", "rowwise"), "te": ("delayed", "current", "mxfp8")}
_TE_ONLY_KEYS = ("format", "amax_history_len", "amax_compute_algo", "margin")
_ALIGN = 16  # FP8 GEMMs (torch._scaled_mm, torch._scaled_grouped_mm, TE) need widths that are multiples of 16


@dataclass(frozen=True)
class Fp8Support:
    """What this machine offers for FP8: a CUDA device's compute capability and whether the backend imports."""

    capability: Optional[tuple[int, int]]  # None: no CUDA GPU visible
    import_error: Optional[str]            # None: the backend's package (torchao / transformer_engine) imported fine


def probe_fp8_support(backend: str) -> Fp8Support:
    """Compute capability, and (only where a GPU is visible) whether ``backend``'s package imports."""
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    import_error = None
    if capability is not None:
        try:
            if backend == "te":
                import transformer_engine.pytorch  # noqa: F401
            else:
                import torchao.float8  # noqa: F401
                import torchao.prototype.moe_training  # noqa: F401
        except Exception as e:  # noqa: BLE001 - ImportError, or a CUDA/ABI mismatch raised while loading
            import_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return Fp8Support(capability, import_error)


def fp8_config_error(cfg: RunConfig) -> Optional[str]:
    """One line naming the ``fp8.*`` (or model width) key that cannot work with train.precision=fp8, or None."""
    f8 = cfg.fp8
    if f8.recipe not in RECIPES[f8.backend]:
        other = "te" if f8.backend == "torchao" else "torchao"
        return f"fp8.recipe={f8.recipe} is not a recipe of fp8.backend={f8.backend}: use one of " \
               f"{' | '.join(RECIPES[f8.backend])} (or fp8.backend={other})"
    if f8.backend == "te" and cfg.parallel.sequence_parallel:
        return "fp8.backend=te does not support parallel.sequence_parallel yet (its linears would drop moetron's " \
               "token-shard layout): use fp8.backend=torchao or parallel.sequence_parallel=false"
    if f8.backend == "torchao":
        defaults = FP8Config()
        for key in _TE_ONLY_KEYS:
            if getattr(f8, key) != getattr(defaults, key):
                return f"fp8.{key} is a Transformer Engine setting (fp8.backend=te); torchao recipes fix their " \
                       f"formats and scale dynamically: remove fp8.{key} or set fp8.backend=te"
    for key, width in (("model.hidden_size", cfg.model.hidden_size),
                       ("moe.expert_ffn_hidden_size", cfg.moe.expert_ffn_hidden_size),
                       ("moe.shared_expert_ffn_hidden_size", cfg.moe.shared_expert_ffn_hidden_size)):
        if width % _ALIGN:
            return f"train.precision=fp8 needs {key} to be a multiple of {_ALIGN} (FP8 GEMM widths), got {width}: " \
                   "change it or use train.precision=bf16"
    return None


def fp8_unavailable_reason(fp8_cfg: FP8Config, support: Fp8Support) -> Optional[str]:
    """One line saying why ``fp8_cfg`` cannot run on a machine with ``support``, or None if it can."""
    if support.capability is None:
        return "train.precision=fp8 needs a CUDA GPU with FP8 tensor cores and none is visible: " \
               "use train.precision=bf16"
    cap = ".".join(map(str, support.capability))
    if support.capability < FP8_MIN_CAPABILITY:
        return f"train.precision=fp8 needs compute capability >= 8.9 (Ada/Hopper), this GPU has {cap}: " \
               "use train.precision=bf16"
    if fp8_cfg.backend == "te" and support.import_error is not None:
        return f"train.precision=fp8 with fp8.backend=te needs Transformer Engine ({support.import_error}): " \
               f"{_INSTALL_TE}, or set fp8.backend=torchao, or use train.precision=bf16"
    if fp8_cfg.backend == "torchao" and support.import_error is not None:
        return f"train.precision=fp8 with fp8.backend=torchao needs torchao ({support.import_error}): " \
               f"{_INSTALL_TORCHAO}, or use train.precision=bf16"
    if fp8_cfg.recipe == "mxfp8" and support.capability < MXFP8_MIN_CAPABILITY:
        return f"fp8.recipe=mxfp8 needs a Blackwell GPU (compute capability >= 10.0), this GPU has {cap}: " \
               "use fp8.recipe=delayed or current"
    return None


def fp8_unavailable_here(cfg: RunConfig) -> Optional[str]:
    """One line saying why ``train.precision=fp8`` cannot run with ``cfg`` (a bad fp8 setting first, then this
    machine), or None if it can. ``launcher.config.validate`` turns it into a config error."""
    return fp8_config_error(cfg) or fp8_unavailable_reason(cfg.fp8, probe_fp8_support(cfg.fp8.backend))


def fp8_layer_enabled(cfg: RunConfig, layer_idx: Optional[int] = None) -> bool:
    """Whether transformer layer ``layer_idx`` runs in FP8 (None: whether any layer does). With
    ``fp8.keep_first_last_bf16`` the first and last layers, and the MTP blocks after them (``layer_idx >=
    num_layers``), stay bf16."""
    if cfg.train.precision != "fp8":
        return False
    if layer_idx is None or not cfg.fp8.keep_first_last_bf16:
        return True
    return 0 < layer_idx < cfg.model.num_layers - 1


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
    """Context for a forward pass: TE's FP8 autocast with the configured recipe; a no-op when FP8 is off (or
    ``layer_idx`` is kept in bf16) and for the torchao backend, whose converted modules always compute in FP8 with
    dynamic scales. With TE prefer one context around the whole model forward: TE then reduces the amaxes of all
    layers in one collective over ``amax_group`` (pass the DP x TP group so every replica scales alike)."""
    if not fp8_layer_enabled(cfg, layer_idx) or cfg.fp8.backend == "torchao":
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te

    recipe = build_te_recipe(cfg.fp8)
    if hasattr(te, "autocast"):  # TE >= 2.8 renamed fp8_autocast
        return te.autocast(enabled=True, recipe=recipe, amax_reduction_group=amax_group)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=amax_group)


# ---------------------------------------------------------------- conversion

def convert_to_fp8(layer: nn.Module, cfg: RunConfig, layer_idx: int) -> nn.Module:
    """Swap the projections of transformer layer ``layer_idx`` to FP8 modules in place and return it; a no-op
    when FP8 is off for this layer. Converted: nn.Linear, megatron-core Column/RowParallelLinear and
    SwiGLU experts (modules with w_gate_EFD/w_up_EFD/w_down_EDF). Subtrees whose name contains "router"
    stay high precision, and so does the shared-expert gate (a [1, D] projection: no FP8 GEMM width). The torchao
    backend keeps every Parameter object under its name (optimizer, sharding specs and checkpoints unchanged); TE
    modules own theirs (parallel/fp8/te.py)."""
    if not fp8_layer_enabled(cfg, layer_idx):
        return layer
    if cfg.fp8.backend == "torchao":
        from parallel.fp8 import torchao_backend as backend
    else:
        from parallel.fp8 import te as backend
    _swap_children(layer, "", cfg.fp8, backend)
    return layer


def _swap_children(module: nn.Module, prefix: str, fp8_cfg, backend) -> None:
    for name, child in list(module.named_children()):
        qualified = f"{prefix}{name}"
        if "router" in qualified.lower() or name == "shared_expert_gate":
            continue
        replacement = backend.convert_module(child, fp8_cfg)
        if replacement is None:
            _swap_children(child, qualified + ".", fp8_cfg, backend)
        elif replacement is not child:
            setattr(module, name, replacement)


# ---------------------------------------------------------------- metrics

_FWD_KINDS, _BWD_KINDS = ("input", "weight"), ("grad_output",)


def fp8_stats(model: nn.Module) -> dict[str, float]:
    """TE backend, per FP8 module: ``train_fp8/<module>/<tensor>_amax`` (max over the history window and over the
    module's GEMMs) and ``train_fp8/<module>/<tensor>_scale`` (smallest scale, the most range-limited GEMM), tensor
    in input/weight/grad_output, read from TE's delayed-scaling ``fp8_meta``. The torchao backend scales every
    tensor from its own amax when it is cast and keeps no scaling state, so it has nothing to report ({})."""
    stats: dict[str, float] = {}
    for name, num_gemms, fwd, bwd in _te_scaling_tables(model):
        for kinds, (history, scale) in ((_FWD_KINDS, fwd), (_BWD_KINDS, bwd)):
            for i, kind in enumerate(kinds):
                slots = slice(i * num_gemms, (i + 1) * num_gemms)
                stats[f"train_fp8/{name}/{kind}_amax"] = float(history[:, slots].max())
                stats[f"train_fp8/{name}/{kind}_scale"] = float(scale[slots].min())
    return stats


def _te_scaling_tables(model: nn.Module):
    """(tag, G, (fwd amax_history, fwd scale), (bwd amax_history, bwd scale)) per TE module with delayed scaling:
    forward ``amax_history [L, 3G]`` = inputs|weights|outputs, backward ``[L, 2G]`` = grad_outputs|grad_inputs."""
    for name, m in model.named_modules():
        meta = getattr(m, "fp8_meta", None)
        if isinstance(meta, dict) and "scaling_fwd" in meta and "scaling_bwd" in meta:
            fwd, bwd = meta["scaling_fwd"], meta["scaling_bwd"]
            yield name, getattr(m, "num_gemms", 1), (fwd.amax_history, fwd.scale), (bwd.amax_history, bwd.scale)
