"""M-MoE k schedule: rank-independent draws, per layer/step variation, distributions, eval k, k_min=k_max."""
import copy
import warnings

import pytest
import torch

from moe_core.config import MatryoshkaConfig, MoEConfig
from moe_core.layer import MoELayer
from moe_core.matryoshka import KSchedule, k_probabilities

STEPS = 3000


def _cfg(**mm) -> MoEConfig:
    return MoEConfig(num_experts=8, top_k=2, expert_ffn_hidden_size=16,
                     matryoshka=MatryoshkaConfig(**{"enabled": True, "k_min": 1, "k_max": 4, **mm}))


def test_independent_instances_agree_and_draws_vary_over_layers_and_steps():
    a, b = KSchedule(_cfg(), seed=7), KSchedule(_cfg(), seed=7)  # what two ranks would build
    draws_a = [[a.k_for(layer, step, training=True) for step in range(40)] for layer in range(3)]
    assert draws_a == [[b.k_for(layer, step, training=True) for step in range(40)] for layer in range(3)]
    assert all(len(set(row)) > 1 for row in draws_a)  # re-drawn every step
    assert draws_a[0] != draws_a[1] != draws_a[2]  # each layer has its own draw
    other_seed = KSchedule(_cfg(), seed=8)
    assert draws_a[0] != [other_seed.k_for(0, step, training=True) for step in range(40)]


def _chi_square(observed, expected_P) -> float:
    expected = torch.tensor(expected_P, dtype=torch.float64) * STEPS
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("mm, expected", [
    ({"distribution": "uniform"}, [0.25, 0.25, 0.25, 0.25]),
    ({"distribution": "capacity", "tau": 0.5}, [1 / 30, 4 / 30, 9 / 30, 16 / 30]),  # P(k) ∝ k^(1/tau) = k^2
])
def test_draw_distribution(mm, expected):
    torch.testing.assert_close(k_probabilities(1, 4, mm["distribution"], mm.get("tau", 1.0)),
                               torch.tensor(expected, dtype=torch.float64))
    sched = KSchedule(_cfg(**mm), seed=3)
    ks = torch.tensor([sched.k_for(0, step, training=True) for step in range(STEPS)])
    observed = torch.bincount(ks - 1, minlength=4).double()
    assert observed.sum() == STEPS  # every draw is inside [k_min, k_max]
    assert _chi_square(observed, expected) < 16.27  # chi-square, 3 dof, p = 0.001
    wrong = [0.25] * 4 if mm["distribution"] == "capacity" else [1 / 30, 4 / 30, 9 / 30, 16 / 30]
    assert _chi_square(observed, wrong) > 100  # the check can tell the two distributions apart


def test_k_without_matryoshka_and_eval_k_precedence():
    plain = MoEConfig(num_experts=8, top_k=2)
    assert KSchedule(plain, 0).k_for(0, 5, training=True) == 2
    assert KSchedule(plain, 0).k_for(0, 5, training=False) == 2
    assert KSchedule(_cfg(), 0).k_for(0, 5, training=False) == 4  # k_max
    sched = KSchedule(_cfg(eval_k=[1, 3]), 0, moe_layers=[1, 3])  # layers 0 and 2 are dense
    assert [sched.k_for(layer, 0, training=False) for layer in (1, 3)] == [1, 3]
    sched.set_eval_k(5)
    assert sched.k_for(3, 0, training=False) == 5
    assert 1 <= sched.k_for(3, 0, training=True) <= 4  # eval k never affects training
    sched.set_eval_k(None)
    assert sched.k_for(3, 0, training=False) == 3
    with pytest.raises(ValueError, match="not among the MoE layers"):
        sched.k_for(2, 0, training=False)


def test_eval_k_validation():
    sched = KSchedule(_cfg(), 0, moe_layers=[0, 1])
    with pytest.raises(ValueError, match="k=9"):
        sched.set_eval_k(9)
    with pytest.raises(ValueError, match="gives 3 values"):
        sched.set_eval_k([1, 2, 3])
    with pytest.raises(ValueError, match="k_max"):
        KSchedule(_cfg(k_min=3, k_max=2), 0)
    unmapped = KSchedule(_cfg(), 0)
    unmapped.set_eval_k([2, 3])
    with pytest.raises(ValueError, match="one k per MoE layer"):
        unmapped.k_for(2, 0, training=False)


def test_fixed_k_matryoshka_equals_plain_top_k_layer():
    plain_cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=16, norm_topk_prob=False)
    mm_cfg = copy.deepcopy(plain_cfg)  # the same gate rule (Matryoshka's default is raw probabilities)
    mm_cfg.matryoshka = MatryoshkaConfig(enabled=True, k_min=2, k_max=2)
    torch.manual_seed(0)
    plain = MoELayer(8, plain_cfg, 0, KSchedule(plain_cfg, 1))
    matry = MoELayer(8, mm_cfg, 0, KSchedule(mm_cfg, 1))
    matry.load_state_dict(plain.state_dict())
    x = torch.randn(6, 8)
    outs = []
    for layer in (plain, matry):
        layer.set_step(11)
        y = layer(x)
        y.square().sum().backward()
        outs.append((y, [p.grad for p in layer.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def test_layer_routes_with_the_drawn_k():
    cfg = _cfg()
    layer = MoELayer(8, cfg, 2, KSchedule(cfg, 5))
    x = torch.randn(10, 8)
    for step in range(6):
        layer.set_step(step)
        layer(x)
        k = KSchedule(cfg, 5).k_for(2, step, training=True)
        assert layer.last_stats.k == k and int(layer.last_stats.tokens_per_expert_E.sum()) == 10 * k
    layer.eval()
    layer.k_schedule.set_eval_k(3)
    layer(x)
    assert layer.last_stats.k == 3


def test_capacity_distribution_is_finite_for_small_tau():
    # tau = 0.005, k_max = 64: k^(1/tau) = 64^200 overflows fp64 (inf / inf = NaN) unless computed in log space
    probs = k_probabilities(1, 64, "capacity", 0.005)
    assert torch.isfinite(probs).all() and probs.sum().item() == pytest.approx(1.0)
    assert probs[62].item() / probs[63].item() == pytest.approx((63 / 64) ** 200, rel=1e-9)
    cfg = MoEConfig(num_experts=64, top_k=2, expert_ffn_hidden_size=16,
                    matryoshka=MatryoshkaConfig(enabled=True, k_min=1, k_max=64, distribution="capacity", tau=0.005))
    assert {KSchedule(cfg, 0).k_for(0, step, training=True) for step in range(50)} <= set(range(58, 65))


def test_loop_without_set_step_draws_a_new_k_per_forward_and_warns_once():
    cfg = _cfg()
    torch.manual_seed(0)
    layer = MoELayer(8, cfg, 0, KSchedule(cfg, seed=1))
    with pytest.warns(UserWarning, match="without MoELayer.set_step") as record:
        ks = []
        for _ in range(20):
            layer(torch.randn(5, 8))
            ks.append(layer.last_stats.k)
    assert len([w for w in record if "set_step" in str(w.message)]) == 1
    # call n uses step n's draw (was: the step-0 k on every call)
    assert ks == [KSchedule(cfg, seed=1).k_for(0, step, training=True) for step in range(20)]
    assert len(set(ks)) > 1
    layer.set_step(7)  # once set, the step decides, and no further warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(5, 8))
        layer(torch.randn(5, 8))
    assert layer.last_stats.k == KSchedule(cfg, seed=1).k_for(0, 7, training=True)
    layer.eval()
    layer(torch.randn(5, 8))
    assert layer.last_stats.k == 4  # evaluation: k_max, untouched by the counter


def test_eval_k_outside_the_trained_range_warns_once_naming_it():
    sched = KSchedule(_cfg(), 0)  # trained k in [1, 4]
    with pytest.warns(UserWarning, match=r"k=8 is outside .* k in \[1, 4\]"):
        sched.set_eval_k(8)
    assert sched.k_for(0, 0, training=False) == 8  # allowed (elastic inference), just not silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.set_eval_k(8)  # once per value
        sched.set_eval_k([2, 3])  # inside the range: no warning
    with pytest.warns(UserWarning, match=r"k=3 is outside .* k = 2 \(moe.top_k\)"):
        KSchedule(MoEConfig(num_experts=8, top_k=2), 0).set_eval_k(3)
