"""Single-device decoder-only MoE transformer; the block is Hugging Face Qwen3-MoE's, operation for operation.

    x = embed(tokens)
    for each layer:  x = x + Attn(RMSNorm(x));  x = x + FFN(RMSNorm(x))     (FFN = MoE, or dense SwiGLU)
    logits = lm_head(RMSNorm(x))
    with model.mtp_num_layers = K > 0, in training: K multi-token-prediction modules on RMSNorm(x) (moe_core/mtp.py)

Attention (``model.attention``): gqa = GQA, q/k RMSNorm before RoPE (per head by default, over the whole
projection or none: ``model.qk_norm``), rotate-half RoPE (on the first ``model.rotary_dim`` channels of each head:
``model.partial_rotary_factor``), causal SDPA, biases on q/k/v only with ``model.qkv_bias``; mla = DeepSeek-V3's
Multi-head Latent Attention (moe_core/mla.py). The RoPE tables (moe_core/rope.py, YaRN with
``model.rope_scaling``) span ``model.rotary_dim`` (gqa) or ``qk_rope_head_dim`` (mla). A model may have no MoE
layer at all (``model.dense_layers`` = every layer: dense Llama / Qwen3).
Parallelism is not this file's business: the linear/embedding constructors come from a :class:`LayerFactory`
(moe_core/layers.py: plain ``nn.Linear``; ``parallel/model.py`` passes tensor-parallel ones) and the MoE
dispatcher is set on each MoE layer from outside. ``layer_range`` / ``pre_process`` / ``post_process`` build one
pipeline stage; the MTP modules live on the last stage, which then also holds ``embed_tokens`` (the same parameter
name as the first stage's: ``parallel/`` keeps the two copies identical).
``set_recompute`` chooses the activations recomputed in backward (moe_core/recompute.py): ``full`` wraps each
block call (the MTP modules' blocks too) from outside the block, so a compiled block runs compiled inside its region.

Shapes: B batch, S sequence, D hidden, H query heads, G key/value heads, Hd head dim, V vocab.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.config import MoEConfig
from moe_core.model_config import ModelConfig
from moe_core.layer import MoELayer
from moe_core.layers import LayerFactory, ProjectionRMSNorm, RMSNorm, SwiGLUMLP
from moe_core.matryoshka import KSchedule
from moe_core.mla import MLAttention
from moe_core.mtp import MultiTokenPrediction
from moe_core.profiling import phase
from moe_core.recompute import Recompute, maybe_checkpointed
from moe_core.rope import apply_rope, rope_cos_sin


def qk_norms(m: ModelConfig, factory: LayerFactory) -> tuple[nn.Module, nn.Module, bool]:
    """``(q_norm, k_norm, per_head)`` of ``model.qk_norm``: per-head :class:`RMSNorm` s (``per_head`` true: applied
    to [..., heads, Hd]), :class:`ProjectionRMSNorm` s over the whole q / k projections (applied to [..., H*Hd],
    TP-split), or identities (none)."""
    hd = m.head_width
    if m.qk_norm == "head":
        q_norm, k_norm = RMSNorm(hd, m.norm_eps), RMSNorm(hd, m.norm_eps)
        # Applied to every head: with TP each rank sees only its heads, so these weights' gradients are partial
        # sums over heads there (parallel/sharding.py marks them to be summed over TP).
        q_norm.per_head = k_norm.per_head = True
        return q_norm, k_norm, True
    if m.qk_norm == "projection":
        return (ProjectionRMSNorm(m.num_attention_heads * hd, m.norm_eps, factory),
                ProjectionRMSNorm(m.num_query_groups * hd, m.norm_eps, factory), False)
    return nn.Identity(), nn.Identity(), False


class Attention(nn.Module):
    """GQA (``forward(x_BSD, cos, sin) -> [B, S, D]``): q/k/v projections (bias with ``model.qkv_bias``), q/k
    RMSNorm per ``model.qk_norm``, RoPE on the first ``model.rotary_dim`` channels of each head (the tables'
    width), causal SDPA, o_proj. The ``none`` norms are identities without parameters (no ``q_norm`` weights)."""

    def __init__(self, m: ModelConfig, factory: LayerFactory):
        super().__init__()
        self.head_dim = m.head_width
        self.local_heads = m.num_attention_heads // factory.tp_size
        self.local_kv_heads = m.num_query_groups // factory.tp_size
        self.q_proj = factory.column(m.hidden_size, m.num_attention_heads * self.head_dim, bias=m.qkv_bias)
        self.k_proj = factory.column(m.hidden_size, m.num_query_groups * self.head_dim, bias=m.qkv_bias)
        self.v_proj = factory.column(m.hidden_size, m.num_query_groups * self.head_dim, bias=m.qkv_bias)
        self.o_proj = factory.row(m.num_attention_heads * self.head_dim, m.hidden_size)
        self.q_norm, self.k_norm, self.norm_per_head = qk_norms(m, factory)
        self.sequence_gather = factory.sequence_gather()
        self.recompute = Recompute()
        """Which parts recompute in backward (``core_attn``; moe_core/recompute.py)."""

    def _heads(self, x_BSW: torch.Tensor, norm: nn.Module, heads: int) -> torch.Tensor:
        """[B, S, heads * Hd] projection output -> normed [B, heads, S, Hd]."""
        B, S, _ = x_BSW.shape
        if self.norm_per_head:
            return norm(x_BSW.view(B, S, heads, self.head_dim)).transpose(1, 2)
        return norm(x_BSW).view(B, S, heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` [B, S, D] (or the token shard under sequence parallelism), cos/sin [S, Hd] -> like ``x``."""
        x_BSD = self.sequence_gather(x).view(-1, cos.shape[0], x.shape[-1])
        B, S, _ = x_BSD.shape
        q = self._heads(self.q_proj(x_BSD), self.q_norm, self.local_heads)
        k = self._heads(self.k_proj(x_BSD), self.k_norm, self.local_kv_heads)
        v = self.v_proj(x_BSD).view(B, S, self.local_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out_BHSd = maybe_checkpointed(self.recompute.covers("core_attn"), self._core, q, k, v)
        return self.o_proj(out_BHSd.transpose(1, 2).reshape(B, S, self.local_heads * self.head_dim))

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention (``core_attn``): ``[B, H, S, Hd]``."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              enable_gqa=self.local_heads != self.local_kv_heads)


class Block(nn.Module):
    def __init__(self, m: ModelConfig, moe: MoEConfig, layer_idx: int, factory: LayerFactory,
                 k_schedule: KSchedule):
        super().__init__()
        self.input_layernorm = RMSNorm(m.hidden_size, m.norm_eps)
        self.self_attn: nn.Module = MLAttention(m, factory) if m.attention == "mla" else Attention(m, factory)
        self.post_attention_layernorm = RMSNorm(m.hidden_size, m.norm_eps)
        if m.is_moe_layer(layer_idx):  # MTP blocks (index >= num_layers) are MoE blocks
            self.mlp: nn.Module = MoELayer(m.hidden_size, moe, layer_idx, k_schedule, factory=factory)
        else:
            self.mlp = SwiGLUMLP(m.hidden_size, m.dense_ffn_hidden_size, factory)
        self.recompute = Recompute()
        """Which of the block's parts recompute in backward (``norm``, ``moe``, ``mlp``; moe_core/recompute.py)."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        norm = self.recompute.covers("norm")
        with phase("attention"):
            x = x + self.self_attn(maybe_checkpointed(norm, self.input_layernorm, x), cos, sin)
        moe = isinstance(self.mlp, MoELayer)
        h = maybe_checkpointed(norm, self.post_attention_layernorm, x)
        return x + maybe_checkpointed(self.recompute.covers("moe" if moe else "mlp"), self.mlp, h, replaying=moe)


class MoETransformer(nn.Module):
    """The whole model (defaults) or one pipeline stage (``layer_range``, ``pre_process``, ``post_process``).

    ``forward(tokens_BS)`` on a first stage, ``forward(hidden_BSD)`` on later stages; returns logits [B, S, V/tp]
    on the last stage, hidden [B, S, D] otherwise. With MTP (``model.mtp_num_layers`` > 0) the last stage holds
    ``mtp`` (moe_core/mtp.py) and, given ``mtp_tokens_BS`` (the micro-batch's input tokens, int64), returns
    ``(logits, [logits of MTP depth k for k = 1..K])``. Under sequence parallelism (``factory.sequence_parallel``)
    the hidden states are this TP rank's token shard [B*S/tp, D] and sequences are ``model.seq_length`` long.
    Layers live in a ModuleDict keyed by their GLOBAL index, so parameter names are identical in every pipeline
    layout (checkpoint keys never depend on the layout).
    ``seed`` keys the Matryoshka k draws (seed, step, layer), so every rank draws the same k without talking.
    """

    def __init__(self, m: ModelConfig, moe: MoEConfig, seed: int, factory: Optional[LayerFactory] = None,
                 layer_range: Optional[range] = None, pre_process: bool = True, post_process: bool = True):
        super().__init__()
        factory = factory or LayerFactory()
        self.model_cfg = m
        self.pre_process, self.post_process = pre_process, post_process
        self.sequence_parallel = factory.sequence_parallel
        self.rope_dim = m.rotary_dim
        self.k_schedule = KSchedule(moe, seed, m.moe_layer_indices)
        layer_range = layer_range if layer_range is not None else range(m.num_layers)
        if pre_process or (post_process and m.mtp_num_layers):  # MTP embeds the shifted tokens on the last stage
            self.embed_tokens = factory.embedding(m.vocab_size, m.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(m, moe, i, factory, self.k_schedule) for i in layer_range})
        if post_process:
            self.norm = RMSNorm(m.hidden_size, m.norm_eps)
            self.sequence_gather = factory.sequence_gather()
            self.lm_head = factory.column(m.hidden_size, m.vocab_size)
            if m.mtp_num_layers:
                self.mtp = MultiTokenPrediction(m, moe, factory, self.k_schedule, Block)
        self.recompute = Recompute()
        cos, sin = rope_cos_sin(m.seq_length, self.rope_dim, m.rope_theta, m.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset_buffers(self) -> None:
        """Recompute buffers after ``to_empty`` (meta-device build): RoPE tables; every other buffer (router
        expert bias) starts at zero."""
        with torch.no_grad():
            for buf in self.buffers():
                buf.zero_()
            m = self.model_cfg
            cos, sin = rope_cos_sin(m.seq_length, self.rope_dim, m.rope_theta, m.rope_scaling,
                                    device=self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def blocks(self) -> dict[int, Block]:
        """This stage's transformer blocks by layer index, the MTP modules' (``num_layers + k - 1``) last."""
        blocks = {int(i): blk for i, blk in self.layers.items()}
        first_mtp = self.model_cfg.num_layers
        blocks.update({first_mtp + k: module.block for k, module in enumerate(getattr(self, "mtp", ()))})
        return blocks

    def set_recompute(self, recompute: Recompute) -> None:
        """Which activations are recomputed in backward (``train.recompute``; moe_core/recompute.py): ``full``
        makes each block one region; ``selective`` tells each part whether it is one."""
        self.recompute = recompute
        for block in self.blocks().values():
            block.recompute = block.self_attn.recompute = recompute
            if isinstance(block.mlp, MoELayer):
                block.mlp.recompute = recompute
                block.mlp.experts.recompute_act = recompute.covers("moe_act")

    def moe_layers(self) -> dict[int, MoELayer]:
        """This stage's MoE layers by layer index, the MTP modules' blocks included."""
        return {i: blk.mlp for i, blk in self.blocks().items() if isinstance(blk.mlp, MoELayer)}

    def set_step(self, step: int) -> None:
        """Tell every MoE layer the training step (M-MoE draws k per (seed, step, layer))."""
        for layer in self.moe_layers().values():
            layer.set_step(step)

    def set_eval_k(self, k) -> None:
        """Elastic inference: one k for every MoE layer, a list with one k per MoE layer, or None (config)."""
        self.k_schedule.set_eval_k(k)

    def forward(self, x: torch.Tensor, mtp_tokens_BS: Optional[torch.Tensor] = None):
        S = x.shape[1] if self.pre_process or not self.sequence_parallel else self.rope_cos.shape[0]
        if S > self.rope_cos.shape[0]:
            raise ValueError(f"sequence length {S} exceeds model.seq_length={self.rope_cos.shape[0]}")
        if self.sequence_parallel and S != self.rope_cos.shape[0]:
            raise ValueError(f"sequence parallelism needs sequences of model.seq_length={self.rope_cos.shape[0]} "
                             f"tokens, got {S}")
        h = self.embed_tokens(x) if self.pre_process else x
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        for block in self.layers.values():
            h = maybe_checkpointed(self.recompute.block, block, h, cos, sin, replaying=True)
        if not self.post_process:
            return h
        h = self.norm(h)
        logits = self.logits(h, S)
        if mtp_tokens_BS is None or not self.model_cfg.mtp_num_layers:
            return logits
        return logits, self.mtp(h, mtp_tokens_BS, self.embed_tokens, functools.partial(self.logits, seq_len=S),
                                cos, sin)

    def logits(self, h: torch.Tensor, seq_len: int) -> torch.Tensor:
        """The LM head on final-normed hidden states (the token shard under sequence parallelism, gathered first):
        [B, S, V/tp]."""
        out = self.lm_head(self.sequence_gather(h))
        return out.view(-1, seq_len, out.shape[-1])
