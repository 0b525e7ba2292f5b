"""AllToAllDispatcher: EP / TP / TPxEP MoE, MoNE, M-MoE and DeepSeek-V3-routed (sigmoid, groups, bias, shared
expert; also through LLEP, rebalanced and not) layers against the single-process MoELayer.

How the comparison works (float32, same seed and weights everywhere):
- Every rank builds the full single-device layer from one seed, then ``shard_moe_layer`` keeps its EP rank's
  experts and installs the dispatcher. The parent builds the same layer and runs the reference (LocalDispatcher).
- Data parallelism: dense DP rank ``d`` gets its own micro-batch ``x[d]`` (TP peers share it, as TP inputs are
  replicated). The router's aux/z losses are per micro-batch, so the reference runs each ``x[d]`` separately with
  the loss ``sum(y * g[d])``; the rank holding ``x[d]`` must reproduce that batch's output, input grad and router
  grad (with TP>1 on every TP rank: the router sees the whole replicated batch).
- Expert grads: an expert's owner rank computes the tokens every member of its EP group sent, and member (DP rank
  d, TP rank j) sends the j-th 1/tp slice of ``x[d]``. So the owner's grad must equal the sum, over the group's
  members, of the reference's grad with the loss restricted to that member's slice (``g[d]`` zeroed elsewhere:
  routing is unchanged and an expert's weights see the loss only through the outputs of the tokens it computed).
  Summing over TP peers / expert-DP ranks is a later, separate step (``parallel/optim/grads.py``), not the dispatcher's.
Two worlds are launched (2 and 4 ranks); each runs every layout of its size and every case in one go.
"""
import functools

import pytest
import torch

from moe_core.config import MatryoshkaConfig, MoEConfig, MoNEConfig
from moe_core.dispatcher import dispatch_compute_combine
from moe_core.layer import LocalDispatcher, MoELayer
from moe_core.matryoshka import KSchedule
from parallel.comm import SINGLE_PROCESS
from parallel.config import LLEPConfig
from parallel.dispatch import AllToAllDispatcher, shard_moe_layer
from parallel.llep.dispatcher import LLEPDispatcher
from tests.helpers.dist import run_distributed
from tests.helpers.moe_reference import device_pairs

SEED, H, FFN, E, T = 11, 16, 24, 8, 16  # T tokens per micro-batch (divisible by tp)
DEEPSEEK = {"score_function": "sigmoid", "num_groups": 4, "group_topk": 2, "expert_bias": True, "top_k": 3,
            "routed_scaling_factor": 2.5, "shared_expert_ffn_hidden_size": 12}
CASES = {  # name -> (MoEConfig overrides, training steps; M-MoE draws k per step)
    "moe": ({}, (0,)),
    "skew": ({}, (0,)),  # most routing slots go to experts 0 and 1 (both on EP rank 0)
    "capacity": ({"capacity_factor": 0.5}, (0,)),  # each expert keeps ceil(0.5*T*2/E) = 2 slots: many drops
    "mone": ({"mone": MoNEConfig(enabled=True, keep_ratio=0.5)}, (0,)),
    "mmoe": ({"matryoshka": MatryoshkaConfig(enabled=True, k_min=1, k_max=4)}, (0, 1, 2)),
    "e4": ({"num_experts": 4}, (0,)),  # at ep=4 one expert per rank: a token's slots all on distinct ranks
    # DeepSeek-V3's router: sigmoid scores, 4 groups of 2 experts (one group per EP rank at ep=4), a token's 2 best
    # groups, a selection bias, scaled gates, a shared expert; k=3 puts 2 slots of most tokens on one EP rank
    "deepseek": (DEEPSEEK, (0,)),
    "deepseek_llep": (DEEPSEEK, (0,)),  # the same through LLEPDispatcher, forced to rebalance (LLEP_CASES)
    "deepseek_llep_plain": (DEEPSEEK, (0,)),  # LLEPDispatcher below its threshold: plain EP's deduplicated rows
}
LLEP_CASES = {"deepseek_llep": LLEPConfig(imbalance_threshold=1.0, capacity_factor=1.0, min_tokens_per_gemm=1),
              "deepseek_llep_plain": LLEPConfig(imbalance_threshold=100.0)}
LAYOUTS = {2: [(1, 2), (2, 1)], 4: [(1, 4), (2, 2), (1, 2)]}  # world -> [(tp, ep)]
EXPERT_PARAMS = ("w_gate_EFD", "w_up_EFD", "w_down_EDF")


def _skew_direction():
    return torch.nn.functional.normalize(torch.ones(H), dim=0)


def build_layer(case: str) -> MoELayer:
    overrides, _ = CASES[case]
    cfg = MoEConfig(**{"num_experts": E, "top_k": 2, "expert_ffn_hidden_size": FFN, **overrides})
    torch.manual_seed(SEED)
    layer = MoELayer(H, cfg, layer_idx=0, k_schedule=KSchedule(cfg, SEED))
    layer.router.reset_parameters(std=0.3)  # O(1) logits and outputs, so atol 1e-5 is a tight check
    layer.experts.reset_parameters(std=0.3)
    if case == "skew":
        with torch.no_grad():
            layer.router.weight[0] += 4.0 * _skew_direction()
            layer.router.weight[1] += 3.0 * _skew_direction()
    if cfg.expert_bias:  # a bias that changes the selection (it starts at zero)
        layer.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, E))
    return layer.train()


def batches(case: str, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[d]`` and the loss weights ``g[d]`` for each DP rank d: [dp, T, H]."""
    gen = torch.Generator().manual_seed(SEED + dp)
    x, g = torch.randn(dp, T, H, generator=gen), torch.randn(dp, T, H, generator=gen)
    if case == "skew":
        x[:, : 7 * T // 8] += 2.0 * _skew_direction()  # 7/8 of the tokens lean towards experts 0 and 1
    return x, g


def _step(layer: MoELayer, x_TD: torch.Tensor, g_TD: torch.Tensor, step: int) -> dict:
    """One forward/backward with fresh grads; returns output and every grad."""
    layer.zero_grad(set_to_none=True)
    layer.set_step(step)
    x = x_TD.clone().requires_grad_(True)
    y = layer(x)
    (y * g_TD).sum().backward()
    params = [getattr(layer.experts, n) for n in EXPERT_PARAMS]
    stats = layer.last_stats
    shared = [] if layer.shared_expert is None else [p.grad for p in layer.shared_expert.parameters()]
    return {"y": y.detach(), "x_grad": x.grad, "router_grad": layer.router.weight.grad, "k": stats.k,
            "shared_grads": shared,
            "dropped": int(stats.dropped_slots), "tokens_per_expert": stats.tokens_per_expert_E,
            # an expert set that computed no rows may have no grad at all: that is a zero grad
            "expert_grads": [torch.zeros_like(p) if p.grad is None else p.grad for p in params]}


def _rank_main(rank: int, world: int) -> dict:
    from parallel import comm
    from parallel.groups import initialize

    out = {}
    for tp, ep in LAYOUTS[world]:
        groups = initialize(tp, 1, ep)
        if ep == 2:
            try:
                AllToAllDispatcher(groups.tp_group, groups.ep_group, 5)
            except ValueError as e:
                out["indivisible_error"] = str(e)
        # Which token slices this rank's experts compute: (DP rank, TP rank) of every EP-group member.
        me = torch.tensor([[groups.dp_rank, groups.tp_rank]])
        ep_slices = [tuple(m) for m in comm.gather_dim0(me, groups.ep_group).tolist()]
        for case, (_, steps) in CASES.items():
            layer = shard_moe_layer(build_layer(case), groups)
            if case in LLEP_CASES:
                layer.dispatcher = LLEPDispatcher(groups.tp_group, groups.ep_group, E, LLEP_CASES[case])
            x, g = batches(case, groups.dp_size)
            for step in steps:
                res = _step(layer, x[groups.dp_rank], g[groups.dp_rank], step)
                res.update(dp_rank=groups.dp_rank, ep_slices=ep_slices, first=layer.experts.first_expert,
                           num_local=layer.experts.num_local_experts,
                           rebalanced=getattr(layer.dispatcher, "last_stats", {}).get("rebalanced"),
                           rows_sent=layer.dispatcher.last_counts.rows, slots_sent=layer.dispatcher.last_counts.slots)
                out[(tp, ep, case, step)] = res
    return out


@pytest.fixture(scope="module")
def world_results():
    """Rank results per world size, launched lazily once per module."""
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = run_distributed(_rank_main, world)
        return cache[world]
    return get


@functools.lru_cache(maxsize=None)  # pure in its arguments; shared by the parametrized tests
def _reference(case: str, dp: int, step: int) -> list[dict]:
    layer = build_layer(case)
    x, g = batches(case, dp)
    return [_step(layer, x[d], g[d], step) for d in range(dp)]


@functools.lru_cache(maxsize=None)
def _reference_slice_expert_grads(case: str, dp: int, tp: int, step: int, d: int, j: int) -> list[torch.Tensor]:
    """Reference expert grads of micro-batch d with the loss restricted to its j-th 1/tp slice of tokens."""
    x, g = batches(case, dp)
    rows = T // tp
    g_slice = torch.zeros_like(g[d])
    g_slice[j * rows:(j + 1) * rows] = g[d, j * rows:(j + 1) * rows]
    return _step(build_layer(case), x[d], g_slice, step)["expert_grads"]


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("world,tp,ep", [(w, tp, ep) for w, ls in LAYOUTS.items() for tp, ep in ls])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_single_process_reference(world_results, world, tp, ep, case):
    results = world_results(world)
    dp = world // tp
    for step in CASES[case][1]:
        ref = _reference(case, dp, step)
        for rank, r in enumerate(results):
            r = r[(tp, ep, case, step)]
            want = ref[r["dp_rank"]]
            where = f"{case} tp={tp} ep={ep} step={step} rank={rank}"
            assert r["k"] == want["k"] and r["dropped"] == want["dropped"], where
            _close(r["y"], want["y"], f"{where} output")
            _close(r["x_grad"], want["x_grad"], f"{where} input grad")
            _close(r["router_grad"], want["router_grad"], f"{where} router grad")
            for i, (got, ref_grad) in enumerate(zip(r["shared_grads"], want["shared_grads"], strict=True)):
                _close(got, ref_grad, f"{where} shared expert grad {i}")
            lo, hi = r["first"], r["first"] + r["num_local"]
            per_slice = [_reference_slice_expert_grads(case, dp, tp, step, d, j) for d, j in r["ep_slices"]]
            for name, got, *parts in zip(EXPERT_PARAMS, r["expert_grads"], *per_slice):
                _close(got, sum(parts)[lo:hi], f"{where} {name} grad of experts [{lo}, {hi})")


def test_cases_exercise_what_they_claim():
    """The skew case really is skewed, the capacity case really drops, M-MoE really changes k between steps."""
    skew = _reference("skew", 1, 0)[0]["tokens_per_expert"]
    assert skew[:2].sum() >= 0.75 * skew.sum() and (skew == 0).any()
    assert _reference("capacity", 1, 0)[0]["dropped"] >= T // 2
    assert len({_reference("mmoe", 1, s)[0]["k"] for s in CASES["mmoe"][1]}) > 1


def test_deepseek_cases_send_one_row_per_token_and_group_and_llep_takes_both_paths(world_results):
    """The DeepSeek case really is group-limited (a token's 3 experts in at most 2 of the 4 groups, so two of them
    share a group, i.e. an EP rank at ep=4), plain EP sends one row per (token, group) pair (2 per token, not 3),
    and the LLEP cases took the path they name."""
    layer = build_layer("deepseek")
    x, _ = batches("deepseek", 4)
    for r in world_results(4):
        d = r[(1, 4, "deepseek", 0)]["dp_rank"]
        idx_TK = layer.router(x[d], 3).topk_idx_TK
        assert max(len(set(row)) for row in (idx_TK // 2).tolist()) <= 2
        for case in ("deepseek", "deepseek_llep_plain"):
            assert r[(1, 4, case, 0)]["rows_sent"] == device_pairs(idx_TK, 2) <= 2 * T
            assert r[(1, 4, case, 0)]["slots_sent"] == 3 * T
        assert r[(1, 4, "deepseek_llep", 0)]["rows_sent"] == 3 * T  # rebalanced: one row per slot
        assert r[(1, 4, "deepseek_llep", 0)]["rebalanced"] == 1.0
        assert r[(1, 4, "deepseek_llep_plain", 0)]["rebalanced"] == 0.0


def test_single_process_dispatcher_equals_local_dispatcher():
    layer = build_layer("capacity")
    x, g = batches("capacity", 1)
    ref = _step(layer, x[0], g[0], 0)
    layer.dispatcher = AllToAllDispatcher(SINGLE_PROCESS, SINGLE_PROCESS, E)  # both groups: this process alone
    got = _step(layer, x[0], g[0], 0)
    for a, b in zip([got[k] for k in ("y", "x_grad", "router_grad")] + got["expert_grads"],
                    [ref[k] for k in ("y", "x_grad", "router_grad")] + ref["expert_grads"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert isinstance(build_layer("moe").dispatcher, LocalDispatcher)  # the reference path used everywhere


def test_bad_setup_fails_with_clear_errors(world_results):
    from parallel.groups import ParallelGroups

    layer = build_layer("moe")
    x, _ = batches("moe", 1)
    layer.experts.first_expert = 2  # not the experts this (single) EP rank owns
    routed = layer.router(x[0], layer.current_k())
    with pytest.raises(ValueError, match=r"expects experts \[0, 8\) but got experts \[2, 10\)"):
        dispatch_compute_combine(AllToAllDispatcher(SINGLE_PROCESS, SINGLE_PROCESS, E), x[0], routed.topk_idx_TK,
                                 routed.topk_weight_TK, layer.experts)
    with pytest.raises(ValueError, match="AllToAllDispatcher tp_group is None"):
        AllToAllDispatcher(None, SINGLE_PROCESS, E)  # never "the world"
    with pytest.raises(ValueError, match="already sharded"):
        shard_moe_layer(layer, ParallelGroups.single())
    for r in world_results(2):
        assert "moe.num_experts (5) must be divisible by the EP group size (2)" in r["indivisible_error"]
