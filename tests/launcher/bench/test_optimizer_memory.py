"""launcher/bench/optimizer_memory.py: the distributed optimizer's per-rank Adam state shrinks as 1/DP (within 10%),
its fp32 main weights likewise, and the gradient buffers stay whole (ZeRO-1)."""
import argparse

from launcher.bench.optimizer_memory import format_table, memory_table, model_overrides
from tests.helpers.dist import run_distributed


def test_distributed_optimizer_state_shrinks_with_dp():
    args = argparse.Namespace(vocab=1024, hidden=64, ffn=128, layers=2, experts=4)
    rows = memory_table([1, 2], model_overrides(args), kinds=("distributed",), runner=run_distributed)
    one, two = rows
    assert one["params"] == two["params"] > 250_000
    assert abs(two["sharding_ratio"] - 1.0) < 0.10, format_table(rows)
    assert abs(two["main_params"] * 2 / one["main_params"] - 1.0) < 0.10, format_table(rows)
    assert one["optimizer_state"] >= 8 * one["params"]  # two fp32 moments per parameter at DP=1
    assert two["grads"] == one["grads"]
