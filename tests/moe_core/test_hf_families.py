"""moetron's model expresses each Hugging Face family exactly: a tiny random model built by transformers (CPU, fp32,
every option the family has turned on) and moetron's MoETransformer with the same weights (mapped here by hand; the
converter has its own tests) give the same logits within 1e-5 and route every token to the same experts.

Each case gives the transformers config (``model_type`` + fields) and the moetron ``model`` / ``moe`` fields the
family's options map to (what a converter writes: qk_norm, qkv_bias, partial_rotary_factor, dense layers, router).
"""
from __future__ import annotations

import pytest
import torch

from moe_core.config import MoEConfig
from moe_core.model_config import ModelConfig
from moe_core.transformer import MoETransformer

VOCAB, HIDDEN, HEADS, GROUPS, SEQ = 64, 32, 4, 2, 16
HF_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=GROUPS,
                 max_position_embeddings=SEQ, num_hidden_layers=3, intermediate_size=48)
M_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=3, num_attention_heads=HEADS,
                num_query_groups=GROUPS, seq_length=SEQ, dense_ffn_hidden_size=48)
DENSE = dict(num_experts=2, top_k=1, expert_ffn_hidden_size=8)  # unused: every layer is dense
MLA_HF = dict(q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)

CASES = {
    # Qwen3-MoE: per-head q/k norm, softmax top-k, renormalised, one dense layer
    "qwen3_moe": (dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                       norm_topk_prob=True, mlp_only_layers=[0], rms_norm_eps=1e-6),
                  dict(head_dim=8, dense_layers=[0], norm_eps=1e-6),
                  dict(num_experts=4, top_k=2, expert_ffn_hidden_size=24, norm_topk_prob=True)),
    # Qwen2-MoE: q/k/v bias, no q/k norm, raw top-k probabilities, shared expert with a sigmoid gate
    "qwen2_moe": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=False,
                       shared_expert_intermediate_size=40, qkv_bias=True, mlp_only_layers=[1], rms_norm_eps=1e-6),
                  dict(qk_norm="none", qkv_bias=True, dense_layers=[1], norm_eps=1e-6),
                  dict(num_experts=4, top_k=2, expert_ffn_hidden_size=24, norm_topk_prob=False,
                       shared_expert_ffn_hidden_size=40, shared_expert_gate=True)),
    # Mixtral: no q/k norm, softmax top-k always renormalised, experts of intermediate_size
    "mixtral": (dict(num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5),
                dict(qk_norm="none", rope_theta=1e6, norm_eps=1e-5),
                dict(num_experts=4, top_k=2, expert_ffn_hidden_size=48, norm_topk_prob=True)),
    # OLMoE: q/k RMSNorm over the whole projections, raw top-k probabilities
    "olmoe": (dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, rms_norm_eps=1e-5),
              dict(qk_norm="projection", norm_eps=1e-5),
              dict(num_experts=4, top_k=2, expert_ffn_hidden_size=48, norm_topk_prob=False)),
    # GLM-4.5: q/k/v bias, per-head q/k norm, half the head rotated, sigmoid group-limited routing with the score
    # correction bias and a routed scaling factor, a shared expert, the first layer dense
    "glm4_moe": (dict(head_dim=8, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
                      n_shared_experts=2, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                      first_k_dense_replace=1, attention_bias=True, use_qk_norm=True, partial_rotary_factor=0.5,
                      rms_norm_eps=1e-5),
                 dict(head_dim=8, qkv_bias=True, partial_rotary_factor=0.5, dense_layers=[0], norm_eps=1e-5),
                 dict(num_experts=8, top_k=3, expert_ffn_hidden_size=24, shared_expert_ffn_hidden_size=48,
                      score_function="sigmoid", num_groups=4, group_topk=2, routed_scaling_factor=2.5,
                      norm_topk_prob=True, expert_bias=True)),
    # GLM-4.5 without use_qk_norm and bias, raw sigmoid gates
    "glm4_moe-plain": (dict(head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                            n_shared_experts=1, norm_topk_prob=False, first_k_dense_replace=0,
                            partial_rotary_factor=0.5, rms_norm_eps=1e-5),
                       dict(head_dim=8, qk_norm="none", partial_rotary_factor=0.5, norm_eps=1e-5),
                       dict(num_experts=4, top_k=2, expert_ffn_hidden_size=24, shared_expert_ffn_hidden_size=24,
                            score_function="sigmoid", norm_topk_prob=False, expert_bias=True)),
    # DeepSeek-V3: MLA, sigmoid group-limited routing, shared expert, first layer dense
    "deepseek_v3": (dict(MLA_HF, num_key_value_heads=HEADS, n_routed_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=24, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                         norm_topk_prob=True, first_k_dense_replace=1, rms_norm_eps=1e-6),
                    dict(MLA_HF, attention="mla", dense_layers=[0], norm_eps=1e-6),
                    dict(num_experts=8, top_k=2, expert_ffn_hidden_size=24, shared_expert_ffn_hidden_size=24,
                         score_function="sigmoid", num_groups=4, group_topk=2, routed_scaling_factor=2.5,
                         norm_topk_prob=True, expert_bias=True)),
    # dense Qwen3 and Llama: every layer dense (no MoE layer at all)
    "qwen3": (dict(head_dim=8, rms_norm_eps=1e-6), dict(head_dim=8, dense_layers=[0, 1, 2], norm_eps=1e-6), DENSE),
    "llama": (dict(rms_norm_eps=1e-5), dict(qk_norm="none", dense_layers=[0, 1, 2], norm_eps=1e-5), DENSE),
}


def hf_model(model_type: str, fields: dict):
    """The family's tiny model with every parameter (and the router score-correction bias) random."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**HF_COMMON, **fields}, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("inv_freq"):
                continue
            noise = torch.randn(t.shape, generator=gen)
            t.copy_(1 + 0.2 * noise if "norm" in name else 0.05 * noise if "bias" in name else 0.2 * noise)
    return model


def moetron_state(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face names (transformers 5: fused experts) -> moetron names (docs/convert.md)."""
    out = {}
    for key, t in hf_sd.items():
        key = key.removeprefix("model.")
        key = (key.replace(".mlp.gate.weight", ".mlp.router.weight")
               .replace(".mlp.gate.e_score_correction_bias", ".mlp.router.expert_bias")
               .replace(".mlp.shared_experts.", ".mlp.shared_expert."))
        if key.endswith(".experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=1)
            out[key.replace("gate_up_proj", "w_gate_EFD")] = gate
            out[key.replace("gate_up_proj", "w_up_EFD")] = up
        elif key.endswith(".experts.down_proj"):
            out[key.replace("down_proj", "w_down_EDF")] = t
        else:
            out[key] = t
    return out


def load_moetron(model_fields: dict, moe_fields: dict, state: dict[str, torch.Tensor]) -> MoETransformer:
    m, moe = ModelConfig(**{**M_COMMON, **model_fields}), MoEConfig(**moe_fields)
    m.validate()
    moe.validate(m)
    model = MoETransformer(m, moe, seed=0).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("router.expert_bias") for k in missing), missing  # families without the bias: zeros
    return model


def _record_routes(model, suffix: str, pick) -> dict[str, torch.Tensor]:
    """Each router's chosen experts per token (sorted), keyed by layer, recorded by forward hooks."""
    routes = {}
    for name, module in model.named_modules():
        if name.endswith(suffix):
            layer = name.split("layers.")[1].split(".")[0]
            module.register_forward_hook(
                lambda mod, args, out, layer=layer: routes.__setitem__(layer, pick(out).sort(-1).values))
    return routes


@pytest.mark.parametrize("case", list(CASES))
def test_family_logits_and_routes_match_transformers(case):
    hf_fields, model_fields, moe_fields = CASES[case]
    hf = hf_model(case.split("-")[0], hf_fields)
    ours = load_moetron(model_fields, moe_fields, moetron_state(hf.state_dict()))
    hf_routes = _record_routes(hf, ".mlp.gate", lambda out: out[2])  # (logits, weights, expert ids)
    our_routes = _record_routes(ours, ".mlp.router", lambda out: out.topk_idx_TK)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert expected.abs().max() > 1  # random weights, not a degenerate all-zero output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert sorted(hf_routes) == sorted(our_routes) == [str(i) for i in ours.moe_layers()]
    for layer, ids in hf_routes.items():
        assert torch.equal(our_routes[layer], ids), f"layer {layer}: different experts"


def test_family_options_change_the_output():
    """The new options are live: OLMoE's logits differ when moetron normalises per head instead of over the
    projection, and GLM-4.5's when it rotates every channel instead of half."""
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    for case, wrong in (("olmoe", {"qk_norm": "head"}), ("glm4_moe", {"partial_rotary_factor": 1.0})):
        hf_fields, model_fields, moe_fields = CASES[case]
        hf = hf_model(case, hf_fields)
        state = moetron_state(hf.state_dict())
        if case == "olmoe":  # per-head weights: the first head's slice, so the state loads
            state = {k: t[:8] if k.endswith(("q_norm.weight", "k_norm.weight")) else t for k, t in state.items()}
        ours = load_moetron({**model_fields, **wrong}, moe_fields, state)
        with torch.no_grad():
            assert (ours(tokens) - hf(tokens).logits).abs().max() > 1e-3, case
