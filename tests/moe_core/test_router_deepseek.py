"""DeepSeek-V3-class routing (sigmoid scores, expert bias, scaling factor, group-limited selection, sequence-wise
balance loss) against hand-computed values and against transformers' DeepseekV3TopkRouter."""
import math

import pytest
import torch

from moe_core.config import MoEConfig
from moe_core.router import TopKRouter, sequence_aux_loss


def _router(scores, **cfg) -> tuple[TopKRouter, torch.Tensor]:
    """A router over E = len(scores) experts whose sigmoid scores for the one-hot token x are ``scores``."""
    cfg = MoEConfig(**{"num_experts": len(scores), "score_function": "sigmoid", "aux_loss_coeff": 0.0,
                       "z_loss_coeff": 0.0, **cfg})
    router = TopKRouter(len(scores), len(scores), cfg)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = torch.logit(torch.tensor(scores, dtype=torch.float64)).float()
    x = torch.zeros(1, len(scores))
    x[0, 0] = 1.0
    return router, x


def test_group_limited_selection_picks_the_best_groups_by_their_top_two_scores():
    # groups {0, 1} (top-2 sum 1.0) and {2, 3} (1.5): expert 0 has the highest score, but its group loses
    scores = [0.9, 0.1, 0.8, 0.7]
    plain, x = _router(scores, top_k=2)
    assert sorted(plain(x, 2).topk_idx_TK[0].tolist()) == [0, 2]
    grouped, x = _router(scores, top_k=2, num_groups=2, group_topk=1)
    out = grouped(x, 2)
    assert sorted(out.topk_idx_TK[0].tolist()) == [2, 3]
    torch.testing.assert_close(out.topk_weight_TK[0].sort().values, torch.tensor([0.7 / 1.5, 0.8 / 1.5]))


def test_expert_bias_changes_the_choice_not_the_gate():
    router, x = _router([0.6, 0.5, 0.2, 0.1], top_k=2, expert_bias=True)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.45]))  # biased: 0.6, 0.5, 0.2, 0.55
    out = router(x, 2)
    idx, w = out.topk_idx_TK[0].tolist(), out.topk_weight_TK[0].tolist()
    assert sorted(idx) == [0, 3]
    gates = dict(zip(idx, w))  # renormalised unbiased scores
    assert gates[0] == pytest.approx(0.6 / 0.7) and gates[3] == pytest.approx(0.1 / 0.7)


def test_routed_scaling_factor_multiplies_after_normalisation():
    router, x = _router([0.6, 0.5, 0.2, 0.1], top_k=2, routed_scaling_factor=2.5)
    w = router(x, 2).topk_weight_TK[0]
    assert w.sum().item() == pytest.approx(2.5) and sorted(w.tolist()) == pytest.approx([2.5 * 5 / 11, 2.5 * 6 / 11])
    raw, x = _router([0.6, 0.5, 0.2, 0.1], top_k=2, routed_scaling_factor=2.5, norm_topk_prob=False)
    assert sorted(raw(x, 2).topk_weight_TK[0].tolist()) == pytest.approx([1.25, 1.5])


def test_sequence_aux_loss_value_and_gradient_by_hand():
    # 2 sequences of 2 tokens, E = 2, K = 1
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1], [0.8, 0.2]], requires_grad=True)
    idx = torch.tensor([[0], [1], [0], [0]])
    loss = sequence_aux_loss(probs, idx, seq_len=2)
    # f = E/(K*S) * counts: seq 0 -> [1, 1], seq 1 -> [2, 0]; P = per-sequence mean of probs
    p0, p1 = [0.55, 0.45], [0.85, 0.15]
    expected = ((1 * p0[0] + 1 * p0[1]) + (2 * p1[0] + 0 * p1[1])) / 2
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    f = torch.tensor([[1.0, 1.0], [1.0, 1.0], [2.0, 0.0], [2.0, 0.0]])
    torch.testing.assert_close(probs.grad, f / (2 * 2))  # dL/dp_te = f_(seq of t),e / (B * S)


def test_sequence_aux_loss_is_one_when_balanced_and_zero_without_tokens():
    probs = torch.full((4, 4), 0.25)
    idx = torch.tensor([[0], [1], [2], [3]])
    assert sequence_aux_loss(probs, idx, 4).item() == pytest.approx(1.0)
    assert sequence_aux_loss(torch.zeros(0, 4), torch.zeros(0, 1, dtype=torch.long), 4).item() == 0.0
    with pytest.raises(ValueError, match="whole sequences"):
        sequence_aux_loss(probs, idx, 3)


def test_router_sequence_scope_uses_normalised_sigmoid_scores():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, score_function="sigmoid", aux_loss_scope="sequence",
                    aux_loss_coeff=1e-4, z_loss_coeff=0.0)
    router = TopKRouter(8, 4, cfg)
    router.reset_parameters(std=0.5)
    x = torch.randn(6, 8)
    out = router(x, 2, seq_len=3)
    s = torch.sigmoid(x @ router.weight.T)
    expected = sequence_aux_loss(s / s.sum(-1, keepdim=True), out.topk_idx_TK, 3) * 1e-4
    assert out.aux_loss.item() == pytest.approx(expected.item())
    assert out.aux_loss.item() != pytest.approx(router(x, 2, seq_len=6).aux_loss.item())  # per-sequence


@pytest.mark.parametrize("groups,topk_group", [(1, 1), (4, 2), (8, 3)])
def test_matches_transformers_deepseek_v3_router(groups, topk_group):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    E, D, K, T = 16, 12, 4, 40
    hf_cfg = DeepseekV3Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, n_group=groups,
                              topk_group=topk_group, routed_scaling_factor=2.5, norm_topk_prob=True)
    hf = DeepseekV3TopkRouter(hf_cfg)
    torch.manual_seed(3)
    torch.nn.init.normal_(hf.weight, std=0.4)
    hf.e_score_correction_bias.copy_(torch.randn(E) * 0.05)
    ours = TopKRouter(D, E, MoEConfig(num_experts=E, top_k=K, score_function="sigmoid", expert_bias=True,
                                      routed_scaling_factor=2.5, num_groups=groups, group_topk=topk_group))
    with torch.no_grad():
        ours.weight.copy_(hf.weight)
        ours.expert_bias.copy_(hf.e_score_correction_bias)
    x = torch.randn(T, D)
    _, hf_w, hf_idx = hf(x)
    out = ours(x, K)
    for t in range(T):
        mine = dict(zip(out.topk_idx_TK[t].tolist(), out.topk_weight_TK[t].tolist()))
        theirs = dict(zip(hf_idx[t].tolist(), hf_w[t].tolist()))
        assert mine.keys() == theirs.keys(), t
        assert all(math.isclose(mine[e], theirs[e], rel_tol=1e-5) for e in mine), t


@pytest.mark.parametrize("fields,message", [
    (dict(num_experts=8, num_groups=3), "moe.num_groups \\(3\\) must divide moe.num_experts \\(8\\)"),
    (dict(num_experts=8, num_groups=2, group_topk=3), "moe.group_topk \\(3\\) must be <= moe.num_groups"),
    (dict(num_experts=8, num_groups=4, group_topk=1, top_k=4), "routed to 4 experts .* hold only 2"),
    (dict(num_experts=8, num_groups=4, group_topk=2, top_k=2,
          matryoshka=dict(enabled=True, k_min=1, k_max=6)), "routed to 6 experts .* hold only 4"),
])
def test_group_limited_routing_config_errors_name_the_key(fields, message):
    from moe_core.config import MatryoshkaConfig
    from moe_core.model_config import ModelConfig

    if "matryoshka" in fields:
        fields = {**fields, "matryoshka": MatryoshkaConfig(**fields["matryoshka"])}
    with pytest.raises(ValueError, match=message):
        MoEConfig(**fields).validate(ModelConfig())


def test_moe_layer_gives_the_router_its_sequences():
    """[B, S, D] input: the sequence-wise loss is averaged over the B sequences of S tokens, not over one of B*S."""
    from moe_core.layer import MoELayer
    from moe_core.matryoshka import KSchedule

    cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=8, aux_loss_scope="sequence", z_loss_coeff=0.0)
    torch.manual_seed(0)
    layer = MoELayer(8, cfg, 0, KSchedule(cfg, 0)).train()
    layer.router.reset_parameters(std=0.5)
    x = torch.randn(3, 5, 8)
    layer.set_step(0)
    layer(x)
    per_sequence = layer.router(x.reshape(-1, 8), 2, seq_len=5).aux_loss
    assert layer.last_stats.aux_loss.item() == pytest.approx(per_sequence.item())
    assert per_sequence.item() != pytest.approx(layer.router(x.reshape(-1, 8), 2).aux_loss.item())
