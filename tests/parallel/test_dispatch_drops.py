"""Fuzz: plain EP (AllToAllDispatcher, deduplicated) and LLEP (forced to rebalance) with heavy capacity dropping,
skew, group-limited routing, tiny and empty batches, MoNE on and off (with its neuron balance loss), against the
single-process reference.

Each case draws (from a seed every rank shares) a capacity factor (down to 0.01: one slot per expert), a routing
skew towards EP rank 0's experts, softmax or sigmoid scores with or without group-limited routing (4 groups of 2
experts, the best 1 or 2: a token's 2 slots then often share an EP rank), a batch size per DP rank (0 included)
and sometimes drops every slot of one DP rank; the routing comes from a ``TopKRouter`` with those settings on each
micro-batch. Plain EP must send exactly one row per (token, EP rank) pair with a kept slot. Every rank compares
its output and its gradients (input, routing weights, its experts' weights) with
``tests.helpers.moe_reference.plain_ep_reference`` on the concatenation of its EP group's micro-batches (the
comparison of tests/parallel/test_llep.py) and checks they are finite. The parent then checks the fuzz reached the
cases the dispatchers used to crash on: a rank with tokens but every slot dropped, a rank receiving no row, empty
batches everywhere, LLEP moving weights. One world per size runs every case (tp, ep): (1, 2); (1, 4), (2, 2).
"""
from __future__ import annotations

import pytest
import torch

from moe_core.config import MoEConfig, MoNEConfig
from moe_core.dispatcher import dispatch_compute_combine
from moe_core.experts import SwiGLUExperts
from moe_core.router import TopKRouter
from parallel.comm import gather_dim0
from parallel.config import LLEPConfig
from parallel.dispatch import AllToAllDispatcher
from parallel.groups import initialize
from parallel.llep.dispatcher import LLEPDispatcher
from tests.helpers.dist import run_distributed
from tests.helpers.moe_reference import device_pairs, plain_ep_reference

E, K, D, F = 8, 2, 8, 6
CASES = 16  # per layout
LAYOUTS = {2: [(1, 2)], 4: [(1, 4), (2, 2)]}  # world -> [(tp, ep)]
CAPACITY_FACTORS = (0.01, 0.01, 0.1, 0.5, 1.0, None)
GROUPS = ((1, 1), (4, 1), (4, 2))
"""(moe.num_groups, moe.group_topk) drawn per case: off, or 4 groups of 2 experts with the best 1 or 2 of them."""
LLEP_CFG = LLEPConfig(imbalance_threshold=1.0, capacity_factor=1.0, min_tokens_per_gemm=1, max_foreign_experts=4)
"""Every imbalance is >= 1.0, so every LLEP call takes the rebalanced path (and moves weights when a rank is over
capacity)."""
MONES = (MoNEConfig(), MoNEConfig(enabled=True, keep_ratio=0.5), MoNEConfig(enabled=True, keep_ratio=0.5,
                                                                              balance_loss_coeff=0.5))


def _draw(case: int, dp: int, tp: int) -> dict:
    """The case's parameters (identical on every rank)."""
    gen = torch.Generator().manual_seed(1000 + case)
    pick = lambda n: int(torch.randint(n, (1,), generator=gen))  # noqa: E731
    tokens = [tp * pick(9) for _ in range(dp)]  # 0 .. 8*tp tokens per DP rank, divisible by tp
    if case == 0:
        tokens = [0] * dp  # an empty step everywhere
    drop_rank = pick(dp) if case % 3 == 1 else None  # every slot of that DP rank's micro-batch dropped
    return dict(tokens=tokens, capacity_factor=CAPACITY_FACTORS[pick(len(CAPACITY_FACTORS))],
                score_function=("softmax", "sigmoid")[pick(2)], groups=GROUPS[pick(len(GROUPS))],
                skew=float(pick(3)) * 2.0, mone=MONES[case % len(MONES)], drop_rank=drop_rank, seed=pick(10_000))


def _micro_batch(params: dict, d: int) -> list[torch.Tensor]:
    """DP rank d's ``[x_TD, idx_TK, w_TK, grad_TD]``: routing by a seeded router with the case's capacity factor."""
    gen = torch.Generator().manual_seed(params["seed"] * 31 + d)
    T = params["tokens"][d]
    x_TD, grad_TD = torch.randn(T, D, generator=gen), torch.randn(T, D, generator=gen)
    num_groups, group_topk = params["groups"]
    cfg = MoEConfig(num_experts=E, top_k=K, expert_ffn_hidden_size=F, capacity_factor=params["capacity_factor"],
                    score_function=params["score_function"], num_groups=num_groups, group_topk=group_topk)
    torch.manual_seed(params["seed"])
    router = TopKRouter(D, E, cfg)
    router.reset_parameters(std=0.3)
    with torch.no_grad():
        router.weight[: E // 2] += params["skew"] * torch.nn.functional.normalize(torch.ones(D), dim=0)
        routed = router(x_TD + params["skew"] / 4, K)
    idx_TK, w_TK = routed.topk_idx_TK, routed.topk_weight_TK
    if params["drop_rank"] == d:
        idx_TK, w_TK = torch.full_like(idx_TK, -1), torch.zeros_like(w_TK)
    return [x_TD, idx_TK, w_TK, grad_TD]


def _expert_weights(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(E, F, D, generator=gen) * 0.3, torch.randn(E, F, D, generator=gen) * 0.3,
            torch.randn(E, D, F, generator=gen) * 0.3]


def _run(dispatcher, weights, first: int, count: int, mone: MoNEConfig, x_TD, idx_TK, w_TK, grad_TD) -> dict:
    experts = SwiGLUExperts(count, D, F, mone, first_expert=first)
    with torch.no_grad():
        for p, w in zip((experts.w_gate_EFD, experts.w_up_EFD, experts.w_down_EDF), weights):
            p.copy_(w[first:first + count])
    x_TD, w_TK = x_TD.clone().requires_grad_(), w_TK.clone().requires_grad_()
    y_TD = dispatch_compute_combine(dispatcher, x_TD, idx_TK, w_TK, experts)
    (y_TD * grad_TD).sum().backward()
    return dict(y=y_TD.detach(), x=x_TD.grad, w=w_TK.grad,
                experts=[torch.zeros_like(p) if p.grad is None else p.grad
                         for p in (experts.w_gate_EFD, experts.w_up_EFD, experts.w_down_EDF)])


def _check(got: dict, want: dict, what: str) -> None:
    for key in ("y", "x", "w"):
        assert bool(torch.isfinite(got[key]).all()), f"{what}: {key} is not finite"
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{what}: {key} differs from the reference: {m}")
    for i, (g, w) in enumerate(zip(got["experts"], want["experts"])):
        assert bool(torch.isfinite(g).all()), f"{what}: expert weight {i} grad is not finite"
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{what}: expert weight {i} grad differs from the reference: {m}")


def _fuzz(rank: int, world: int) -> list[dict]:
    seen = []
    for tp, ep in LAYOUTS[world]:
        groups = initialize(tp, 1, ep)
        ep_batches = sorted(set(gather_dim0(torch.tensor([groups.dp_rank]), groups.ep_group).tolist()))
        L, first = E // ep, groups.ep_rank * (E // ep)
        for case in range(CASES):
            params = _draw(case, groups.dp_size, tp)
            batches = {d: _micro_batch(params, d) for d in ep_batches}
            weights = _expert_weights(params["seed"])
            group_batch = [torch.cat(parts) for parts in zip(*batches.values())]
            ref = plain_ep_reference(weights, params["mone"], ep, *group_batch)
            lo = sum(params["tokens"][d] for d in ep_batches if d < groups.dp_rank)
            mine = slice(lo, lo + params["tokens"][groups.dp_rank])
            want = dict(y=ref["y"][mine], x=ref["x"][mine], w=ref["w"][mine],
                        experts=[g[first:first + L] for g in ref["experts"]])
            llep = LLEPDispatcher(groups.tp_group, groups.ep_group, E, LLEP_CFG)
            plain = AllToAllDispatcher(groups.tp_group, groups.ep_group, E)
            for name, dispatcher in (("plain EP", plain), ("LLEP", llep)):
                got = _run(dispatcher, weights, first, L, params["mone"], *batches[groups.dp_rank])
                _check(got, want, f"case {case} {params} tp={tp} ep={ep} {name}")
            idx_TK = batches[groups.dp_rank][1]
            my_slice = idx_TK.chunk(tp)[groups.tp_rank] if idx_TK.shape[0] else idx_TK
            sent = int((my_slice >= 0).sum())
            counts = plain.last_counts
            assert (counts.tokens, counts.slots, counts.rows) == (my_slice.shape[0], sent, device_pairs(my_slice, L)), \
                f"case {case} tp={tp} ep={ep}: {counts}"
            seen.append(dict(tokens=idx_TK.shape[0] // tp, sent=sent, rows=counts.rows,
                             received=int(((group_batch[1] >= first) & (group_batch[1] < first + L)).sum()),
                             weights_moved=llep.last_stats["weights_moved"], all_empty=sum(params["tokens"]) == 0,
                             balance=params["mone"].balance_loss_coeff > 0))
    return seen


@pytest.mark.parametrize("world", [2, 4])
def test_dispatchers_with_heavy_drops_and_empty_batches_match_the_reference(world):
    seen = [s for per_rank in run_distributed(_fuzz, world, timeout=300) for s in per_rank]
    assert any(s["tokens"] > 0 and s["sent"] == 0 for s in seen), "no rank had tokens with every slot dropped"
    assert any(s["received"] == 0 and not s["all_empty"] for s in seen), "no rank received zero rows"
    assert any(s["all_empty"] for s in seen) and any(s["weights_moved"] > 0 for s in seen)
    assert any(s["balance"] and s["sent"] == 0 for s in seen), "the balance loss never met an all-dropped rank"
    assert any(s["rows"] < s["sent"] for s in seen), "no token had two slots on one EP rank (nothing deduplicated)"
