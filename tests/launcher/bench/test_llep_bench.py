"""The LLEP benchmark: routing generators do what they claim, and a tiny EP=2 run produces sane rows."""
from __future__ import annotations

import pytest
import torch

from launcher.bench.llep import bench_rank, format_table, parse_args, routing
from tests.helpers.dist import run_distributed


@pytest.mark.parametrize("scenario, share", [("hot50", 0.5), ("hot80", 0.8), ("hot95", 0.95)])
def test_hot_routing_sends_that_share_of_tokens_to_expert_zero(scenario, share):
    idx_TK = routing(scenario, 4000, 8, 2, 1.2, torch.Generator().manual_seed(0))
    assert idx_TK.shape == (4000, 2)
    assert (idx_TK == 0).any(dim=1).float().mean().item() == pytest.approx(share, abs=0.03)
    assert (idx_TK[:, 0] != idx_TK[:, 1]).all(), "a token's experts must be distinct"


def test_zipf_and_uniform_routing():
    gen = torch.Generator().manual_seed(0)
    zipf = torch.bincount(routing("zipf", 4000, 8, 1, 1.2, gen).flatten(), minlength=8)
    uniform = torch.bincount(routing("uniform", 4000, 8, 1, 1.2, gen).flatten(), minlength=8)
    assert (zipf[:-1] >= zipf[1:]).all() and zipf[0] > 4 * zipf[-1]
    assert uniform.max() < 1.2 * uniform.float().mean()
    with pytest.raises(ValueError, match="unknown routing scenario 'hot'"):
        routing("hot", 10, 8, 1, 1.2, gen)


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        parse_args(["--ep", "3", "--experts", "8"])


def test_tiny_ep2_run_reports_balanced_llep_and_equal_outputs():
    args = parse_args(["--ep", "2", "--tokens", "64", "--hidden", "16", "--ffn", "32", "--iters", "1", "--warmup",
                       "0", "--min-tokens-per-gemm", "8", "--imbalance-threshold", "1.1", "--scenarios", "uniform", "hot80"])
    rows = run_distributed(bench_rank, 2, args)[0]
    by_name = {r["scenario"]: r for r in rows}
    hot = by_name["hot80"]
    assert hot["load_llep"] <= 1.2 < hot["load_plain"] and hot["weights_moved"] > 0
    assert all(r["max_abs_diff"] < 1e-5 and r["ms_plain"] > 0 and r["ms_llep"] > 0 for r in rows)
    assert all(r["peak_mib_plain"] > 0 and r["peak_mib_llep"] > 0 for r in rows)
    assert "hot80" in format_table(rows)
