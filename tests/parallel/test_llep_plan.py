"""Property tests of the LLEP planner and the per-rank layout it implies (pure functions, no processes)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parallel.config import LLEPConfig
from parallel.llep.plan import plain_ep_plan, plan_llep, rank_layout


def _plan(counts, ep_size, experts_per_rank, **settings):
    """plan_llep under LLEPConfig's defaults changed by ``settings`` (moe.llep keys)."""
    return plan_llep(counts, ep_size, experts_per_rank, LLEPConfig(**settings))


SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def problems(draw, max_foreign=None, max_helpers=None):
    """(counts, P, experts_per_rank, planner kwargs), with skewed counts made likely."""
    P = draw(st.integers(1, 6))
    epr = draw(st.integers(1, 4))
    E = P * epr
    counts = draw(st.lists(st.integers(0, 60), min_size=E, max_size=E))
    if draw(st.booleans()):  # a hot expert
        counts[draw(st.integers(0, E - 1))] += draw(st.integers(0, 2000))
    kwargs = dict(imbalance_threshold=draw(st.sampled_from([1.0, 1.1, 1.3, 2.0])),
                  capacity_factor=draw(st.sampled_from([1.0, 1.05, 1.2])),
                  min_tokens_per_gemm=draw(st.sampled_from([0, 1, 16, 300])),
                  max_foreign_experts=max_foreign if max_foreign is not None else draw(st.integers(0, 3)),
                  max_helpers_per_expert=max_helpers if max_helpers is not None else draw(st.integers(1, 4)))
    return counts, P, epr, kwargs


@st.composite
def routed(draw):
    """A problem plus per-source-rank counts whose column sums are the global counts."""
    counts, P, epr, kwargs = draw(problems())
    counts_PE = [[0] * len(counts) for _ in range(P)]
    for e, c in enumerate(counts):
        cuts = sorted(draw(st.lists(st.integers(0, c), min_size=P - 1, max_size=P - 1)))
        for s, (a, b) in enumerate(zip([0] + cuts, cuts + [c])):
            counts_PE[s][e] = b - a
    return counts, counts_PE, P, epr, kwargs


@SETTINGS
@given(problems())
def test_every_token_assigned_exactly_once(problem):
    counts, P, epr, kwargs = problem
    plan = _plan(counts, P, epr, **kwargs)
    loads = [0] * P
    for e, chunks in enumerate(plan.chunks):
        edges = [0] + [c.end for c in chunks]
        assert [c.start for c in chunks] == edges[:-1], "chunks must tile the expert's tokens contiguously"
        assert edges[-1] == counts[e]
        assert all(c.size > 0 and 0 <= c.rank < P for c in chunks)
        for c in chunks:
            loads[c.rank] += c.size
    assert list(plan.loads_after) == loads
    moved = {(e, e // epr, c.rank) for e, cs in enumerate(plan.chunks) for c in cs if c.rank != e // epr}
    assert set(plan.transfers) == moved and len(plan.transfers) == len(moved)
    for r in range(P):
        assert len(plan.foreign_experts(r)) <= kwargs["max_foreign_experts"], "memory cap broken"
    for e in range(len(counts)):
        assert len(plan.helpers(e)) <= kwargs["max_helpers_per_expert"], "helper cap broken"


@SETTINGS
@given(problems())
def test_chunking_rule_spilled_chunks_are_gemm_sized(problem):
    """Every chunk computed off the home rank has at least min(min_tokens_per_gemm, tokens left) tokens, so an
    expert spilling s tokens makes at most ceil(s / min_tokens_per_gemm) of them."""
    counts, P, epr, kwargs = problem
    plan, m = _plan(counts, P, epr, **kwargs), kwargs["min_tokens_per_gemm"]
    for e, chunks in enumerate(plan.chunks):
        away = [c for c in chunks if c.rank != e // epr]
        for c in away:
            assert c.size >= min(m, counts[e] - c.start), (e, chunks)
        if m and away:
            assert len(away) <= -(-sum(c.size for c in away) // m)

@SETTINGS
@given(problems(max_foreign=24, max_helpers=24))
def test_over_capacity_by_less_than_a_gemm_chunk_when_memory_caps_do_not_bind(problem):
    counts, P, epr, kwargs = problem
    plan = _plan(counts, P, epr, **kwargs)
    if plan.rebalanced:
        assert max(plan.loads_after) <= plan.capacity + max(kwargs["min_tokens_per_gemm"] - 1, 0)
        if kwargs["capacity_factor"] == 1.0 and kwargs["min_tokens_per_gemm"] <= 1:
            assert max(plan.loads_after) <= max(plan.loads_before)



@st.composite
def hot_homes(draw):
    """Adversarial loads: several hot experts on one or two home ranks, each just under min_tokens_per_gemm, so
    every single spill looks too small to be worth a GEMM while their sum overloads the home."""
    P, epr = draw(st.integers(2, 8)), draw(st.integers(2, 6))
    m = draw(st.sampled_from([16, 300, 1024]))
    counts = [draw(st.integers(0, m // 8)) for _ in range(P * epr)]
    for home in draw(st.lists(st.integers(0, P - 1), min_size=1, max_size=2, unique=True)):
        for local in range(epr):
            counts[home * epr + local] = draw(st.integers(m // 2, m - 1))
    return counts, P, epr, dict(imbalance_threshold=1.0, capacity_factor=draw(st.sampled_from([1.0, 1.05])),
                                min_tokens_per_gemm=m, max_foreign_experts=P * epr, max_helpers_per_expert=P)


@SETTINGS
@given(hot_homes())
def test_sub_gemm_remainders_kept_home_never_add_up_to_a_gemm_over_capacity(problem):
    """Issue 23: remainders under min_tokens_per_gemm kept at home one by one must not leave the home m or more over
    capacity (the stated bound) when no memory cap binds."""
    counts, P, epr, kwargs = problem
    plan = _plan(counts, P, epr, **kwargs)
    assert max(plan.loads_after) < plan.capacity + kwargs["min_tokens_per_gemm"], (plan.loads_after, plan.capacity)


def test_four_hot_experts_on_one_rank_are_rebalanced():
    """Issue 23's case: every hot expert is under min_tokens_per_gemm, their sum is not (rank 0 ended 2190 over)."""
    plan = _plan([800] * 4 + [70] * 12, 4, 4, min_tokens_per_gemm=1024)
    assert plan.capacity == 1010 and max(plan.loads_after) < plan.capacity + 1024
    assert max(plan.loads_after) - plan.capacity == 0 and len(plan.transfers) >= 3

def test_chunking_rule_two_transfers_not_seven_at_p8_e8():
    """Issue 17: one hot expert spills 2537 tokens while every helper has 363 tokens of room. Taking only the room
    cut them into 7 transfers; with min_tokens_per_gemm=1024 two helpers take 1024 each and the 489 left (less than
    a GEMM, and no room for it anywhere) stay home."""
    counts = [4000] + [1100] * 7
    plan = _plan(counts, 8, 1)  # LLEPConfig's min_tokens_per_gemm=1024
    assert plan.capacity == 1463
    assert [(c.rank, c.size) for c in plan.chunks[0]] == [(0, 1463), (1, 1024), (2, 1024), (0, 489)]
    assert len(plan.transfers) == 2 and max(plan.loads_after) < plan.capacity + 1024
    assert max(plan.loads_after) < max(plan.loads_before)
    assert all(len(c) == 1 for c in plan.chunks[1:]), "an overfilled helper must not cascade its own expert"


def test_helper_cap_bounds_an_experts_helpers_and_forces_the_rest():
    counts = [8000] + [10] * 15  # one expert with nearly everything, P=16
    plan = _plan(counts, 16, 1, min_tokens_per_gemm=1, max_helpers_per_expert=3)
    assert plan.helpers(0) == (1, 2, 3) and len(plan.transfers) == 3
    assert sum(c.size for c in plan.chunks[0]) == 8000 and max(plan.loads_after) > plan.capacity  # forced


@SETTINGS
@given(problems())
def test_over_capacity_only_when_forced_by_the_memory_caps(problem):
    counts, P, epr, kwargs = problem
    plan = _plan(counts, P, epr, **kwargs)
    if plan.rebalanced and max(plan.loads_after) >= plan.capacity + max(kwargs["min_tokens_per_gemm"], 1):
        assert any(len(plan.foreign_experts(r)) == kwargs["max_foreign_experts"] for r in range(P)) or any(
            len(plan.helpers(e)) == kwargs["max_helpers_per_expert"] for e in range(len(counts)))

@SETTINGS
@given(problems())
def test_below_threshold_gives_the_plain_ep_plan(problem):
    counts, P, epr, kwargs = problem
    plan = _plan(counts, P, epr, **kwargs)
    plain = plain_ep_plan(counts, P, epr)
    if plain.imbalance_before < kwargs["imbalance_threshold"]:
        assert plan == plain
    else:
        assert plan.rebalanced


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 4), st.data())
def test_balanced_ranks_keep_plain_ep_even_when_planning_is_forced(P, epr, data):
    per_rank = data.draw(st.integers(0, 500))
    counts = []
    for _ in range(P):  # every rank gets exactly per_rank tokens, split arbitrarily over its experts
        cuts = sorted(data.draw(st.lists(st.integers(0, per_rank), min_size=epr - 1, max_size=epr - 1)))
        counts += [b - a for a, b in zip([0] + cuts, cuts + [per_rank])]
    plan = _plan(counts, P, epr, imbalance_threshold=1.0, min_tokens_per_gemm=1)
    plain = plain_ep_plan(counts, P, epr)
    assert plan.chunks == plain.chunks and plan.transfers == () and plan.loads_after == plain.loads_before


@SETTINGS
@given(problems())
def test_plan_is_deterministic_whatever_the_count_container(problem):
    counts, P, epr, kwargs = problem
    plan = _plan(counts, P, epr, **kwargs)
    assert _plan(torch.tensor(counts), P, epr, **kwargs) == plan
    assert _plan(tuple(counts), P, epr, **kwargs) == plan


def test_eighty_percent_to_one_expert_is_rebalanced_to_near_uniform():
    counts = [800, 40, 40, 40, 20, 20, 20, 20]  # 80% of 1000 tokens on expert 0, EP=4 x 2 experts
    plan = _plan(counts, 4, 2, min_tokens_per_gemm=32)
    assert plan.imbalance_before == pytest.approx(3.36)
    assert plan.imbalance_after <= 1.2
    assert {helper for e, _, helper in plan.transfers if e == 0} == {1, 2, 3}
    assert plan.tokens_moved == sum(c.size for c in plan.chunks[0][1:])


@pytest.mark.parametrize("kwargs, message", [
    (dict(counts=[1, 2, 3], ep_size=2, experts_per_rank=2), "expert counts"),
    (dict(counts=[1, -2], ep_size=2, experts_per_rank=1), ">= 0"),
    (dict(counts=[1, 2], ep_size=2, experts_per_rank=1, capacity_factor=0.9), "capacity_factor"),
    (dict(counts=[1, 2], ep_size=2, experts_per_rank=1, imbalance_threshold=0.0), "imbalance_threshold"),
    (dict(counts=[1, 2], ep_size=2, experts_per_rank=1, max_foreign_experts=-1), "max_foreign_experts"),
    (dict(counts=[1, 2], ep_size=2, experts_per_rank=1, max_helpers_per_expert=0), "max_helpers_per_expert"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _plan(**kwargs)


@settings(max_examples=60, deadline=None)  # each example simulates a whole dispatch
@given(routed())
def test_rank_layouts_route_every_token_to_a_rank_that_computes_its_expert(problem):
    """Simulate the dispatcher on labelled tokens with the layouts alone."""
    counts, counts_PE, P, epr, kwargs = problem
    plan = _plan(counts, P, epr, **kwargs)
    layouts = [rank_layout(plan, counts_PE, r) for r in range(P)]
    sorted_buffers = [[(s, e, i) for e in range(len(counts)) for i in range(counts_PE[s][e])] for s in range(P)]
    outboxes = []
    for s, lay in enumerate(layouts):
        rows = [sorted_buffers[s][a + i] for a, n in zip(lay.send_starts, lay.send_lengths) for i in range(n)]
        assert sorted(rows) == sorted(sorted_buffers[s]), "each local token is sent exactly once"
        edges = [sum(lay.send_splits[:r]) for r in range(P + 1)]
        outboxes.append([rows[edges[r]:edges[r + 1]] for r in range(P)])
    seen = []
    for r, lay in enumerate(layouts):
        assert lay.recv_splits == [len(outboxes[s][r]) for s in range(P)]
        received = [tok for s in range(P) for tok in outboxes[s][r]]
        computed = [received[a + i] for a, n in zip(lay.compute_starts, lay.compute_lengths) for i in range(n)]
        assert sorted(computed) == sorted(received)
        experts = list(range(r * epr, (r + 1) * epr)) + list(lay.foreign_experts)
        sizes = list(lay.home_tokens) + list(lay.foreign_tokens)
        labels = [e for e, n in zip(experts, sizes) for _ in range(n)]
        assert [tok[1] for tok in computed] == labels, "rows must be grouped by the expert that computes them"
        assert sum(sizes) == plan.loads_after[r]
        assert [(e, home) for e, home in lay.weights_recv] == [(e, e // epr) for e in lay.foreign_experts]
        sent_here = [e for s in range(P) for _, e, helper in layouts[s].weights_send if helper == r]
        assert sorted(sent_here) == list(lay.foreign_experts), "every received weight is sent by its home"
        assert all(e == s * epr + local for s in range(P) for local, e, _ in layouts[s].weights_send)
        seen += computed
    assert sorted(seen) == sorted(tok for buf in sorted_buffers for tok in buf)
