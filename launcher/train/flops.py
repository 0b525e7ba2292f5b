"""Analytic FLOP and parameter counts for a moetron model, from its Config alone.

Conventions (the same as Megatron-LM's ``num_floating_point_operations`` and DeepSpeed's FlopsProfiler, so MFU is
comparable across tools):

- One multiply-accumulate (MAC) = 2 FLOPs. Only matmuls are counted; elementwise work (norms, RoPE, softmax, SiLU,
  residual adds, top-k selection) is a few FLOPs per element against thousands per matmul row, and is left out.
- The embedding lookup is free (a gather). The LM head is a full ``D x V`` matmul per token.
- Attention: per token and head, ``Q K^T`` and ``P V`` each cost ``S * head_dim`` MACs with the FULL ``S x S``
  score matrix, even though the mask is causal (Megatron and DeepSpeed's ``scaled_dot_product_attention`` counter
  both count the full square; a causal flash kernel does about half of it).
- GQA: q and o projections are ``D x H*hd``; k and v are ``D x G*hd`` each (G = num_query_groups).
- MLA (``model.attention=mla``; n = qk_nope_head_dim, r = qk_rope_head_dim, v = v_head_dim, c = kv_lora_rank,
  c_q = q_lora_rank): q is ``D x H(n+r)``, or ``D x c_q`` then ``c_q x H(n+r)`` with query compression;
  kv_a_proj_with_mqa ``D x (c+r)``; kv_b_proj ``c x H(n+v)``; o ``H*v x D``. Scores: ``Q K^T`` costs
  ``S * H(n+r)`` and ``P V`` ``S * H*v`` MACs per token (full square). The shared RoPE key is one per token,
  broadcast to the heads (no MACs).
- MoE layer: router ``D x E``, plus ``k`` routed SwiGLU experts of 3 matmuls each (gate, up: ``D x F``; down:
  ``F x D``), plus the shared expert when ``moe.shared_expert_ffn_hidden_size`` (F_s) > 0: a SwiGLU FFN of
  ``3 D F_s`` MACs every token runs, and its gate ``D x 1`` with ``moe.shared_expert_gate``. Layers in
  ``model.dense_layers`` have one SwiGLU FFN of width ``dense_ffn_hidden_size`` instead.
- Multi-token prediction (``model.mtp_num_layers`` = K > 0), training only (evaluation does not run it): per
  depth ``eh_proj`` ``2D x D``, one more MoE block (attention, router, experts, shared expert as above, with the
  depth's own k) and one more LM head ``D x V``. The MTP blocks are ``k_per_layer``'s last K entries (layer indices
  ``num_layers .. num_layers + K - 1``, ``ModelConfig.trained_moe_layer_indices``); their parameters always count.
- Training = 3 x forward (backward = 2 x forward: grads w.r.t. inputs and w.r.t. weights). Activation
  recomputation is not counted (it is hardware work, not model work).

Two expert counts, which differ only with MoNE:
- ``executed``: what the hardware does. The torch MoNE path computes gate, up and down for all F neurons and masks,
  so a MoNE expert costs exactly what a dense expert costs. Throughput and MFU use this number.
- ``useful``: what the MoNE math needs: the full gate (to score neurons) plus up/down for the ``k_n =
  round(keep_ratio * F)`` kept neurons only (halves round up, as moe_core.mone.keep_count); the same for the
  shared expert with ``moe.mone.shared_experts``. This is what a gathered-weights kernel would execute.

Matryoshka MoE draws k per layer per step; pass the drawn values (``k_per_layer``, one per MoE layer, possibly
fractional when averaged or when capacity dropping removed slots, see :func:`executed_k_per_layer`). Without it
training uses the mean of the k distribution and evaluation the config's eval k (``MoEConfig.eval_k_per_layer``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import torch

from launcher.config import Config
from moe_core.config import MoEConfig
from moe_core.matryoshka import k_probabilities
from moe_core.mone import keep_count

if TYPE_CHECKING:
    from launcher.train.step_reduce import LayerStepStats
    from moe_core.layer import MoELayerStats


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs per token, by component (summed over layers)."""

    attn_proj: float
    attn_scores: float
    router: float
    shared_experts: float
    """The shared expert and its gate (0 without one)."""
    experts: float
    dense_ffn: float
    lm_head: float
    mtp_proj: float
    """The MTP modules' ``eh_proj`` (0 without MTP or in evaluation); their blocks and heads are counted above."""
    experts_useful: float
    """Expert FLOPs the MoNE math needs (equals ``experts`` when MoNE is off)."""
    shared_experts_useful: float
    """Shared-expert FLOPs the MoNE math needs (equals ``shared_experts`` unless ``moe.mone.shared_experts``)."""

    @property
    def executed(self) -> float:
        return (self.attn_proj + self.attn_scores + self.router + self.shared_experts + self.experts
                + self.dense_ffn + self.lm_head + self.mtp_proj)

    @property
    def useful(self) -> float:
        return (self.executed - self.experts - self.shared_experts + self.experts_useful
                + self.shared_experts_useful)

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one optimizer step (all ranks together) and per token."""

    forward_per_token: ForwardFlops
    tokens_per_step: int

    @property
    def train_per_token(self) -> float:
        return 3.0 * self.forward_per_token.executed

    @property
    def train_per_token_useful(self) -> float:
        return 3.0 * self.forward_per_token.useful

    @property
    def train_per_step(self) -> float:
        return self.train_per_token * self.tokens_per_step

    @property
    def train_per_step_useful(self) -> float:
        return self.train_per_token_useful * self.tokens_per_step


@dataclass(frozen=True)
class ParamCount:
    total: int
    activated: float
    """Parameters one token uses: everything except unselected experts (embedding and LM head included).
    With MoNE an expert counts its whole gate plus the kept rows of up / columns of down."""


@dataclass(frozen=True)
class AttentionCount:
    """One attention layer, per token: projection MACs (= projection weights), score MACs at sequence length S,
    and its other weights: norms (GQA: q_norm, k_norm per ``model.qk_norm``; MLA: the latent norms) and biases
    (GQA's ``model.qkv_bias``)."""

    proj_macs: int
    score_macs: int
    other_params: int


def attention_count(cfg: Config, seq_length: int) -> AttentionCount:
    """GQA or MLA per ``model.attention`` (module docstring)."""
    m = cfg.model
    d, h = m.hidden_size, m.num_attention_heads
    if m.attention == "gqa":
        hd = m.head_width
        q_width, kv_width = h * hd, m.num_query_groups * hd
        norms = {"head": 2 * hd, "projection": q_width + kv_width, "none": 0}[m.qk_norm]
        biases = q_width + 2 * kv_width if m.qkv_bias else 0
        return AttentionCount(proj_macs=d * (2 * q_width + 2 * kv_width),   # q, o: D x H*hd; k, v: D x G*hd
                              score_macs=2 * seq_length * q_width,          # Q K^T and P V over the full S x S
                              other_params=norms + biases)
    qk = h * (m.qk_nope_head_dim + m.qk_rope_head_dim)
    q = d * qk if m.q_lora_rank is None else m.q_lora_rank * (d + qk)
    kv = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
    return AttentionCount(proj_macs=q + kv + h * m.v_head_dim * d,
                          score_macs=seq_length * (qk + h * m.v_head_dim),
                          other_params=m.kv_lora_rank + (m.q_lora_rank or 0))


def expected_k(moe: MoEConfig) -> float:
    """Mean routed experts per token during training: top_k, or the mean of the Matryoshka k distribution."""
    mm = moe.matryoshka
    if not mm.enabled:
        return float(moe.top_k)
    probs_K = k_probabilities(mm.k_min, mm.k_max, mm.distribution, mm.tau)
    return float((probs_K * torch.arange(mm.k_min, mm.k_max + 1, dtype=torch.float64)).sum())


def _mtp_depths(cfg: Config, training: bool) -> int:
    """MTP modules a forward runs: ``model.mtp_num_layers`` in training, none in evaluation."""
    return cfg.model.mtp_num_layers if training else 0


def default_k_per_layer(cfg: Config, training: bool) -> list[float]:
    """k of every MoE layer a forward runs (training: the MTP blocks last) when the caller does not know the drawn
    values: the training mean, or the config's evaluation k (``MoEConfig.eval_k_per_layer``)."""
    if training:
        return [expected_k(cfg.moe)] * len(cfg.model.trained_moe_layer_indices)
    return [float(k) for k in cfg.moe.eval_k_per_layer(len(cfg.model.moe_layer_indices))]


def _check_k(cfg: Config, k_per_layer: Sequence[float], training: bool) -> list[float]:
    mtp = _mtp_depths(cfg, training)
    n_moe = len(cfg.model.moe_layer_indices) + mtp
    if len(k_per_layer) != n_moe:
        raise ValueError(f"k_per_layer has {len(k_per_layer)} values but the model has {n_moe} MoE layers "
                         f"(num_layers={cfg.model.num_layers} minus dense_layers={cfg.model.dense_layers}"
                         + (f", plus mtp_num_layers={mtp} in training)" if mtp else ")"))
    for k in k_per_layer:
        if not 0 <= k <= cfg.moe.num_experts:
            raise ValueError(f"k_per_layer value {k} is outside [0, moe.num_experts={cfg.moe.num_experts}]")
    return [float(k) for k in k_per_layer]


def _swiglu_macs(cfg: Config, ffn: int, mone: bool) -> tuple[int, int]:
    """(executed, useful) MACs of one SwiGLU FFN of width ``ffn`` on one token; ``mone``: it keeps MoNE's top
    neurons (the full gate scores them, up/down run on the kept ones in the useful count)."""
    d = cfg.model.hidden_size
    dense = 3 * d * ffn
    return dense, (d * ffn + 2 * d * keep_count(cfg.moe.mone.keep_ratio, ffn) if mone else dense)


def _expert_macs(cfg: Config) -> tuple[int, int]:
    """(executed, useful) MACs of one routed expert on one token."""
    return _swiglu_macs(cfg, cfg.moe.expert_ffn_hidden_size, cfg.moe.mone.enabled)


def _shared_expert_macs(cfg: Config) -> tuple[int, int]:
    """(executed, useful) MACs of one MoE layer's shared expert and its gate on one token (0 without a shared
    expert); executed MACs equal its weights."""
    gate = cfg.model.hidden_size if cfg.moe.shared_expert_gate else 0
    executed, useful = _swiglu_macs(cfg, cfg.moe.shared_expert_ffn_hidden_size, cfg.moe.mone.shared_experts)
    return executed + gate, useful + gate


def forward_flops_per_token(cfg: Config, k_per_layer: Optional[Sequence[float]] = None, training: bool = True,
                            seq_length: Optional[int] = None) -> ForwardFlops:
    """Forward FLOPs per token (see the module docstring for what is counted)."""
    m = cfg.model
    d = m.hidden_size
    ks = _check_k(cfg, default_k_per_layer(cfg, training) if k_per_layer is None else k_per_layer, training)
    mtp = _mtp_depths(cfg, training)
    n_layers, n_moe = m.num_layers + mtp, len(ks)
    n_dense = n_layers - n_moe
    attn = attention_count(cfg, seq_length or m.seq_length)
    expert_exec, expert_useful = _expert_macs(cfg)
    shared_exec, shared_useful = _shared_expert_macs(cfg)
    return ForwardFlops(
        attn_proj=2.0 * n_layers * attn.proj_macs,
        attn_scores=2.0 * n_layers * attn.score_macs,
        router=2.0 * n_moe * d * cfg.moe.num_experts,
        shared_experts=2.0 * n_moe * shared_exec,
        experts=2.0 * sum(ks) * expert_exec,
        dense_ffn=2.0 * n_dense * 3 * d * m.dense_ffn_hidden_size,
        lm_head=2.0 * (1 + mtp) * d * m.vocab_size,
        mtp_proj=2.0 * mtp * 2 * d * d,
        experts_useful=2.0 * sum(ks) * expert_useful,
        shared_experts_useful=2.0 * n_moe * shared_useful,
    )


def training_flops(cfg: Config, k_per_layer: Optional[Sequence[float]] = None) -> FlopCount:
    """FLOPs of one optimizer step: global_batch_size sequences of seq_length tokens, forward + backward."""
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    return FlopCount(forward_flops_per_token(cfg, k_per_layer, training=True), tokens)


def param_counts(cfg: Config, k_per_layer: Optional[Sequence[float]] = None, training: bool = True) -> ParamCount:
    """Total and activated parameter counts of the block (untied embeddings; GQA's q/k norms and q/k/v biases or
    MLA's latent norms). The MTP modules always count (the checkpoint holds them: per module enorm, hnorm, eh_proj,
    one MoE block and its norm); their activated parameters count in training only (``k_per_layer`` as in
    :func:`forward_flops_per_token`)."""
    m = cfg.model
    d, e = m.hidden_size, cfg.moe.num_experts
    ks = _check_k(cfg, default_k_per_layer(cfg, training) if k_per_layer is None else k_per_layer, training)
    mtp_all, mtp_run = m.mtp_num_layers, _mtp_depths(cfg, training)
    n_dense = m.num_layers - len(m.moe_layer_indices)
    attn_count = attention_count(cfg, m.seq_length)
    attn = attn_count.proj_macs + attn_count.other_params  # one weight per projection MAC
    per_layer = attn + 2 * d  # attention and the block's 2 norms
    mtp_extra = 3 * d + 2 * d * d  # enorm, hnorm, norm, eh_proj
    common = 2 * m.vocab_size * d + d + m.num_layers * per_layer  # embed, head, final norm, layers
    dense_ffn = n_dense * 3 * d * m.dense_ffn_hidden_size
    shared_exec, shared_useful = _shared_expert_macs(cfg)  # one MAC per weight per token
    expert_exec, expert_useful = _expert_macs(cfg)
    n_main, mtp_module = len(m.moe_layer_indices), per_layer + mtp_extra
    total = (common + dense_ffn + mtp_all * mtp_module
             + (n_main + mtp_all) * (e * d + shared_exec + e * expert_exec))  # router, shared and routed experts
    activated = (common + dense_ffn + mtp_run * mtp_module + (n_main + mtp_run) * (e * d + shared_useful)
                 + sum(ks) * expert_useful)
    return ParamCount(total=total, activated=activated)


def executed_k_per_layer(stats_per_layer: Mapping[int, Union[LayerStepStats, MoELayerStats]]) -> list[float]:
    """Routed expert slots actually computed per token, per MoE layer (in layer order), from a step's statistics
    (or one forward's ``MoELayer.last_stats``): the drawn k, reduced by the capacity-dropped slots
    (``tokens_per_expert_E`` counts slots before dropping)."""
    ks = []
    for idx in sorted(stats_per_layer):
        st = stats_per_layer[idx]
        slots = float(st.tokens_per_expert_E.sum())
        dropped = float(st.dropped_slots)
        ks.append(float(st.k) * (1.0 - dropped / slots) if slots > 0 else float(st.k))
    return ks
