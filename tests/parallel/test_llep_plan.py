"""Property tests of the LLEP planner and the per-rank layout it implies (pure functions, no processes)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parallel.llep_plan import plain_ep_plan, plan_llep, rank_layout

SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def problems(draw, max_foreign=None):
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
                  max_foreign_experts=max_foreign if max_foreign is not None else draw(st.integers(0, 3)))
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
    plan = plan_llep(counts, P, epr, **kwargs)
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


@SETTINGS
@given(problems(max_foreign=24))
def test_no_rank_over_capacity_when_memory_cap_does_not_bind(problem):
    counts, P, epr, kwargs = problem
    plan = plan_llep(counts, P, epr, **kwargs)
    if plan.rebalanced:
        assert max(plan.loads_after) <= plan.capacity
        if kwargs["capacity_factor"] == 1.0:
            assert max(plan.loads_after) <= max(plan.loads_before)


@SETTINGS
@given(problems())
def test_over_capacity_only_when_forced_by_the_memory_cap(problem):
    counts, P, epr, kwargs = problem
    plan = plan_llep(counts, P, epr, **kwargs)
    if plan.rebalanced and max(plan.loads_after) > plan.capacity:
        assert any(len(plan.foreign_experts(r)) == kwargs["max_foreign_experts"] for r in range(P))


@SETTINGS
@given(problems())
def test_below_threshold_gives_the_plain_ep_plan(problem):
    counts, P, epr, kwargs = problem
    plan = plan_llep(counts, P, epr, **kwargs)
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
    plan = plan_llep(counts, P, epr, imbalance_threshold=1.0, min_tokens_per_gemm=1)
    plain = plain_ep_plan(counts, P, epr)
    assert plan.chunks == plain.chunks and plan.transfers == () and plan.loads_after == plain.loads_before


@SETTINGS
@given(problems())
def test_plan_is_deterministic_whatever_the_count_container(problem):
    counts, P, epr, kwargs = problem
    plan = plan_llep(counts, P, epr, **kwargs)
    assert plan_llep(torch.tensor(counts), P, epr, **kwargs) == plan
    assert plan_llep(tuple(counts), P, epr, **kwargs) == plan


def test_eighty_percent_to_one_expert_is_rebalanced_to_near_uniform():
    counts = [800, 40, 40, 40, 20, 20, 20, 20]  # 80% of 1000 tokens on expert 0, EP=4 x 2 experts
    plan = plan_llep(counts, 4, 2, min_tokens_per_gemm=32)
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
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_llep(**kwargs)


@settings(max_examples=60, deadline=None)  # each example simulates a whole dispatch
@given(routed())
def test_rank_layouts_route_every_token_to_a_rank_that_computes_its_expert(problem):
    """Simulate the dispatcher on labelled tokens with the layouts alone."""
    counts, counts_PE, P, epr, kwargs = problem
    plan = plan_llep(counts, P, epr, **kwargs)
    layouts = [rank_layout(plan, counts_PE, r) for r in range(P)]
    sorted_buffers = [[(s, e, i) for e in range(len(counts)) for i in range(counts_PE[s][e])] for s in range(P)]
    outboxes = []
    for s, lay in enumerate(layouts):
        rows = [sorted_buffers[s][a + i] for a, n in lay.send_segments for i in range(n)]
        assert sorted(rows) == sorted(sorted_buffers[s]), "each local token is sent exactly once"
        if not plan.transfers:  # the dispatcher skips the send reorder then: it must be the identity
            assert rows == sorted_buffers[s]
        edges = [sum(lay.send_splits[:r]) for r in range(P + 1)]
        outboxes.append([rows[edges[r]:edges[r + 1]] for r in range(P)])
    seen = []
    for r, lay in enumerate(layouts):
        assert lay.recv_splits == tuple(len(outboxes[s][r]) for s in range(P))
        received = [tok for s in range(P) for tok in outboxes[s][r]]
        computed = [received[a + i] for a, n in lay.compute_segments for i in range(n)]
        assert sorted(computed) == sorted(received)
        experts = list(range(r * epr, (r + 1) * epr)) + list(lay.foreign_experts)
        sizes = list(lay.home_tokens) + list(lay.foreign_tokens)
        labels = [e for e, n in zip(experts, sizes) for _ in range(n)]
        assert [tok[1] for tok in computed] == labels, "rows must be grouped by the expert that computes them"
        assert sum(sizes) == plan.loads_after[r]
        assert lay.weights_recv_splits == tuple(layouts[s].weights_send_splits[r] for s in range(P))
        assert [s * epr + i for s in range(P) for i in _sent_to(layouts[s], r)] == list(lay.foreign_experts)
        seen += computed
    assert sorted(seen) == sorted(tok for buf in sorted_buffers for tok in buf)


def _sent_to(layout, dst):
    start = sum(layout.weights_send_splits[:dst])
    return layout.weights_send_local[start:start + layout.weights_send_splits[dst]]
