"""Shared experts (moe.shared_expert_ffn_hidden_size, moe.shared_expert_gate): MoELayer against transformers'
Qwen2MoeSparseMoeBlock (gated shared expert) and DeepseekV3MoE (ungated, sigmoid router with groups, bias and
scaling) with the weights copied, outputs and gradients; parameter names; config errors."""
import pytest
import torch

from moe_core.config import MoEConfig
from moe_core.model_config import ModelConfig
from moe_core.layer import MoELayer
from moe_core.layers import SwiGLUMLP
from moe_core.matryoshka import KSchedule

D, E, F, FS, K, T = 12, 8, 6, 10, 2, 20


def _layer(**cfg) -> MoELayer:
    moe = MoEConfig(**{"num_experts": E, "top_k": K, "expert_ffn_hidden_size": F, "aux_loss_coeff": 0.0,
                       "z_loss_coeff": 0.0, **cfg})
    return MoELayer(D, moe, layer_idx=0, k_schedule=KSchedule(moe, seed=0)).eval()


def _copy_from_hf(ours: MoELayer, hf_block, shared_name: str) -> None:
    """HF's fused experts (gate_up_proj [E, 2F, D]: gate rows first) and router into ours, shared expert by name."""
    with torch.no_grad():
        ours.router.weight.copy_(hf_block.gate.weight)
        ours.experts.w_gate_EFD.copy_(hf_block.experts.gate_up_proj[:, :F])
        ours.experts.w_up_EFD.copy_(hf_block.experts.gate_up_proj[:, F:])
        ours.experts.w_down_EDF.copy_(hf_block.experts.down_proj)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            getattr(ours.shared_expert, proj).weight.copy_(getattr(getattr(hf_block, shared_name), proj).weight)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _check_same(ours: MoELayer, hf_block, grad_pairs: dict) -> None:
    """Forward and backward of one random batch: outputs (1e-5), input gradients and the given parameter pairs."""
    gen = torch.Generator().manual_seed(11)
    x, g = torch.randn(2, T // 2, D, generator=gen), torch.randn(2, T // 2, D, generator=gen)
    x_ours, x_hf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ours, y_hf = ours(x_ours), hf_block(x_hf)
    torch.testing.assert_close(y_ours, y_hf, rtol=1e-5, atol=1e-5)
    (y_ours * g).sum().backward()
    (y_hf * g).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_hf.grad, rtol=1e-5, atol=1e-5)
    for name, (mine, theirs) in grad_pairs.items():
        torch.testing.assert_close(mine(), theirs(), rtol=1e-5, atol=1e-5, msg=name)
    assert y_hf.abs().max() > 0.1 and ours.shared_expert.down_proj.weight.grad.abs().max() > 0


def test_matches_transformers_qwen2_moe_block_with_gated_shared_expert():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    hf_cfg = Qwen2MoeConfig(hidden_size=D, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=F,
                            shared_expert_intermediate_size=FS, norm_topk_prob=True)
    hf = Qwen2MoeSparseMoeBlock(hf_cfg).float()
    _randomise(hf, seed=1)
    ours = _layer(shared_expert_ffn_hidden_size=FS, shared_expert_gate=True)
    _copy_from_hf(ours, hf, "shared_expert")
    with torch.no_grad():
        ours.shared_expert_gate.weight.copy_(hf.shared_expert_gate.weight)
    _check_same(ours, hf, {
        "shared_expert_gate": (lambda: ours.shared_expert_gate.weight.grad, lambda: hf.shared_expert_gate.weight.grad),
        "shared_expert.up_proj": (lambda: ours.shared_expert.up_proj.weight.grad,
                                  lambda: hf.shared_expert.up_proj.weight.grad),
        "router": (lambda: ours.router.weight.grad, lambda: hf.gate.weight.grad),
        "experts.w_down_EDF": (lambda: ours.experts.w_down_EDF.grad, lambda: hf.experts.down_proj.grad)})


@pytest.mark.parametrize("groups,topk_group", [(1, 1), (4, 2)])
def test_matches_transformers_deepseek_v3_moe_with_shared_experts(groups, topk_group):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    n_shared = 2  # DeepSeek-V3's shared width is moe_intermediate_size * n_shared_experts
    hf_cfg = DeepseekV3Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, moe_intermediate_size=F,
                              n_shared_experts=n_shared, n_group=groups, topk_group=topk_group,
                              routed_scaling_factor=2.5, norm_topk_prob=True)
    hf = DeepseekV3MoE(hf_cfg).float()
    _randomise(hf, seed=2)
    hf.gate.e_score_correction_bias.copy_(torch.randn(E, generator=torch.Generator().manual_seed(4)) * 0.05)
    ours = _layer(shared_expert_ffn_hidden_size=F * n_shared, score_function="sigmoid", expert_bias=True,
                  routed_scaling_factor=2.5, num_groups=groups, group_topk=topk_group)
    _copy_from_hf(ours, hf, "shared_experts")
    ours.router.expert_bias.copy_(hf.gate.e_score_correction_bias)
    assert ours.shared_expert_gate is None
    _check_same(ours, hf, {
        "shared_expert.gate_proj": (lambda: ours.shared_expert.gate_proj.weight.grad,
                                    lambda: hf.shared_experts.gate_proj.weight.grad),
        "router": (lambda: ours.router.weight.grad, lambda: hf.gate.weight.grad)})


def test_parameter_names_follow_qwen2_moe_and_default_has_none():
    names = {n for n, _ in _layer(shared_expert_ffn_hidden_size=FS, shared_expert_gate=True).named_parameters()}
    assert {"shared_expert.gate_proj.weight", "shared_expert.up_proj.weight", "shared_expert.down_proj.weight",
            "shared_expert_gate.weight"} <= names
    plain = _layer()
    assert plain.shared_expert is None and plain.shared_expert_gate is None
    assert not any(n.startswith("shared") for n, _ in plain.named_parameters())
    ungated = _layer(shared_expert_ffn_hidden_size=FS)
    assert ungated.shared_expert.down_proj.weight.shape == (D, FS) and ungated.shared_expert_gate is None


def test_gate_without_shared_expert_is_a_config_error_naming_the_key():
    with pytest.raises(ValueError, match="moe.shared_expert_gate=true needs a shared expert: set "
                                         "moe.shared_expert_ffn_hidden_size > 0"):
        MoEConfig(shared_expert_gate=True).validate(ModelConfig())
    MoEConfig(shared_expert_ffn_hidden_size=8, shared_expert_gate=True).validate(ModelConfig())


def _hand_written_mone_shared(x_TD, w_gate_FD, w_up_FD, w_down_DF, keep_k, score):
    """MoNE in a SwiGLU FFN, the plain way: per token rank the neurons by |silu(g)| (post_act) or |g| (pre_act),
    larger first and the lower index first among equals, keep the first keep_k, zero the others' activations."""
    g_TF, u_TF = x_TD @ w_gate_FD.T, x_TD @ w_up_FD.T
    s_TF = (torch.nn.functional.silu(g_TF) if score == "post_act" else g_TF).abs()
    rows = []
    for t in range(x_TD.shape[0]):
        order = sorted(range(g_TF.shape[1]), key=lambda f: (-float(s_TF[t, f]), f))[:keep_k]
        keep = torch.zeros(g_TF.shape[1], dtype=torch.bool)
        keep[order] = True
        rows.append(torch.where(keep, torch.nn.functional.silu(g_TF[t]) * u_TF[t], 0.0))
    return torch.stack(rows) @ w_down_DF.T


@pytest.mark.parametrize("score", ["post_act", "pre_act"])
def test_mone_in_the_shared_expert_keeps_each_tokens_top_neurons(score):
    """moe.mone.shared_experts: the shared expert keeps round(keep_ratio * FS) neurons per token (4 of 10 here),
    the routed experts' rule; output and gradients equal the hand-written reference, and the dropped neurons get
    exactly zero gradient."""
    from moe_core.config import MoNEConfig

    layer = _layer(shared_expert_ffn_hidden_size=FS, mone=MoNEConfig(enabled=True, keep_ratio=0.4, score=score,
                                                                      shared_experts=True)).train()
    _randomise(layer, 3)
    assert layer.shared_expert.keep_k == 4 and layer.experts.keep_k == 2  # round(0.4 * FS), round(0.4 * F)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(4))
    shared = layer.shared_expert
    weights = [getattr(shared, p).weight for p in ("gate_proj", "up_proj", "down_proj")]
    ref_weights = [w.detach().clone().requires_grad_(True) for w in weights]
    y, y_ref = layer._shared_output(x), _hand_written_mone_shared(x, *ref_weights, 4, score)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y, SwiGLUMLP.forward(shared, x), atol=1e-3)  # the selection changed the output
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    for w, w_ref in zip(weights, ref_weights):
        torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)
    shared.zero_grad()
    shared(x[:1]).sum().backward()  # one token: exactly its 4 kept neurons' weights get a gradient
    assert (shared.up_proj.weight.grad != 0).any(dim=1).sum() == 4


def test_mone_shared_experts_needs_mone_and_a_shared_expert():
    from moe_core.config import MoNEConfig

    for cfg in (dict(mone=MoNEConfig(shared_experts=True), shared_expert_ffn_hidden_size=8),
                dict(mone=MoNEConfig(enabled=True, shared_experts=True))):
        with pytest.raises(ValueError, match=r"moe.mone.shared_experts=true needs moe.mone.enabled=true and a shared "
                                             r"expert \(moe.shared_expert_ffn_hidden_size > 0\)"):
            MoEConfig(**cfg).validate(ModelConfig())
    MoEConfig(shared_expert_ffn_hidden_size=8, mone=MoNEConfig(enabled=True, shared_experts=True)).validate(
        ModelConfig())
    assert type(_layer(shared_expert_ffn_hidden_size=FS, mone=MoNEConfig(enabled=True)).shared_expert) is SwiGLUMLP
