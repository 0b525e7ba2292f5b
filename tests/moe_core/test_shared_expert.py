"""Shared experts (moe.shared_expert_ffn_hidden_size, moe.shared_expert_gate): MoELayer against transformers'
Qwen2MoeSparseMoeBlock (gated shared expert) and DeepseekV3MoE (ungated, sigmoid router with groups, bias and
scaling) with the weights copied, outputs and gradients; parameter names; config errors."""
import pytest
import torch

from moe_core.config import MoEConfig
from moe_core.model_config import ModelConfig
from moe_core.layer import MoELayer
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
