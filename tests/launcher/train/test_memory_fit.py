"""Sizes beyond the machine (issue 27): pretrain checks the dry-run estimate before it builds anything, and a layout
that cannot fit is one line with the estimate and the setting to change; the estimate costs the same at any depth."""
from __future__ import annotations

import time

import pytest

from launcher.config import load_config
from launcher.train import memory
from tests.launcher.test_bad_inputs import REPO, TINY, _cli, run_pretrain  # noqa: F401 (fixture)

GIB = 1 << 30


@pytest.fixture
def one_gib(monkeypatch):
    """Every rank has 1 GiB: the rows never depend on (or use up) this machine's memory."""
    monkeypatch.setattr(memory, "device_budget", lambda: (GIB, "1 GiB (test)"))


@pytest.mark.parametrize("overrides, change", [
    (["moe.num_experts=1000000"], "lower moe.num_experts (1000000) or moe.expert_ffn_hidden_size (8), or raise "
                                  "parallel.ep (1)"),
    (["model.hidden_size=1048576"], "lower model.hidden_size (1048576), model.num_layers (1) or model.vocab_size"),
    (["model.seq_length=10000000"], "lower train.micro_batch_size (2), model.seq_length (10000000)"),
    (["train.micro_batch_size=100000", "train.global_batch_size=100000"],
     "lower train.micro_batch_size (100000), model.seq_length"),
    (["model.num_layers=100000"], "model.num_layers (100000)"),
], ids=["1e6 experts", "hidden 2^20", "seq 1e7", "micro-batch 1e5", "1e5 layers"])
def test_a_layout_beyond_the_machine_is_one_line(run_pretrain, one_gib, overrides, change):  # noqa: F811
    start = time.perf_counter()
    line = run_pretrain(*overrides)
    assert line.startswith("moetron: config error: this layout needs at least ") and \
        "per rank (weights " in line and "but a rank has 1 GiB (test): " in line and change in line, line
    assert time.perf_counter() - start < 30  # refused before anything is built


def test_the_estimate_does_not_grow_with_depth():
    times = {}
    for layers in (10, 100_000):
        cfg = load_config(None, [*TINY, f"model.num_layers={layers}"])
        start = time.perf_counter()
        est = memory.estimate(cfg, 1)
        times[layers] = time.perf_counter() - start
        assert est.params > layers * 1000  # every layer counted
    assert times[100_000] < 1.0, times


def test_dry_run_prints_the_estimate_then_the_line_as_a_warning(tmp_path, one_gib, capsys, monkeypatch):
    """A dry run plans for the run's machines (often not this one): it warns and exits 0."""
    from launcher import pretrain

    monkeypatch.setenv("WORLD_SIZE", "1")
    code = pretrain.main(["--recipe", str(REPO / "recipes" / "smoke_cpu.yaml"), *TINY, "model.seq_length=10000000",
                          "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0 and "activations" in out and err.strip().startswith("moetron: warning: this layout needs")
    assert "train.recompute (none)" in err and len(err.strip().splitlines()) == 1, err


def test_cli_hidden_two_to_the_twenty():
    """The real budget: no machine has petabytes, and the line comes at once."""
    proc = _cli("launcher.pretrain", "--recipe", str(REPO / "recipes" / "smoke_cpu.yaml"), *TINY,
                "model.hidden_size=1048576")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("moetron: config error: this layout needs at least ") and \
        "lower model.hidden_size (1048576)" in lines[0]
