"""launcher/bench/checkpoint_stall.py: both modes train, save on schedule and commit every save (the stall of each
is measured), and the report prints the stall ratio and the checksum cost."""
import argparse

from launcher.bench.checkpoint_stall import report, run
from tests.helpers.dist import run_distributed


def test_stall_bench_measures_every_save_in_both_modes():
    args = argparse.Namespace(world=1, ep=1, steps=5, interval=2, hidden=64, ffn=128)
    results = run(args, runner=run_distributed)
    for mode in ("sync", "async"):
        r = results[mode]
        assert len(r["stalls"]) == 2 and all(s > 0 for s in r["stalls"]), r
        assert r["bytes"] > 1 << 20 and r["crc32_s"] > 0 and r["step_s"] > 0
    text = report(results)
    assert "stall ratio sync/async: " in text and "crc32 of one checkpoint" in text
