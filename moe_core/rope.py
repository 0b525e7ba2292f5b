"""Rotary position embedding: cos/sin tables (plain or YaRN-extended) and the two channel layouts.

Tables are ``[S, Hd]`` fp32 with the rotate-half layout ``cat(freqs, freqs)`` (Hugging Face's), times the YaRN
attention factor when ``model.rope_scaling.type`` is yarn (1 otherwise).

YaRN (arXiv 2309.00071), as Hugging Face ``_compute_yarn_parameters`` computes it, for rotary width ``d``, base
``theta``, extension factor ``s`` and original context ``L``:
  * frequency i (of d/2) is ``theta^(-2i/d)`` (extrapolation) or that divided by ``s`` (interpolation), blended by
    a linear ramp over dimension indices [low, high], where ``low``/``high`` are the dimensions that turn
    ``beta_fast``/``beta_slow`` times over L: ``dim(r) = d ln(L / (2 pi r)) / (2 ln theta)`` (floored/ceiled when
    ``truncate``, then clipped to [0, d - 1]); below ``low`` a frequency is kept, above ``high`` fully divided by s;
  * cos/sin are scaled by ``attention_factor``, or when it is null by ``yarn_mscale(s, mscale) /
    yarn_mscale(s, mscale_all_dim)`` if both are set, else by ``yarn_mscale(s)``, with
    ``yarn_mscale(s, m) = 0.1 m ln s + 1`` (1 for s <= 1);
  * MLA multiplies its softmax scale by ``yarn_mscale(s, mscale_all_dim)^2`` when mscale_all_dim is set
    (:func:`softmax_mscale`).
"""
from __future__ import annotations

import math

import torch

from moe_core.model_config import RopeScalingConfig, yarn_mscale


def softmax_mscale(scaling: RopeScalingConfig) -> float:
    """Factor on MLA's softmax scale: ``yarn_mscale(factor, mscale_all_dim)^2`` with YaRN and mscale_all_dim set,
    else 1.0 (Hugging Face DeepseekV3Attention)."""
    if scaling.type != "yarn" or not scaling.mscale_all_dim:
        return 1.0
    return yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2


def _yarn_inv_freq(theta_pow: torch.Tensor, dim: int, theta: float, y: RopeScalingConfig) -> torch.Tensor:
    """Blend the plain frequencies ``1 / theta_pow`` (``theta_pow`` = theta^(2i/d), [d/2]) with the interpolated
    ones (module docstring)."""

    def dim_of(rotations: float) -> float:  # the dimension whose wavelength turns `rotations` times over L
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(y.beta_fast), dim_of(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=theta_pow.device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # weight of the plain (extrapolated) frequency
    return 1.0 / (y.factor * theta_pow) * (1 - keep) + 1.0 / theta_pow * keep


def rope_cos_sin(seq_len: int, dim: int, theta: float, scaling: RopeScalingConfig,
                 device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[seq_len, dim]`` fp32 for positions 0..seq_len-1 (rotate-half layout, YaRN when
    ``scaling.type`` is yarn). ``dim`` is the rotary width (even)."""
    theta_pow = theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    inv_freq = _yarn_inv_freq(theta_pow, dim, theta, scaling) if scaling.type == "yarn" else 1.0 / theta_pow
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    scale = scaling.cos_sin_scale
    if scale == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x_BHSd: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: channel i pairs with channel i + r/2 (Qwen3, Llama), r = the tables' width. Partial
    rotary (r < the head width, GLM-4.5): the first r channels are rotated that way and the rest pass through
    unchanged (Hugging Face's layout)."""
    rotary = cos_SD.shape[-1]
    if rotary < x_BHSd.shape[-1]:
        return torch.cat([apply_rope(x_BHSd[..., :rotary], cos_SD, sin_SD), x_BHSd[..., rotary:]], dim=-1)
    half = x_BHSd.shape[-1] // 2
    rotated = torch.cat([-x_BHSd[..., half:], x_BHSd[..., :half]], dim=-1)
    return (x_BHSd * cos_SD.to(x_BHSd.dtype)) + (rotated * sin_SD.to(x_BHSd.dtype))


def apply_rope_interleaved(x_BHSd: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    """RoPE on adjacent pairs (x0, x1), (x2, x3), ... (DeepSeek's layout), returned de-interleaved as
    ``[rotated evens, rotated odds]`` (Hugging Face DeepseekV3's output layout). Queries and keys get the same
    channel permutation, so their dot products are those of the interleaved rotation."""
    return apply_rope(torch.cat([x_BHSd[..., 0::2], x_BHSd[..., 1::2]], dim=-1), cos_SD, sin_SD)
