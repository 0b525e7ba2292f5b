"""TopKRouter: top-k + renormalisation, capacity dropping, aux/z losses and expert bias vs hand-computed values."""
import math

import pytest
import torch

from moe_core.config import MoEConfig
from moe_core.router import TopKRouter


def _identity_router(num_experts: int, **cfg) -> TopKRouter:
    """Router whose logits equal the input (weight = I), so tests can write logits directly."""
    router = TopKRouter(num_experts, num_experts, MoEConfig(num_experts=num_experts, **cfg))
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
    return router


def _logits_from_probs(rows):
    return torch.log(torch.tensor(rows, dtype=torch.float32))


def test_topk_renormalised_weights_and_losses_match_hand_computation():
    router = _identity_router(3, aux_loss_coeff=0.01, z_loss_coeff=0.001)
    # token 0: p = [4, 2, 1] / 7 -> top-2 {0, 1}, weights 4/6, 2/6; token 1: p = [1, 3, 2] / 6 -> {1, 2}, 3/5, 2/5
    x = _logits_from_probs([[4.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    out = router(x, k=2)
    assert out.topk_idx_TK.tolist() == [[0, 1], [1, 2]]
    torch.testing.assert_close(out.topk_weight_TK, torch.tensor([[2 / 3, 1 / 3], [3 / 5, 2 / 5]]))
    assert out.topk_weight_TK.dtype == torch.float32 and out.topk_idx_TK.dtype == torch.int64
    assert out.tokens_per_expert_E.tolist() == [1, 2, 1]
    # f = counts / (T*k) = [1, 2, 1] / 4; P = mean probs = [31, 33, 20] / 84; aux = E * sum f*P = 3 * 117 / 336
    torch.testing.assert_close(out.aux_loss, torch.tensor(0.01 * 3 * 117 / 336))
    # logsumexp of the logits: log 7 and log 6 (probabilities were unnormalised counts)
    torch.testing.assert_close(out.z_loss, torch.tensor(0.001 * (math.log(7) ** 2 + math.log(6) ** 2) / 2))


def test_balanced_routing_gives_aux_loss_equal_to_coeff():
    router = _identity_router(2, aux_loss_coeff=0.5)
    out = router(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), k=1)
    # counts [2, 2] and mean probs [0.5, 0.5]: E * sum(0.5 * 0.5) = 1
    torch.testing.assert_close(out.aux_loss, torch.tensor(0.5))


def test_capacity_factor_drops_lowest_probability_tokens():
    router = _identity_router(2, capacity_factor=1.0)  # capacity = ceil(1.0 * 4 tokens * k=1 / 2 experts) = 2
    p0 = [0.6, 0.9, 0.7, 0.8]  # all four prefer expert 0; it keeps tokens 1 (0.9) and 3 (0.8)
    out = router(_logits_from_probs([[p, 1 - p] for p in p0]), k=1)
    assert out.topk_idx_TK.flatten().tolist() == [-1, 0, -1, 0]
    assert out.topk_weight_TK.flatten().tolist() == [0.0, 1.0, 0.0, 1.0]
    assert out.tokens_per_expert_E.tolist() == [4, 0]  # counted before dropping


def test_capacity_keeps_everything_when_it_fits():
    router = _identity_router(2, capacity_factor=2.0)  # capacity 4 >= every expert's load
    out = router(_logits_from_probs([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1]]), k=1)
    assert out.topk_idx_TK.flatten().tolist() == [0, 1, 0]


def test_expert_bias_changes_selection_but_not_weight_renormalisation():
    router = _identity_router(3, expert_bias=True)
    x = _logits_from_probs([[4.0, 2.0, 1.0]])
    assert router(x, k=2).topk_idx_TK.tolist() == [[0, 1]]
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    out = router(x, k=2)
    assert sorted(out.topk_idx_TK[0].tolist()) == [0, 2]
    weight_of = dict(zip(out.topk_idx_TK[0].tolist(), out.topk_weight_TK[0].tolist()))
    # weights come from the unbiased probabilities 4/7 and 1/7 renormalised: 4/5 and 1/5
    assert weight_of[0] == pytest.approx(0.8) and weight_of[2] == pytest.approx(0.2)


def test_expert_bias_stays_exact_fp32_when_the_model_is_cast():
    router = _identity_router(3, expert_bias=True)
    router.expert_bias.copy_(torch.tensor([1e-3, 1.0 + 1e-3, -2e-3]))
    before = router.expert_bias.clone()
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.expert_bias.dtype == torch.float32 and torch.equal(router.expert_bias, before)
    assert "expert_bias" in dict(router.named_buffers())


def test_meta_built_router_materialises_with_fp32_bias():
    with torch.device("meta"):
        router = TopKRouter(4, 3, MoEConfig(num_experts=3, expert_bias=True))
    router = router.to(torch.bfloat16).to_empty(device="cpu")
    assert router.weight.device.type == "cpu" and router.weight.dtype == torch.bfloat16
    assert router.expert_bias.device.type == "cpu" and router.expert_bias.dtype == torch.float32


def test_expert_bias_off_ignores_buffer():
    router = _identity_router(3)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 10.0]))
    assert router(_logits_from_probs([[4.0, 2.0, 1.0]]), k=1).topk_idx_TK.tolist() == [[0]]


def test_update_expert_bias_is_sign_based():
    router = _identity_router(3, expert_bias=True, expert_bias_update_rate=0.1)
    router.update_expert_bias(torch.tensor([10, 2, 3]))  # mean 5: overloaded expert 0 goes down, others up
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1]))
    with pytest.raises(ValueError, match="shape"):
        router.update_expert_bias(torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="expert_bias"):
        _identity_router(3).update_expert_bias(torch.tensor([1, 2, 3]))


def test_router_math_is_fp32_for_bf16_inputs_and_grads_flow():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, MoEConfig(num_experts=4))
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(x, k=2)
    assert out.topk_weight_TK.dtype == torch.float32 and out.aux_loss.dtype == torch.float32
    torch.testing.assert_close(out.topk_weight_TK.sum(-1), torch.ones(5))
    (out.topk_weight_TK[:, 0].sum() + out.aux_loss + out.z_loss).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_router_rejects_bad_k_and_shapes():
    router = TopKRouter(8, 4, MoEConfig(num_experts=4))
    with pytest.raises(ValueError, match="k=5"):
        router(torch.randn(3, 8), k=5)
    with pytest.raises(ValueError, match="shape"):
        router(torch.randn(3, 7), k=1)
