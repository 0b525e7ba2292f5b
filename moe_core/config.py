"""Configuration of the single-device model math: transformer shape, MoE routing, MoNE and Matryoshka MoE.

Plain dataclasses, owned by the package that implements them; ``launcher/config.py`` composes them into the run
config tree (YAML sections ``model`` and ``moe``), parses recipes and overrides and runs the cross-field checks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union


@dataclass
class ModelConfig:
    """Decoder-only transformer; the block matches Hugging Face Qwen3-MoE (RMSNorm, GQA with q/k RMSNorm, RoPE,
    SwiGLU experts, softmax top-k router, no biases, untied embeddings)."""

    vocab_size: int = 512
    """Vocabulary size. Must equal the tokenizer's when data comes from shards (checked at data load)."""
    hidden_size: int = 128
    num_layers: int = 4
    num_attention_heads: int = 4
    num_query_groups: int = 2
    """Key/value heads (GQA). Must divide num_attention_heads."""
    head_dim: Optional[int] = None
    """Per-head width; None means hidden_size // num_attention_heads."""
    seq_length: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dense_layers: list[int] = field(default_factory=list)
    """Indices of layers with a dense SwiGLU FFN instead of MoE (e.g. [0] keeps the first layer dense)."""
    dense_ffn_hidden_size: int = 512
    """FFN width of the dense layers listed in dense_layers."""


@dataclass
class MoNEConfig:
    """Mixture of Neuron Experts (arXiv 2510.05781): inside each routed expert keep only the top-k neurons."""

    enabled: bool = False
    keep_ratio: float = 0.5
    """Fraction of expert neurons kept per token: k_n = round(keep_ratio * expert_ffn_hidden_size)."""
    score: Literal["post_act", "pre_act"] = "post_act"
    """Rank neurons by |silu(W_gate x)| (post_act, default) or |W_gate x| (pre_act)."""
    balance_loss_coeff: float = 0.0
    """Optional neuron-level load-balance loss coefficient (0 disables)."""
    backend: Literal["auto", "torch", "triton"] = "auto"
    """Neuron-selection implementation: auto = Triton kernels on CUDA, torch elsewhere."""


@dataclass
class MatryoshkaConfig:
    """Matryoshka MoE (arXiv 2509.26520): k is drawn per layer per step, so one model serves any k."""

    enabled: bool = False
    k_min: int = 1
    k_max: int = 4
    distribution: Literal["uniform", "capacity"] = "uniform"
    """uniform over [k_min, k_max], or capacity-aware P(k) proportional to exp(log(k) / tau)."""
    tau: float = 1.0
    eval_k: Optional[Union[int, list[int]]] = None
    """k used at evaluation/inference: one int for all layers or one per MoE layer; None means moe.top_k."""


@dataclass
class MoEConfig:
    """Top-k router MoE layer (softmax router, SwiGLU experts), with MoNE and Matryoshka MoE inside it."""

    num_experts: int = 8
    top_k: int = 2
    expert_ffn_hidden_size: int = 256
    aux_loss_coeff: float = 1e-2
    """Switch-style load-balancing loss coefficient."""
    z_loss_coeff: float = 1e-3
    """Router z-loss coefficient."""
    expert_bias: bool = False
    """Aux-loss-free balancing: a per-expert bias added to routing scores for selection only."""
    expert_bias_update_rate: float = 1e-3
    capacity_factor: Optional[float] = None
    """None = dropless (default). A number caps tokens per expert at capacity_factor * T * k / E; extra tokens drop."""
    mone: MoNEConfig = field(default_factory=MoNEConfig)
    matryoshka: MatryoshkaConfig = field(default_factory=MatryoshkaConfig)
