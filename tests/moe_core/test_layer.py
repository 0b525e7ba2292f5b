"""MoELayer + LocalDispatcher vs an explicit per-token loop reference; AuxLossAutoScaler; stats and errors."""
import copy

import pytest
import torch
import torch.nn.functional as F

from moe_core.config import MoEConfig, MoNEConfig
from moe_core.aux_loss import AuxLossAutoScaler
from moe_core.dispatcher import dispatch_compute_combine
from moe_core.layer import LocalDispatcher, MoELayer
from moe_core.matryoshka import KSchedule

D = 8


@pytest.fixture(autouse=True)
def _reset_aux_scale():
    yield
    AuxLossAutoScaler.set_loss_scale(1.0)


def _layer(**cfg) -> MoELayer:
    moe = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 16, **cfg})
    torch.manual_seed(0)
    return MoELayer(D, moe, layer_idx=0, k_schedule=KSchedule(moe, seed=0))


def _expert(layer: MoELayer, e: int, x_D: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    return ex.w_down_EDF[e] @ (F.silu(ex.w_gate_EFD[e] @ x_D) * (ex.w_up_EFD[e] @ x_D))


def _loop_reference(layer: MoELayer, x_TD: torch.Tensor, k: int):
    """Token by token: softmax router, top-k, renormalise, weighted expert sum; losses from their definitions."""
    cfg, E = layer.cfg, layer.cfg.num_experts
    ys, probs, counts, lse = [], [], [0] * E, []
    for x_D in x_TD:
        logits_E = layer.router.weight @ x_D
        p_E = torch.softmax(logits_E, -1)
        chosen = sorted(range(E), key=lambda e: -float(p_E[e]))[:k]
        total = sum(p_E[e] for e in chosen)
        ys.append(sum(p_E[e] / total * _expert(layer, e, x_D) for e in chosen))
        probs.append(p_E)
        lse.append(torch.logsumexp(logits_E, -1))
        for e in chosen:
            counts[e] += 1
    T = x_TD.shape[0]
    mean_p_E = torch.stack(probs).mean(0)
    aux = cfg.aux_loss_coeff * E * sum(counts[e] / (T * k) * mean_p_E[e] for e in range(E))
    z = cfg.z_loss_coeff * torch.stack(lse).square().mean()
    return torch.stack(ys), aux + z


def _params_and_grads(layer):
    return {n: p.grad.clone() for n, p in layer.named_parameters()}


def test_layer_matches_per_token_loop_reference_outputs_and_grads():
    layer = _layer(aux_loss_coeff=0.1, z_loss_coeff=0.01)
    ref = copy.deepcopy(layer)
    x = torch.randn(2, 5, D)
    grad_out = torch.randn(2, 5, D)
    x_layer, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(x_layer)
    y.backward(grad_out)  # the aux/z-loss gradient arrives through AuxLossAutoScaler (scale 1)
    y_ref, aux_ref = _loop_reference(ref, x_ref.reshape(-1, D), k=2)
    ((y_ref * grad_out.reshape(-1, D)).sum() + aux_ref).backward()
    assert y.shape == x.shape
    torch.testing.assert_close(y.reshape(-1, D), y_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x_layer.grad.reshape(-1, D), x_ref.grad.reshape(-1, D), atol=1e-6, rtol=1e-5)
    ref_grads = _params_and_grads(ref)
    for name, grad in _params_and_grads(layer).items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(layer.last_stats.aux_loss + layer.last_stats.z_loss, aux_ref.detach())


def test_local_dispatcher_with_dropped_slots_matches_loop():
    layer = _layer()
    x_TD = torch.randn(4, D)
    idx_TK = torch.tensor([[3, 0], [1, -1], [-1, -1], [2, 3]])
    w_TK = torch.tensor([[0.6, 0.4], [1.0, 0.0], [0.0, 0.0], [0.3, 0.7]])
    y = dispatch_compute_combine(LocalDispatcher(), x_TD, idx_TK, w_TK, layer.experts)
    expected = torch.stack([sum((w_TK[t, j] * _expert(layer, int(idx_TK[t, j]), x_TD[t])
                                 for j in range(2) if idx_TK[t, j] >= 0), torch.zeros(D)) for t in range(4)])
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-5)


def test_aux_loss_autoscaler_injects_scaled_gradient():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    out = torch.tensor([3.0, 4.0], requires_grad=True)
    AuxLossAutoScaler.set_loss_scale(0.25)
    y = AuxLossAutoScaler.apply(out, (w ** 2).sum())
    assert torch.equal(y, out)
    y.backward(torch.tensor([5.0, 6.0]))
    assert out.grad.tolist() == [5.0, 6.0]
    assert w.grad.tolist() == [0.25 * 2.0, 0.25 * -4.0]  # scale * d(sum w^2)/dw


def test_layer_aux_gradient_follows_loss_scale():
    def router_grad(scale):
        layer = _layer(aux_loss_coeff=1.0, z_loss_coeff=0.0)
        AuxLossAutoScaler.set_loss_scale(scale)
        (layer(torch.randn(6, D, generator=torch.Generator().manual_seed(1))) * 0).sum().backward()
        return layer.router.weight.grad  # only the aux loss reaches the router (the main loss is zeroed)

    g1, g_half = router_grad(1.0), router_grad(0.5)
    assert g1.abs().sum() > 0
    torch.testing.assert_close(g_half, 0.5 * g1)


def test_eval_mode_attaches_no_aux_loss():
    layer = _layer(aux_loss_coeff=1.0).eval()
    (layer(torch.randn(6, D)) * 0).sum().backward()
    assert layer.router.weight.grad.abs().sum() == 0


def test_last_stats_with_capacity_and_mone():
    layer = _layer(capacity_factor=0.5, mone=MoNEConfig(enabled=True, keep_ratio=0.25))
    layer(torch.randn(10, D))
    stats = layer.last_stats
    assert stats.k == 2 and stats.tokens_per_expert_E.shape == (4,)
    assert int(stats.tokens_per_expert_E.sum()) == 20  # counted before dropping
    # capacity = ceil(0.5 * 10 * 2 / 4) = 3 slots per expert: at least 20 - 12 slots are dropped
    assert int(stats.dropped_slots) >= 8
    assert stats.mone_kept_fraction == 0.25
    assert not stats.tokens_per_expert_E.requires_grad


def test_bf16_layer_keeps_dtype():
    layer = _layer().to(torch.bfloat16)
    y = layer(torch.randn(3, 4, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 4, D) and torch.isfinite(y.float()).all()


def test_update_expert_bias_through_layer_changes_routing():
    layer = _layer(expert_bias=True, expert_bias_update_rate=1.0)
    x = torch.randn(16, D)
    layer(x)
    busiest = int(layer.last_stats.tokens_per_expert_E.argmax())
    layer.update_expert_bias(layer.last_stats.tokens_per_expert_E)
    layer(x)
    assert int(layer.last_stats.tokens_per_expert_E[busiest]) == 0  # a bias of -1 outweighs any probability


def test_wrong_hidden_size_is_reported():
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        _layer()(torch.randn(3, 7))


@pytest.mark.parametrize("mone", [False, True])
def test_micro_batch_without_tokens_gives_zero_losses_and_finite_zero_gradients(mone):
    """A pipeline chunk or EP rank with no tokens: aux and z losses were NaN (a mean over no tokens) and poisoned
    every router gradient through the aux-loss injection."""
    cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=16, capacity_factor=1.0,
                    mone=MoNEConfig(enabled=mone, backend="torch"))
    layer = MoELayer(8, cfg, 0, KSchedule(cfg, 0))
    y = layer(torch.randn(0, 8, requires_grad=True))
    y.sum().backward()
    assert y.shape == (0, 8)
    assert layer.last_stats.aux_loss.item() == 0.0 and layer.last_stats.z_loss.item() == 0.0
    for p in layer.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))
