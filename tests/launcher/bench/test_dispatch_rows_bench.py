"""The dispatched-rows benchmark: a tiny EP=2 world counts what the deduplicated dispatch sent."""
from __future__ import annotations

import pytest

from launcher.bench.dispatch_rows import bench_rank, format_table, parse_args, summarise
from tests.helpers.dist import run_distributed


def test_tiny_ep2_run_counts_rows_slots_and_ranks_per_token():
    args = parse_args(["--ep", "2", "--experts", "8", "--top-k", "3", "--tokens", "32"])
    rows = summarise(run_distributed(bench_rank, 2, args))
    assert [(r["num_groups"], r["group_topk"]) for r in rows] == [(1, 1), (2, 2), (2, 1)]
    for r in rows:
        assert r["tokens"] == 64 and r["slots_per_token"] == 3.0  # nothing dropped: T*K slots
        assert 1.0 <= r["rows_per_token"] <= min(2.0, r["slots_per_token"])  # one row per (token, EP rank)
    no_groups, _, one_group = rows
    assert no_groups["rows_per_token"] > 1.0 and no_groups["max_ranks_per_token"] == 2
    assert one_group["rows_per_token"] == 1.0 and one_group["max_ranks_per_token"] == 1  # node-limited: one rank
    assert "| 2 groups, group_topk=1 | 3.000 | 1.000 | 66.7% | 1 |" in format_table(rows, args)


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        parse_args(["--ep", "3", "--experts", "8"])
    with pytest.raises(SystemExit):
        parse_args(["--ep", "4", "--experts", "8", "--top-k", "4"])  # group_topk=1 cannot hold 4 of 2 experts
