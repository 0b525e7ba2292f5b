"""Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434; DeepSeek-V3, arXiv 2412.19437 section 2.1), the math
of Hugging Face ``DeepseekV3Attention`` with its parameter names (so checkpoints map 1:1).

Per token x [D], with H heads, nope = qk_nope_head_dim, rope = qk_rope_head_dim, v = v_head_dim:

    q      = q_proj(x)                                      (q_lora_rank null)
           = q_b_proj(q_a_layernorm(q_a_proj(x)))           [H * (nope + rope)]
    c, kr  = split(kv_a_proj_with_mqa(x), [kv_lora_rank, rope])   latent and the RoPE key shared by all heads
    k_nope, value = split per head of kv_b_proj(kv_a_layernorm(c))  [H * (nope + v)]
    q_h = [q_nope_h, RoPE(q_rope_h)],  k_h = [k_nope_h, RoPE(kr)]
    out = o_proj(concat_h softmax(q_h k_h^T * scale + causal mask) value_h)
    scale = (nope + rope)^-0.5, times yarn_mscale(factor, mscale_all_dim)^2 with YaRN (moe_core/rope.py)

RoPE acts on adjacent channel pairs when ``model.rope_interleave`` (DeepSeek's layout), else on halves. The latent
norms use eps 1e-6 whatever ``model.norm_eps`` is, as Hugging Face DeepseekV3 and DeepSeek's code do.

Tensor parallelism (the factory): q_proj / q_b_proj and kv_b_proj are column-parallel (heads split), o_proj
row-parallel; the down-projections q_a_proj, kv_a_proj_with_mqa and the latent norms are replicated
(:class:`ReplicatedLinear`). Their gradients are whole on every TP rank without any marking: the column layers
sum their input gradient over TP, and the shared RoPE key -- used by this rank's heads only -- goes through
``factory.tp_copy()``, which sums its gradient over TP.

Sequence parallelism (megatron-core's placement): the down-projections run on this rank's token shard, and
``factory.sequence_gather()`` gathers their outputs (the q latent, and the kv latent with the RoPE key: narrower
than the hidden state) or, without a q latent, the input of ``q_proj``. The gathers' backward sums the gradients
over TP (the column layers and ``tp_copy`` then sum nothing), so the replicated weights see only their shard's
tokens: parallel/sharding.py marks them TP-summed.

Shapes: B batch, S sequence, D hidden, Hl local heads (H / tp), R rope width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.model_config import ModelConfig
from moe_core.layers import LayerFactory, ReplicatedLinear, RMSNorm
from moe_core.recompute import Recompute, checkpointed, maybe_checkpointed
from moe_core.rope import apply_rope, apply_rope_interleaved, softmax_mscale

LATENT_NORM_EPS = 1e-6
"""eps of q_a_layernorm and kv_a_layernorm (Hugging Face DeepseekV3 builds them with the RMSNorm default)."""


class MLAttention(nn.Module):
    """``forward(x_BSD, cos_SR, sin_SR) -> [B, S, D]`` (fp32 or bf16, as the input; token shards under sequence
    parallelism); cos/sin are the RoPE tables
    of width ``qk_rope_head_dim`` (moe_core/rope.py)."""

    def __init__(self, m: ModelConfig, factory: LayerFactory):
        super().__init__()
        heads, d = m.num_attention_heads, m.hidden_size
        self.local_heads = heads // factory.tp_size
        self.nope, self.rope, self.v_dim, self.kv_rank = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim,
                                                          m.kv_lora_rank)
        qk = self.nope + self.rope
        self.q_lora = m.q_lora_rank is not None
        if not self.q_lora:
            self.q_proj = factory.column(d, heads * qk)
        else:
            self.q_a_proj = ReplicatedLinear(d, m.q_lora_rank)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = factory.column(m.q_lora_rank, heads * qk)
        self.kv_a_proj_with_mqa = ReplicatedLinear(d, self.kv_rank + self.rope)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, LATENT_NORM_EPS)
        self.kv_b_proj = factory.column(self.kv_rank, heads * (self.nope + self.v_dim))
        self.o_proj = factory.row(heads * self.v_dim, d)
        self.k_rope_tp_copy = factory.tp_copy()
        self.sequence_gather = factory.sequence_gather()
        self.apply_rope = apply_rope_interleaved if m.rope_interleave else apply_rope
        self.scale = qk ** -0.5 * softmax_mscale(m.rope_scaling)
        self.recompute = Recompute()
        """Which parts recompute in backward (``mla_up_proj``, ``core_attn``; moe_core/recompute.py)."""

    def _up_project(self, q_in: torch.Tensor, latent_BSC: torch.Tensor, k_rope_BSR: torch.Tensor,
                    cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The up-projections and RoPE (``mla_up_proj``): q, k ``[B, Hl, S, nope + rope]`` and the values
        ``[B, Hl, S, v]`` from the q input (``q_a_proj``'s output with q_lora, else x; the whole sequence), the kv
        latent and the RoPE key."""
        B, S, _ = latent_BSC.shape
        Hl = self.local_heads
        q = self.q_b_proj(self.q_a_layernorm(q_in)) if self.q_lora else self.q_proj(q_in)
        q_nope, q_rope = q.view(B, S, Hl, self.nope + self.rope).transpose(1, 2).split([self.nope, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent_BSC)).view(B, S, Hl, self.nope + self.v_dim).transpose(1, 2)
        k_nope, value = kv.split([self.nope, self.v_dim], dim=-1)
        k_rope = self.apply_rope(self.k_rope_tp_copy(k_rope_BSR).unsqueeze(1), cos_SR, sin_SR)  # [B, 1, S, R]
        q = torch.cat([q_nope, self.apply_rope(q_rope, cos_SR, sin_SR)], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, Hl, S, self.rope)], dim=-1)
        return q, k, value

    def _core(self, q: torch.Tensor, k: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Causal attention (``core_attn``): ``[B, Hl, S, v]``."""
        return F.scaled_dot_product_attention(q, k, value, is_causal=True, scale=self.scale)

    def _up_and_core(self, *args: torch.Tensor) -> torch.Tensor:
        return self._core(*self._up_project(*args))

    def forward(self, x: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
        """``x`` [B, S, D] (or the token shard under sequence parallelism) -> like ``x``."""
        S = cos_SR.shape[0]
        q_in = self.sequence_gather(self.q_a_proj(x) if self.q_lora else x)
        kv_a = self.sequence_gather(self.kv_a_proj_with_mqa(x))
        latent_BSC, k_rope_BSR = kv_a.view(-1, S, kv_a.shape[-1]).split([self.kv_rank, self.rope], dim=-1)
        up, core = self.recompute.covers("mla_up_proj"), self.recompute.covers("core_attn")
        args = (q_in, latent_BSC, k_rope_BSR, cos_SR, sin_SR)
        if up and core:  # one region: neither the up-projections' outputs nor the attention's are kept
            out_BHSv = checkpointed(self._up_and_core, *args)
        else:
            out_BHSv = maybe_checkpointed(core, self._core, *maybe_checkpointed(up, self._up_project, *args))
        B = latent_BSC.shape[0]
        return self.o_proj(out_BHSv.transpose(1, 2).reshape(B, S, self.local_heads * self.v_dim))
