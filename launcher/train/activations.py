"""Activation bytes per token of one transformer layer on one rank, by part, and what each ``train.recompute``
option drops from them (the dry-run's activation model; launcher/train/memory.py adds up the layers).

Counts the tensors moetron's eager block keeps for backward, measured on CPU (tests/launcher/train/
test_memory_estimate.py). ``b`` = compute dtype bytes; an RMSNorm keeps an fp32 copy of its input (its input
itself in fp32) and its normalised output, ``(4 + b) D``; the router keeps its fp32 input, ``4 D``. Per token
(TP splits heads, projections and routed slots; norms and latents are whole on every TP rank):

- norms: the block's two, ``2 (4 + b) D``;
- GQA: its input, and per query / key head the projection's output, the q/k-norm's fp32 copy (``4 + 2b`` bytes
  per channel with the RoPE output), the values and the attention output: ``b D + (4 + 3b) (H + G) hd / tp``;
- MLA: ``b (D + 3c + r + 3c_q + H (3n + 2r + 3v) / tp)`` (c = kv_lora_rank, c_q = q_lora_rank or 0, n/r/v =
  qk_nope/qk_rope/v head dims): the latents and their norms, per head q, k, the kv_b output, the SDPA output and
  o_proj's input, as a fused SDPA keeps them (CPU's math fallback, when v differs from n + r, adds H x S x S);
- MoE layer: ``4 D + b K (4 F + 2 D) / tp + 12 E + 20 K``: the router's input, logits and probabilities, per
  routed slot the permuted row, gate/up/activation/hidden (``4 F``) and the combine's input, plus the MoNE
  keep-mask (``K F / tp`` bytes); a shared expert (F_s) ``b 4 F_s / tp`` (+ its bf16 input ``b D`` when the
  router's fp32 copy is a different tensor), its sigmoid gate ``b (D + 1)``;
- dense layer: ``b (D + 4 F_d / tp)``.

Recompute (moe_core/recompute.py) drops, per token and layer: ``norm`` ``8 D`` (each norm keeps only its
input); ``core_attn`` the softmax statistics ``4 H / tp`` (and, where the attention output is not o_proj's input
itself, as with MLA, that output ``b H v / tp``); ``mla_up_proj`` the latent norms' outputs ``2 b (c + c_q)``,
with ``core_attn`` everything of the attention but its input, the latents, the RoPE key and the output;
``mlp`` / ``shared_experts`` their ``4 F`` terms (and the gate); ``moe_act`` the activation and hidden, ``2 b K F /
tp``; ``moe`` the whole MoE layer but its input; ``full`` the whole layer but its input. A layer's backward holds
on top of what is kept one recomputed region at a time and that region's gradient temporaries (the MoE layer's:
two of an expert's [K F] intermediates or the fp32 combine's three [K D] and their cast, ``max(2 b K F,
(12 + b) K D) / tp``; the shared expert's and a dense FFN's two of their width; the whole MoE layer's both), the
most of any part, plus three residual-stream gradients ``3 b D`` (:attr:`LayerBytes.backward`).
"""
from __future__ import annotations

from dataclasses import dataclass

from moe_core.model_config import ModelConfig
from moe_core.recompute import Recompute


@dataclass(frozen=True)
class LayerBytes:
    """Bytes per token of one layer (or one part of it): ``kept`` until its backward, ``dropped`` by recompute (all
    its regions), ``backward``: the most its backward holds at once on top of ``kept`` (one recomputed region and
    its gradient temporaries)."""

    kept: float
    dropped: float
    backward: float


def _attention(m: ModelConfig, b: int, tp: int, rc: Recompute) -> LayerBytes:
    H = m.num_attention_heads
    stats = 4 * H / tp if rc.covers("core_attn") else 0  # the SDPA's log-sum-exp
    if m.attention == "gqa":
        return LayerBytes(b * m.hidden_size + (4 + 3 * b) * (H + m.num_query_groups) * m.head_width / tp - stats,
                          stats, stats)
    c, cq, r, n, v = m.kv_lora_rank, m.q_lora_rank or 0, m.qk_rope_head_dim, m.qk_nope_head_dim, m.v_head_dim
    total = b * (m.hidden_size + 3 * c + r + 3 * cq + H * (3 * n + 2 * r + 3 * v) / tp)
    up, core = rc.covers("mla_up_proj"), rc.covers("core_attn")
    if up and core:  # one region: its inputs (the latents, the RoPE key) and o_proj's input stay
        kept = b * (m.hidden_size + c + cq + r + H * v / tp)
        return LayerBytes(kept, total - kept, total - kept)
    dropped = (2 * b * (c + cq) if up else 0) + (stats + b * H * v / tp if core else 0)
    return LayerBytes(total - dropped, dropped, dropped)


def _moe(m: ModelConfig, moe, b: int, tp: int, sp: int, rc: Recompute) -> LayerBytes:
    D, K, F, Fs = m.hidden_size, moe.top_k, moe.expert_ffn_hidden_size, moe.shared_expert_ffn_hidden_size
    routed = b * K * 2 * D / tp + (12 * moe.num_experts + 20 * K) / sp + (K * F / tp if moe.mone.enabled else 0)
    act = b * K * 4 * F / tp
    shared = b * 4 * Fs / tp + (b * (D + 1) / sp if moe.shared_expert_gate else 0)
    shared_input = b * D if Fs and b != 4 else 0  # bf16: the shared expert's input is not the router's fp32 copy
    total = 4 * D / sp + routed + act + shared + shared_input
    # gradient temporaries: two of an expert's [K F] intermediates, or the fp32 combine's three [K D] ones and
    # their cast back to the compute dtype
    routed_grads, shared_grads = max(2 * b * K * F, (12 + b) * K * D) / tp, 2 * b * Fs / tp
    if rc.covers("moe"):
        return LayerBytes(b * D / sp, total - b * D / sp, total - b * D / sp + routed_grads + shared_grads)
    act_dropped = b * K * 2 * F / tp if rc.covers("moe_act") else 0
    shared_dropped = shared if rc.covers("shared_experts") else 0
    return LayerBytes(total - act_dropped - shared_dropped, act_dropped + shared_dropped,
                      max(act_dropped + routed_grads, shared_dropped + shared_grads))


def _dense(m: ModelConfig, b: int, tp: int, rc: Recompute) -> LayerBytes:
    ffn = b * 4 * m.dense_ffn_hidden_size / tp
    dropped = ffn if rc.covers("mlp") else 0
    return LayerBytes(b * m.hidden_size + ffn - dropped, dropped, dropped + 2 * b * m.dense_ffn_hidden_size / tp)


def layer_bytes(m: ModelConfig, moe, b: int, tp: int, sp: int, is_moe: bool, rc: Recompute) -> LayerBytes:
    """Activation bytes per token of one layer (an MoE layer when ``is_moe``) on one rank, under ``rc``; ``sp``:
    TP under sequence parallelism (what is whole on every TP rank is a token shard), else 1."""
    D = m.hidden_size / sp  # the residual stream on this rank
    norm = 8 * D if rc.covers("norm") else 0
    parts = [LayerBytes(2 * (4 + b) * D - norm, norm, norm), _attention(m, b, tp, rc),
             _moe(m, moe, b, tp, sp, rc) if is_moe else _dense(m, b, tp, rc)]
    kept, dropped = sum(p.kept for p in parts), sum(p.dropped for p in parts)
    residual_grads = 3 * b * D  # the residual stream's gradients around the part in backward
    if rc.block:  # the block's input stays; backward recomputes the whole block (no part has a region of its own)
        rest = kept - b * D
        whole_moe = _moe(m, moe, b, tp, sp, Recompute("selective", frozenset({"moe"}))) if is_moe else parts[2]
        return LayerBytes(b * D, rest, rest + whole_moe.backward - whole_moe.dropped + residual_grads)
    return LayerBytes(kept, dropped, max(p.backward for p in parts) + residual_grads)
