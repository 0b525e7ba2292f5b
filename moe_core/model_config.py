"""Configuration of the transformer's shape (YAML section ``model``): widths, attention (GQA or MLA), RoPE.

A plain dataclass owned by the package that implements it; ``launcher/config.py`` composes it into the run config
tree. ``ModelConfig.validate`` checks the section's cross-field rules (ValueError naming the key) and the section
defines the values derived from it (``head_width``, ``moe_layer_indices``): every user reads them from here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional

from moe_core.config_fields import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range


@dataclass
class RopeScalingConfig:
    """RoPE context extension (Hugging Face's ``rope_scaling``). ``yarn`` is YaRN (arXiv 2309.00071) as Hugging Face
    ``_compute_yarn_parameters`` computes it (DeepSeek-V3 ships factor 40, original_max_position_embeddings 4096,
    beta_fast 32, beta_slow 1, mscale 1, mscale_all_dim 1). The math is in moe_core/rope.py."""

    type: Literal["default", "yarn"] = "default"
    """default = plain RoPE (the other fields are unused); yarn = YaRN frequency correction and attention scale."""
    factor: Annotated[float, Range(ge=1)] = 1.0
    """Context extension ratio s: the low frequencies are divided by it."""
    original_max_position_embeddings: PositiveInt = 4096
    """Context length the model was pretrained with before extension."""
    beta_fast: PositiveFloat = 32.0
    """Rotations over the original context above which a frequency is kept as is (>= beta_slow)."""
    beta_slow: PositiveFloat = 1.0
    """Rotations over the original context below which a frequency is fully divided by factor."""
    mscale: Optional[PositiveFloat] = None
    """With mscale_all_dim: cos/sin are scaled by yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    (yarn_mscale(s, m) = 0.1 m ln s + 1). null = not set: cos/sin are scaled by yarn_mscale(factor, 1)."""
    mscale_all_dim: Optional[PositiveFloat] = None
    """With mscale, the denominator of the cos/sin scale above (any attention); with MLA also the softmax scale is
    multiplied by yarn_mscale(factor, mscale_all_dim)^2 (DeepSeek-V3: 1.0). null = not set."""
    attention_factor: Optional[PositiveFloat] = None
    """Explicit cos/sin scale, overriding the mscale rule above. null = automatic (from mscale; resolved to its
    value in the run's config under yarn, unused otherwise)."""
    truncate: bool = True
    """Round the correction range outward to whole dimensions (Hugging Face's default)."""

    @property
    def cos_sin_scale(self) -> float:
        """The factor on the cos/sin tables: 1.0 without YaRN, else attention_factor, or when null the mscale rule
        (Hugging Face's ``_compute_yarn_parameters``)."""
        if self.type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature correction ``0.1 * mscale * ln(factor) + 1`` (1.0 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_interleave")
"""The ``model`` fields only Multi-head Latent Attention reads."""
GQA_FIELDS = ("qk_norm", "qkv_bias", "partial_rotary_factor")
"""The ``model`` fields only grouped-query attention reads (besides head_dim, resolved automatically)."""


@dataclass
class ModelConfig:
    """Decoder-only transformer; by default the block matches Hugging Face Qwen3-MoE (RMSNorm, GQA with per-head
    q/k RMSNorm, RoPE, SwiGLU experts, softmax top-k router, no biases, untied embeddings). ``qk_norm``,
    ``qkv_bias`` and ``partial_rotary_factor`` express the GQA of Qwen2-MoE, Mixtral, OLMoE, GLM-4.5, Llama and
    Qwen3; ``attention: mla`` uses DeepSeek-V3's Multi-head Latent Attention (Hugging Face DeepseekV3Attention);
    ``dense_layers`` listing every layer makes a dense model (no MoE layer)."""

    vocab_size: PositiveInt = 512
    """Vocabulary size. Must be at least the tokenizer's when data comes from shards (checked at data load)."""
    hidden_size: PositiveInt = 128
    """Model width D."""
    num_layers: PositiveInt = 4
    """Transformer blocks."""
    num_attention_heads: PositiveInt = 4
    """Query heads H."""
    num_query_groups: PositiveInt = 2
    """Key/value heads (GQA). Must divide num_attention_heads."""
    head_dim: Optional[PositiveInt] = None
    """GQA per-head width (even: RoPE rotates pairs of channels); null = automatic: hidden_size //
    num_attention_heads (then hidden_size must be divisible by num_attention_heads). Unused (stays null) with
    attention=mla."""
    seq_length: PositiveInt = 128
    """Tokens per sample S."""
    rope_theta: PositiveFloat = 10000.0
    """RoPE base frequency."""
    norm_eps: PositiveFloat = 1e-6
    """RMSNorm epsilon."""
    init_std: PositiveFloat = 0.02
    """Standard deviation of the normal weight init."""
    dense_layers: list[NonNegativeInt] = field(default_factory=list)
    """Indices (< num_layers) of layers with a dense SwiGLU FFN instead of MoE (e.g. [0] keeps the first layer
    dense)."""
    dense_ffn_hidden_size: PositiveInt = 512
    """FFN width of the dense layers listed in dense_layers."""
    attention: Literal["gqa", "mla"] = "gqa"
    """gqa = grouped-query attention with q/k RMSNorm (Qwen3-MoE; reads num_query_groups, head_dim). mla =
    Multi-head Latent Attention (DeepSeek-V2/V3, arXiv 2405.04434; reads q_lora_rank .. rope_interleave below;
    moe_core/mla.py)."""
    q_lora_rank: Optional[PositiveInt] = None
    """MLA: width of the compressed query latent (DeepSeek-V3: 1536). null = no query compression: one q_proj."""
    kv_lora_rank: PositiveInt = 512
    """MLA: width of the compressed key/value latent (DeepSeek-V3: 512)."""
    qk_nope_head_dim: PositiveInt = 128
    """MLA: per-head query/key channels without RoPE (DeepSeek-V3: 128)."""
    qk_rope_head_dim: PositiveInt = 64
    """MLA: per-head query channels with RoPE, and the width of the RoPE key shared by all heads (even;
    DeepSeek-V3: 64)."""
    v_head_dim: PositiveInt = 128
    """MLA: per-head value width (DeepSeek-V3: 128)."""
    rope_interleave: bool = True
    """MLA: RoPE rotates adjacent channel pairs (x0, x1), (x2, x3), ... (DeepSeek's layout, Hugging Face
    DeepseekV3's default) when true; the two halves (rotate-half, as GQA always does) when false."""
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    """RoPE context extension (either attention; the softmax mscale applies to MLA only, as Hugging Face does)."""
    mtp_num_layers: NonNegativeInt = 0
    """Multi-token prediction depth K (DeepSeek-V3, arXiv 2412.19437 section 2.2; moe_core/mtp.py): K sequential
    modules after the last layer, module k predicting the token k + 1 positions ahead; each holds one MoE block
    (layer index num_layers + k - 1) and shares the embedding and output head. 0 = off. Must be < seq_length."""
    mtp_loss_coeff: NonNegativeFloat = 0.1
    """lambda: the training objective adds lambda times the mean over the K depths of each depth's token-weighted
    cross-entropy (DeepSeek-V3: 0.3 for the first 10T tokens, then 0.1). >= 0; unused when mtp_num_layers = 0."""
    qk_norm: Literal["head", "projection", "none"] = "head"
    """GQA: RMSNorm of queries and keys before RoPE. head = over each head's head_dim channels with one [head_dim]
    weight shared by the heads (Qwen3, Qwen3-MoE, GLM-4.5 with use_qk_norm); projection = over the whole q
    projection (num_attention_heads * head_dim channels) and k projection (num_query_groups * head_dim), weights of
    those widths (OLMoE; with tensor parallelism the sum of squares is added up over the TP ranks and the weights
    are split like the projections); none = no q/k norm (Mixtral, Qwen2-MoE, Llama, GLM-4.5 without
    use_qk_norm). Unused (stays head) with attention=mla."""
    qkv_bias: bool = False
    """GQA: a bias on the q, k and v projections, not on o_proj (Qwen2-MoE's qkv_bias, GLM-4.5's attention_bias);
    starts at 0 and is split over TP like its projection. Unused (stays false) with attention=mla."""
    partial_rotary_factor: Annotated[float, Range(gt=0, le=1)] = 1.0
    """GQA: RoPE rotates the first rotary_dim = int(head_dim * partial_rotary_factor) channels of each query/key
    head (rotate-half within them) and passes the others through unchanged (GLM-4.5: 0.5; Hugging Face's
    layout). rotary_dim must be even and >= 2. 1.0 = every channel. Unused (stays 1.0) with attention=mla."""

    def validate_attention(self) -> None:
        """Raise ValueError naming the ``model.*`` key when the attention / RoPE fields do not fit together."""
        defaults = ModelConfig()
        other = "gqa" if self.attention == "mla" else "mla"
        for name in MLA_FIELDS if self.attention == "gqa" else GQA_FIELDS:
            if getattr(self, name) != getattr(defaults, name):
                raise ValueError(f"model.{name} is used by model.attention={other} only: set "
                                 f"model.attention={other} or leave model.{name} unset")
        if self.attention == "mla" and self.qk_rope_head_dim % 2:
            raise ValueError(f"model.qk_rope_head_dim ({self.qk_rope_head_dim}) must be even: RoPE rotates pairs "
                             "of channels")
        elif self.attention == "mla" and self.head_dim is not None:
            raise ValueError("model.head_dim is used by model.attention=gqa only (MLA's head widths are "
                             "model.qk_nope_head_dim, model.qk_rope_head_dim and model.v_head_dim): leave it unset")
        rs = self.rope_scaling
        if rs.type == "default" and rs != RopeScalingConfig():
            raise ValueError("model.rope_scaling: fields other than type are used with model.rope_scaling.type=yarn "
                             "only: set model.rope_scaling.type=yarn or leave them unset")
        if rs.beta_fast < rs.beta_slow:
            raise ValueError(f"model.rope_scaling.beta_fast ({rs.beta_fast}) must be >= model.rope_scaling.beta_slow "
                             f"({rs.beta_slow})")

    @property
    def head_width(self) -> int:
        """The per-head width: ``head_dim``, or ``hidden_size // num_attention_heads`` when it is null."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Channels of each query/key head that RoPE rotates: ``int(head_width * partial_rotary_factor)`` (GQA,
        Hugging Face's rounding) or ``qk_rope_head_dim`` (MLA)."""
        if self.attention == "mla":
            return self.qk_rope_head_dim
        return int(self.head_width * self.partial_rotary_factor)

    @property
    def moe_layer_indices(self) -> list[int]:
        """Indices of the main model's MoE layers (every layer not in ``dense_layers``), ascending."""
        dense = set(self.dense_layers)
        return [i for i in range(self.num_layers) if i not in dense]

    @property
    def mtp_layer_indices(self) -> list[int]:
        """Layer indices of the MTP modules' MoE blocks: ``num_layers .. num_layers + mtp_num_layers - 1``."""
        return list(range(self.num_layers, self.num_layers + self.mtp_num_layers))

    @property
    def trained_moe_layer_indices(self) -> list[int]:
        """Every MoE layer a training step runs: the main model's, then the MTP modules' (evaluation runs the
        main model's only)."""
        return self.moe_layer_indices + self.mtp_layer_indices

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block ``layer_idx`` (in [0, num_layers + mtp_num_layers)) is in :attr:`trained_moe_layer_indices`
        (MTP blocks are MoE blocks), without building that list: a per-block check over it would make a deep
        model's build quadratic in its depth."""
        return layer_idx not in self.dense_layers

    def validate(self) -> None:
        """Raise ValueError naming the ``model.*`` key when the section's fields do not fit together."""
        self.validate_attention()
        if self.attention == "gqa" and self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"model.num_query_groups ({self.num_query_groups}) must divide model.num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.attention == "gqa" and self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_attention_heads "
                             f"({self.num_attention_heads}), or set model.head_dim")
        if self.attention == "gqa" and (self.rotary_dim % 2 or self.rotary_dim < 2):
            raise ValueError(f"the head width ({self.head_width}: model.head_dim, or model.hidden_size / "
                             f"model.num_attention_heads) times model.partial_rotary_factor "
                             f"({self.partial_rotary_factor}) gives {self.rotary_dim} rotary channels: they must be "
                             "even and >= 2 (RoPE rotates pairs of channels)")
        for i in self.dense_layers:
            if i >= self.num_layers:
                raise ValueError(f"model.dense_layers: layer {i} is outside [0, {self.num_layers})")
        if self.mtp_num_layers >= self.seq_length:
            raise ValueError(f"model.mtp_num_layers ({self.mtp_num_layers}) must be < model.seq_length "
                             f"({self.seq_length}): depth k predicts the token k + 1 positions ahead, inside the "
                             "sample")
