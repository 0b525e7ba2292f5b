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
    # a top-2 model routed at k=1 keeps its renormalised scale: the value 1.0 (0 where dropped)
    torch.testing.assert_close(out.topk_weight_TK.flatten(), torch.tensor([0.0, 1.0, 0.0, 1.0]))
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


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_gate_weights_follow_norm_topk_prob(norm_topk_prob):
    router = _identity_router(3, norm_topk_prob=norm_topk_prob)
    x = _logits_from_probs([[4.0, 2.0, 1.0], [1.0, 3.0, 2.0]])  # p = [4, 2, 1] / 7 and [1, 3, 2] / 6
    top2 = router(x, k=2).topk_weight_TK
    want2 = [[2 / 3, 1 / 3], [3 / 5, 2 / 5]] if norm_topk_prob else [[4 / 7, 2 / 7], [3 / 6, 2 / 6]]
    torch.testing.assert_close(top2, torch.tensor(want2))
    # k = 1: renormalised models keep their scale (1.0), raw-probability models their raw p
    want1 = [[1.0], [1.0]] if norm_topk_prob else [[4 / 7], [3 / 6]]
    torch.testing.assert_close(router(x, k=1).topk_weight_TK, torch.tensor(want1))


@pytest.mark.parametrize("matryoshka,norm,top_k,top1_gate,renormalised", [
    (False, None, 2, "probability", True), (True, None, 2, "probability", False), (True, True, 2, "probability", True),
    (False, None, 1, "probability", False), (False, None, 1, "straight_through", True),
    (False, False, 1, "straight_through", False)])
def test_which_models_renormalise_their_gates(matryoshka, norm, top_k, top1_gate, renormalised):
    from moe_core.config import MatryoshkaConfig

    cfg = MoEConfig(num_experts=4, top_k=top_k, norm_topk_prob=norm, top1_gate=top1_gate,
                    matryoshka=MatryoshkaConfig(enabled=matryoshka, k_min=1, k_max=4))
    assert cfg.renormalise_gates is renormalised


def test_straight_through_k1_gate_is_one_with_the_gradient_of_log_p():
    router = _identity_router(3, top_k=1, top1_gate="straight_through")
    x = _logits_from_probs([[4.0, 2.0, 1.0], [1.0, 3.0, 2.0]]).requires_grad_(True)
    out = router(x, k=1)
    torch.testing.assert_close(out.topk_weight_TK, torch.ones(2, 1))
    out.topk_weight_TK.sum().backward()
    # d log p_e / d logits = onehot(e) - p
    want = torch.tensor([[1 - 4 / 7, -2 / 7, -1 / 7], [-1 / 6, 1 - 3 / 6, -2 / 6]])
    torch.testing.assert_close(x.grad, want)


def test_k1_router_gets_language_model_gradient():
    """Aux and z losses off: the LM-loss gradient reaching the router at k=1 equals that of
    ``sum_t p_t[e_t] * <Expert_e_t(x_t), dy_t>`` (the gate is the raw probability) and is far from zero; with
    renormalisation the gate is the constant 1.0 and this gradient vanishes."""
    from moe_core.experts import swiglu_reference
    from moe_core.layer import MoELayer
    from moe_core.matryoshka import KSchedule

    cfg = MoEConfig(num_experts=4, top_k=1, expert_ffn_hidden_size=8, aux_loss_coeff=0.0, z_loss_coeff=0.0)
    torch.manual_seed(0)
    layer = MoELayer(6, cfg, 0, KSchedule(cfg, 0))
    layer.experts.reset_parameters(std=0.5)
    x, dy = torch.randn(10, 6), torch.randn(10, 6)
    (layer(x) * dy).sum().backward()
    ex = layer.experts
    w = layer.router.weight.detach().clone().requires_grad_(True)
    probs = torch.softmax(x @ w.T, dim=-1)
    idx = probs.argmax(-1)
    with torch.no_grad():
        expert_out = torch.stack([swiglu_reference(x[t:t + 1], torch.tensor([1]), ex.w_gate_EFD[e:e + 1], ex.w_up_EFD[e:e + 1],
                                                   ex.w_down_EDF[e:e + 1])[0] for t, e in enumerate(idx.tolist())])
    (probs.gather(1, idx[:, None])[:, 0] * (expert_out * dy).sum(-1)).sum().backward()
    torch.testing.assert_close(layer.router.weight.grad, w.grad, rtol=1e-4, atol=1e-6)
    assert w.grad.abs().max() > 1e-2


def test_no_tokens_gives_zero_losses_and_zero_gradient():
    router = TopKRouter(8, 4, MoEConfig(num_experts=4, aux_loss_coeff=0.5, z_loss_coeff=0.5, capacity_factor=1.0))
    out = router(torch.randn(0, 8, requires_grad=True), k=2)
    assert out.aux_loss.item() == 0.0 and out.z_loss.item() == 0.0  # was NaN (mean over no tokens)
    (out.aux_loss + out.z_loss).backward()
    assert torch.equal(router.weight.grad, torch.zeros(4, 8))


def _one_sided_router(scope: str):
    """E=2, k=1: inputs along +u route to expert 0, along -u to expert 1 (p about 0.98 for the chosen one)."""
    from moe_core.config import MoEConfig
    from moe_core.router import TopKRouter

    torch.manual_seed(0)
    router = TopKRouter(4, 2, MoEConfig(num_experts=2, top_k=1, aux_loss_coeff=0.5, aux_loss_scope=scope))
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[2.0, 0, 0, 0], [-2.0, 0, 0, 0]]))
    u = torch.zeros(8, 4)
    u[:, 0] = 1.0
    return router.train(), u, -u


def test_global_batch_aux_loss_balances_over_the_steps_micro_batches():
    # two micro-batches of one step, each fully one-sided, balanced together
    values = {}
    for scope in ("micro_batch", "global_batch"):
        router, mb1, mb2 = _one_sided_router(scope)
        router.start_step()
        values[scope] = [float(router(mb, 1).aux_loss) for mb in (mb1, mb2)]
    p_chosen = torch.softmax(torch.tensor([2.0, -2.0]), 0)[0].item()
    # micro_batch: f = (1, 0) on its own expert -> coeff * E * p_chosen (imbalanced) for both micro-batches
    assert values["micro_batch"] == pytest.approx([0.5 * 2 * p_chosen] * 2)
    # global_batch: micro-batch 2 sees both (f = (1/2, 1/2)) -> coeff * E * 1/2 * (p0 + p1) = coeff, the balanced value
    assert values["global_batch"][0] == pytest.approx(0.5 * 2 * p_chosen)
    assert values["global_batch"][1] == pytest.approx(0.5)


def test_global_batch_counts_restart_every_step():
    router, mb1, mb2 = _one_sided_router("global_batch")
    router.start_step()
    router(mb1, 1)
    router.start_step()
    assert float(router(mb2, 1).aux_loss) == pytest.approx(float(_one_sided_router("micro_batch")[0](mb2, 1).aux_loss))
