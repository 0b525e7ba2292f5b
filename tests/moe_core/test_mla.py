"""Multi-head Latent Attention (moe_core/mla.py) and its RoPE tables (moe_core/rope.py) against transformers'
DeepseekV3Attention and DeepseekV3RotaryEmbedding: same weights (copied by name), fp32, outputs and input gradients
within 1e-5; with and without query compression, both RoPE layouts, plain RoPE and YaRN."""
import dataclasses

import pytest
import torch

from moe_core.config import MoEConfig
from moe_core.model_config import ModelConfig, RopeScalingConfig
from moe_core.layers import LayerFactory
from moe_core.mla import MLAttention
from moe_core.rope import rope_cos_sin
from moe_core.transformer import MoETransformer

B, S = 2, 12
YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=256, beta_fast=32.0, beta_slow=1.0,
            mscale=0.7, mscale_all_dim=1.0)
CASES = {
    "q_lora": dict(q_lora_rank=24),
    "no_q_lora": dict(q_lora_rank=None),
    "halves": dict(q_lora_rank=24, rope_interleave=False),
    # theta 500 over 256 original positions puts the YaRN ramp over dimensions 0..5 of the 8 frequencies
    "yarn": dict(q_lora_rank=24, rope_theta=500.0, rope_scaling=RopeScalingConfig(**YARN)),
    "yarn_defaults": dict(q_lora_rank=None, rope_theta=500.0, rope_scaling=RopeScalingConfig(
        type="yarn", factor=8.0, original_max_position_embeddings=256, truncate=False)),
    "yarn_attention_factor": dict(q_lora_rank=24, rope_theta=500.0, rope_scaling=RopeScalingConfig(
        **YARN, attention_factor=1.3)),
}


def _model_cfg(**kw) -> ModelConfig:
    return ModelConfig(hidden_size=32, num_attention_heads=4, attention="mla", kv_lora_rank=20, qk_nope_head_dim=8,
                       qk_rope_head_dim=16, v_head_dim=12, seq_length=S, norm_eps=1e-5, **kw)


def _hf_config(m: ModelConfig):
    from transformers import DeepseekV3Config

    rs = m.rope_scaling
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    if rs.type == "yarn":
        rope.update(rope_type="yarn", **{k: v for k, v in dataclasses.asdict(rs).items()
                                         if k != "type" and v is not None})
    cfg = DeepseekV3Config(vocab_size=64, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
                           num_key_value_heads=m.num_attention_heads, q_lora_rank=m.q_lora_rank,
                           kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
                           qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, rms_norm_eps=m.norm_eps,
                           max_position_embeddings=1024, rope_parameters=rope, rope_interleave=m.rope_interleave,
                           attention_bias=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def _pair(m: ModelConfig):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    torch.manual_seed(0)
    ours = MLAttention(m, LayerFactory())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)  # non-trivial norm weights
    hf_cfg = _hf_config(m)
    hf = DeepseekV3Attention(hf_cfg, layer_idx=0)
    hf.load_state_dict(ours.state_dict(), strict=True)
    return ours, hf, DeepseekV3RotaryEmbedding(hf_cfg)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers_deepseek_v3_attention(case):
    m = _model_cfg(**CASES[case])
    ours, hf, hf_rope = _pair(m)
    x = torch.randn(B, S, m.hidden_size)
    hf_cos, hf_sin = hf_rope(x, torch.arange(S).expand(B, S))
    cos, sin = rope_cos_sin(S, m.qk_rope_head_dim, m.rope_theta, m.rope_scaling)
    torch.testing.assert_close(cos.expand(B, S, -1), hf_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.expand(B, S, -1), hf_sin, rtol=0, atol=1e-6)
    assert ours.scale == pytest.approx(hf.scaling, rel=1e-12)

    grad_out = torch.randn(B, S, m.hidden_size)
    x_ours, x_hf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = ours(x_ours, cos, sin)
    out_hf, _ = hf(x_hf, (hf_cos, hf_sin), attention_mask=None)
    torch.testing.assert_close(out, out_hf, rtol=0, atol=1e-5)
    (out * grad_out).sum().backward()
    (out_hf * grad_out).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_hf.grad, rtol=0, atol=1e-5)
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, rtol=1e-5, atol=1e-5, msg=lambda s: f"{name}: {s}")


def test_yarn_changes_the_model_and_mscale_scales_the_softmax():
    """YaRN is really applied (the ramp moves frequencies; the cos/sin and softmax scales move off 1)."""
    plain = _model_cfg(q_lora_rank=None, rope_theta=500.0)
    yarn = dataclasses.replace(plain, rope_scaling=RopeScalingConfig(**YARN))
    cos_p, _ = rope_cos_sin(S, 16, 500.0, plain.rope_scaling)
    cos_y, _ = rope_cos_sin(S, 16, 500.0, yarn.rope_scaling)
    assert not torch.allclose(cos_p, cos_y)
    mscale_all = 0.1 * 1.0 * torch.log(torch.tensor(4.0)).item() + 1
    assert MLAttention(yarn, LayerFactory()).scale == pytest.approx(24 ** -0.5 * mscale_all ** 2)
    assert MLAttention(plain, LayerFactory()).scale == pytest.approx(24 ** -0.5)


def test_block_uses_mla_with_rope_tables_of_the_rope_width():
    m = _model_cfg(q_lora_rank=24, num_layers=2, vocab_size=64)
    model = MoETransformer(m, MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=16), seed=0)
    attn = model.layers["0"].self_attn
    assert isinstance(attn, MLAttention)
    assert model.rope_cos.shape == (S, m.qk_rope_head_dim)
    assert sorted(n for n, _ in attn.named_parameters()) == sorted(
        f"{n}.weight" for n in ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
                                "kv_b_proj", "o_proj"))
    out = model(torch.randint(0, 64, (B, S)))
    assert out.shape == (B, S, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("fields, message", [
    (dict(attention="mla", qk_rope_head_dim=7), "model.qk_rope_head_dim (7) must be even"),
    (dict(q_lora_rank=64), "model.q_lora_rank is used by model.attention=mla only"),
    (dict(rope_interleave=False), "model.rope_interleave is used by model.attention=mla only"),
    (dict(rope_scaling=RopeScalingConfig(factor=40.0)), "model.rope_scaling: fields other than type are used"),
    (dict(attention="mla", rope_scaling=RopeScalingConfig(type="yarn", beta_fast=1.0, beta_slow=2.0)),
     "model.rope_scaling.beta_fast (1.0) must be >= model.rope_scaling.beta_slow (2.0)"),
])
def test_bad_attention_fields_name_the_key(fields, message):
    with pytest.raises(ValueError) as err:
        ModelConfig(**fields).validate_attention()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_good_attention_fields_pass():
    ModelConfig().validate_attention()
    _model_cfg(q_lora_rank=24, rope_scaling=RopeScalingConfig(**YARN)).validate_attention()
    ModelConfig(rope_scaling=RopeScalingConfig(**YARN)).validate_attention()  # YaRN on GQA's RoPE
