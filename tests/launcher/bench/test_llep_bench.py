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


def test_tiny_ep2_run_dispatches_every_token_and_matches_the_single_process_reference():
    """Each rank's outputs are checked against ITS OWN tokens through all experts in one process. With the old
    ``tp_group=None`` (read as the world) each rank kept half of its tokens and received the other rank's outputs:
    a quarter of the slots were planned and both dispatchers were equally wrong, which comparing them with each
    other could not see (issue 17)."""
    args = parse_args(["--ep", "2", "--tokens", "64", "--hidden", "16", "--ffn", "32", "--iters", "1", "--warmup",
                       "0", "--min-tokens-per-gemm", "8", "--imbalance-threshold", "1.1",
                       "--scenarios", "uniform", "hot80"])
    rows = run_distributed(bench_rank, 2, args)[0]
    by_name = {r["scenario"]: r for r in rows}
    hot = by_name["hot80"]
    assert hot["load_llep"] <= 1.2 < hot["load_plain"] and hot["weights_moved"] > 0
    assert all(r["slots"] == 2 * 64 * 2 for r in rows), "every rank's tokens x top-k must be dispatched"
    assert all(r["err_plain"] < 1e-5 and r["err_llep"] < 1e-5 for r in rows), rows
    assert all(r["ms_plain"] > 0 and r["ms_llep"] > 0 and r["peak_mib_plain"] > 0 and r["peak_mib_llep"] > 0
               for r in rows)
    assert "hot80" in format_table(rows)


def test_interconnect_model_and_gemm_interpolation():
    from launcher.bench.llep_sim import GemmTable, Interconnect

    net = Interconnect("test", intra_gbps=1.0, inter_gbps=0.5, intra_latency_us=0.0, inter_latency_us=0.0,
                       ranks_per_node=2)
    bytes_PP = torch.zeros(4, 4).numpy()
    bytes_PP[0, 1] = 1e6  # 1 MB inside node 0: 1 ms at 1 GB/s
    assert net.a2a_ms(bytes_PP) == pytest.approx(1.0)
    bytes_PP[0, 2] = 1e6  # plus 1 MB to node 1 at 0.5 GB/s, concurrently: 2 ms
    assert net.a2a_ms(bytes_PP) == pytest.approx(2.0)
    gemm = GemmTable((0, 100, 200), (0.0, 1.0, 3.0), "test")
    assert (gemm(0), gemm(50), gemm(150), gemm(300)) == pytest.approx((0.0, 0.5, 2.0, 5.0))


def test_simulation_with_free_communication_predicts_the_load_ratio():
    from launcher.bench.llep_sim import GemmTable, Interconnect, Layer, simulate
    from parallel.config import LLEPConfig

    free = Interconnect("free", 1e9, 1e9, 0.0, 0.0)
    linear = GemmTable((0, 1), (0.0, 0.001), "1 us per row")
    layer = Layer(experts=16, ranks=8, tokens=512, top_k=2, hidden=64, ffn=64, elem_bytes=2)
    skewed = simulate(layer, "hot100", LLEPConfig(min_tokens_per_gemm=1), linear, free)
    assert skewed["transfers"] > 0
    assert skewed["ms_plain"] / skewed["gemm_plain"] == pytest.approx(1.0)
    # with free links the only LLEP overheads are the planner's milliseconds
    assert skewed["gemm_plain"] / skewed["gemm_llep"] == pytest.approx(
        skewed["load_plain"] / skewed["load_llep"], rel=1e-6)
    assert skewed["ms_llep"] == pytest.approx(skewed["gemm_llep"] + skewed["planner_ms"], rel=1e-6, abs=1e-6)
    uniform = simulate(layer, "uniform", LLEPConfig(), linear, free)
    assert uniform["transfers"] == 0 and uniform["gemm_llep"] == uniform["gemm_plain"]


def test_simulated_plain_ep_sends_the_deduplicated_rows():
    """The simulator's plain EP traffic is what AllToAllDispatcher sends: one row per (token, EP rank) pair."""
    from launcher.bench.llep_sim import Layer, _counts
    from moe_core.permute import group_by_device

    layer = Layer(16, 4, 200, 4, 0, 0, 0)  # E=16 over P=4, 200 tokens per rank, top-4
    counts_PE, rows_PP = _counts(layer, "zipf", 1.2, 3)
    for r in range(4):
        idx_TK = routing("zipf", 200, 16, 4, 1.2, torch.Generator().manual_seed(3000 + r))
        routed = group_by_device(idx_TK, torch.ones(idx_TK.shape), 4, 4)
        assert rows_PP[r].tolist() == routed.perm.tokens_per_expert_E.tolist()
        assert counts_PE[r].tolist() == routed.slots_per_expert_E.tolist()
    assert rows_PP.sum() < counts_PE.sum()
