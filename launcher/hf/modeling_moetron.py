"""Hugging Face modeling code of a moetron MoNE / Matryoshka-MoE / expert-bias model (shipped inside exported
model directories, loaded with ``trust_remote_code=True``; imports only torch, transformers >= 5 and the standard
library).

The model is transformers' Qwen3-MoE (attention, norms, RoPE, KV cache and ``generate`` unchanged) with each
sparse MoE block replaced: the router takes a per-layer k (elastic k) and an optional selection-only expert bias,
the experts optionally apply MoNE neuron selection. The math is moetron's (``moe_core/router.py``,
``moe_core/mone.py``), restated here because this file must run without moetron installed:

    p = softmax(fp32(x) @ fp32(W_gate_router)^T);  chosen = top-k(p + bias)
    w = p[chosen] / sum(p[chosen]) if norm_topk_prob (1.0 at k = 1), else p[chosen]
    expert e:  g = W_gate[e] x,  u = W_up[e] x,  h = silu(g) * u on kept neurons, exactly 0 elsewhere,  y = W_down[e] h
    kept (MoNE): the keep_k neurons with the largest fp32 score |g * sigmoid(g)| (post_act) or |g| (pre_act);
        NaN scores rank below every number, equal scores keep the lower neuron index; dropped neurons are
        selected out with torch.where (never multiplied by 0)

The router weight and expert bias stay fp32 when the model is loaded in bf16/fp16 (``_keep_in_fp32_modules_strict``)
because moetron routes with fp32 values; load with ``dtype=...`` rather than calling ``model.to(dtype)``, which
would round them.

Weights use the Qwen3-MoE Hub layout (per-expert ``gate_proj``/``up_proj``/``down_proj``); the qwen3_moe
checkpoint conversion (fusing experts into ``gate_up_proj`` on load, splitting on save) is registered for this
model type below. ``output_router_logits`` reports the router logits as Qwen3-MoE does.
"""
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3_moe

from .configuration_moetron import MoetronConfig

register_checkpoint_conversion_mapping("moetron", get_checkpoint_conversion_mapping("qwen3_moe"), overwrite=True)


def mone_keep_count(keep_ratio: float, ffn: int) -> int:
    """Neurons kept per token: keep_ratio * F (the ratio read as the decimal it prints as) rounded half up,
    clamped to [1, F], in exact rational arithmetic (as moetron)."""
    return max(1, min(ffn, int(Fraction(repr(float(keep_ratio))) * ffn + Fraction(1, 2))))


@torch.no_grad()
def mone_keep_mask(pre_act_NF: torch.Tensor, keep_k: int, score: str) -> torch.Tensor:
    """bool [N, F]: the keep_k neurons each row keeps (the selection in the module docstring)."""
    g_NF = pre_act_NF.float()
    score_NF = (g_NF * torch.sigmoid(g_NF) if score == "post_act" else g_NF).abs()
    bits_NF = torch.where(score_NF.isnan(), -1, score_NF.view(torch.int32)).to(torch.int64)
    ffn = score_NF.shape[-1]
    key_NF = bits_NF * (1 << 32) + torch.arange(ffn - 1, -1, -1, device=score_NF.device)  # distinct keys
    keep_idx_NK = torch.topk(key_NF, keep_k, dim=-1, sorted=False).indices
    return torch.zeros(score_NF.shape, dtype=torch.bool, device=score_NF.device).scatter_(-1, keep_idx_NK, True)


class MoetronRouter(qwen3_moe.Qwen3MoeTopKRouter):
    """Softmax top-k router in fp32 (weights renormalised if norm_topk_prob); ``top_k`` may be changed
    at any time."""

    def __init__(self, config: MoetronConfig, top_k: int):
        super().__init__(config)
        self.top_k = top_k
        self.norm_topk_prob = config.norm_topk_prob
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
        topk_weight_TK = topk_prob_TK / topk_prob_TK.sum(-1, keepdim=True) if self.norm_topk_prob else topk_prob_TK
        return logits_TE, topk_weight_TK.to(x_TD.dtype), topk_idx_TK


class MoetronExperts(qwen3_moe.Qwen3MoeExperts):
    """Qwen3-MoE's fused expert weights (``gate_up_proj`` [E, 2F, D], ``down_proj`` [E, D, F]) with optional MoNE."""

    def __init__(self, config: MoetronConfig):
        super().__init__(config)
        self.keep_k = mone_keep_count(config.mone_keep_ratio, self.intermediate_dim) if config.mone_enabled else None
        self.score = config.mone_score

    def _hidden(self, x_nD: torch.Tensor, expert: int) -> torch.Tensor:
        pre_nF, up_nF = F.linear(x_nD, self.gate_up_proj[expert]).chunk(2, dim=-1)
        if self.keep_k is not None:
            keep_nF = mone_keep_mask(pre_nF, self.keep_k, self.score)
            pre_nF, up_nF = torch.where(keep_nF, pre_nF, 0), torch.where(keep_nF, up_nF, 0)
        return self.act_fn(pre_nF) * up_nF

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
    _keep_in_fp32_modules_strict = [r"mlp\.gate\.weight$", r"mlp\.gate\.expert_bias$"]  # moetron routes in fp32

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
