"""Hugging Face modeling code of a moetron MoNE / Matryoshka-MoE / expert-bias model (shipped inside exported
model directories, loaded with ``trust_remote_code=True``; imports only torch and transformers >= 5).

The model is transformers' Qwen3-MoE (attention, norms, RoPE, KV cache and ``generate`` unchanged) with each
sparse MoE block replaced: the router takes a per-layer k (elastic k) and an optional selection-only expert bias,
the experts optionally apply MoNE neuron selection. The math is moetron's (``moe_core/router.py``,
``moe_core/mone.py``), restated here because this file must run without moetron installed:

    p = softmax(fp32(x) @ fp32(W_gate_router)^T);  chosen = top-k(p + bias);  w = p[chosen] / sum(p[chosen])
    expert e:  pre = W_gate[e] x,  h = silu(pre) * (W_up[e] x) * mask,  y = W_down[e] h
    mask (MoNE): 1 for the keep_k neurons with the largest |silu(pre)| (post_act) or |pre| (pre_act), else 0

Weights use the Qwen3-MoE Hub layout (per-expert ``gate_proj``/``up_proj``/``down_proj``); the qwen3_moe
checkpoint conversion (fusing experts into ``gate_up_proj`` on load, splitting on save) is registered for this
model type below. ``output_router_logits`` reports the router logits as Qwen3-MoE does.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3_moe

from .configuration_moetron import MoetronConfig

register_checkpoint_conversion_mapping("moetron", get_checkpoint_conversion_mapping("qwen3_moe"), overwrite=True)


def mone_keep_count(keep_ratio: float, ffn: int) -> int:
    """Neurons kept per token: round(keep_ratio * F) with halves rounded up, at least 1 (as moetron)."""
    return max(1, min(ffn, math.floor(keep_ratio * ffn + 0.5)))


class MoetronRouter(qwen3_moe.Qwen3MoeTopKRouter):
    """Softmax top-k router in fp32 with renormalised weights; ``top_k`` may be changed at any time."""

    def __init__(self, config: MoetronConfig, top_k: int):
        super().__init__(config)
        self.top_k = top_k
        if config.router_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, hidden_states):
        x_TD = hidden_states.reshape(-1, self.hidden_dim)
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        probs_TE = torch.softmax(logits_TE, dim=-1)
        select_TE = probs_TE if self.expert_bias is None else probs_TE + self.expert_bias.float()
        topk_idx_TK = torch.topk(select_TE, self.top_k, dim=-1).indices
        topk_prob_TK = probs_TE.gather(1, topk_idx_TK)
        topk_weight_TK = topk_prob_TK / topk_prob_TK.sum(-1, keepdim=True)
        return logits_TE, topk_weight_TK.to(x_TD.dtype), topk_idx_TK


class MoetronExperts(qwen3_moe.Qwen3MoeExperts):
    """Qwen3-MoE's fused expert weights (``gate_up_proj`` [E, 2F, D], ``down_proj`` [E, D, F]) with optional MoNE."""

    def __init__(self, config: MoetronConfig):
        super().__init__(config)
        self.keep_k = mone_keep_count(config.mone_keep_ratio, self.intermediate_dim) if config.mone_enabled else None
        self.score = config.mone_score

    def _hidden(self, x_nD: torch.Tensor, expert: int) -> torch.Tensor:
        pre_nF, up_nF = F.linear(x_nD, self.gate_up_proj[expert]).chunk(2, dim=-1)
        post_nF = self.act_fn(pre_nF)
        h_nF = post_nF * up_nF
        if self.keep_k is None:
            return h_nF
        score_nF = (post_nF if self.score == "post_act" else pre_nF).abs()
        keep_nK = torch.topk(score_nF, self.keep_k, dim=-1, sorted=False).indices
        return h_nF * torch.zeros_like(h_nF).scatter_(-1, keep_nK, 1.0)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out_TD = torch.zeros_like(hidden_states)
        for expert in torch.unique(top_k_index).tolist():
            token_n, slot_n = torch.where(top_k_index == expert)
            y_nD = F.linear(self._hidden(hidden_states[token_n], expert), self.down_proj[expert])
            out_TD.index_add_(0, token_n, (y_nD * top_k_weights[token_n, slot_n, None]).to(out_TD.dtype))
        return out_TD


class MoetronSparseMoeBlock(qwen3_moe.Qwen3MoeSparseMoeBlock):
    def __init__(self, config: MoetronConfig, top_k: int):
        nn.Module.__init__(self)
        self.experts = MoetronExperts(config)
        self.gate = MoetronRouter(config, top_k)


class MoetronForCausalLM(qwen3_moe.Qwen3MoeForCausalLM):
    config_class = MoetronConfig
    config: MoetronConfig

    def __init__(self, config: MoetronConfig):
        super().__init__(config)
        ks = self._layer_k(config.moe_k_per_layer or config.num_experts_per_tok)
        for layer_idx, top_k in ks.items():
            self.model.layers[layer_idx].mlp = MoetronSparseMoeBlock(config, top_k)
        self.post_init()

    def _layer_k(self, k) -> dict[int, int]:
        """{layer index: k} for one k or a list with one k per MoE layer."""
        moe_layers = [i for i, layer in enumerate(self.model.layers)
                      if isinstance(layer.mlp, qwen3_moe.Qwen3MoeSparseMoeBlock)]
        ks = list(k) if isinstance(k, (list, tuple)) else [k] * len(moe_layers)
        if len(ks) != len(moe_layers):
            raise ValueError(f"got {len(ks)} k values for {len(moe_layers)} MoE layers; give one per MoE layer")
        for v in ks:
            if not 1 <= int(v) <= self.config.num_experts:
                raise ValueError(f"k={v} must be in [1, num_experts={self.config.num_experts}]")
        return dict(zip(moe_layers, (int(v) for v in ks)))

    def set_moe_k(self, k) -> None:
        """Elastic inference: one k for every MoE layer, or a list with one k per MoE layer."""
        for layer_idx, top_k in self._layer_k(k).items():
            self.model.layers[layer_idx].mlp.gate.top_k = top_k


__all__ = ["MoetronForCausalLM"]
