"""CPU threads per rank (``train.cpu_threads``, launcher/env.py): the automatic number splits this process's cores
over the ranks of its node, OMP_NUM_THREADS is respected, an explicit train.cpu_threads wins, CUDA runs are left
alone, and the run block prints what the run uses."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launcher import env, pretrain
from tests.launcher.train.test_evaluate import TINY, _single_rank_env

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cpu_node(monkeypatch):
    """A CPU-only node whose process may use 8 cores, torch's thread count restored afterwards."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(env.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    yield monkeypatch
    torch.set_num_threads(threads)


def test_automatic_threads_split_the_cores_over_the_local_ranks(cpu_node):
    assert env.cpu_threads() == (8, "auto: 8 core(s) / 1 rank(s) on this node")
    cpu_node.setenv("LOCAL_WORLD_SIZE", "3")
    assert env.cpu_threads() == (2, "auto: 8 core(s) / 3 rank(s) on this node")
    cpu_node.setenv("LOCAL_WORLD_SIZE", "16")
    assert env.cpu_threads()[0] == 1  # never 0


def test_omp_num_threads_is_respected_and_train_cpu_threads_wins(cpu_node):
    cpu_node.setenv("OMP_NUM_THREADS", "3")
    assert env.cpu_threads() == (3, "OMP_NUM_THREADS")
    assert env.cpu_threads(5) == (5, "train.cpu_threads")
    env.apply_cpu_threads(5)
    assert torch.get_num_threads() == 5


def test_cuda_runs_keep_torchs_threads(cpu_node):
    cpu_node.setattr(torch.cuda, "is_available", lambda: True)
    before = torch.get_num_threads()
    assert env.cpu_threads(3) is None
    env.apply_cpu_threads(3)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("overrides, omp, line", [
    ([], None, "cpu threads 8 per rank (auto: 8 core(s) / 1 rank(s) on this node)"),
    ([], "3", "cpu threads 3 per rank (OMP_NUM_THREADS)"),
    (["train.cpu_threads=2"], "3", "cpu threads 2 per rank (train.cpu_threads)"),
])
def test_run_block_prints_the_threads_the_run_uses(cpu_node, capsys, tmp_path, overrides, omp, line):
    _single_rank_env(cpu_node)
    if omp is not None:
        cpu_node.setenv("OMP_NUM_THREADS", omp)
    args = ["--recipe", str(REPO / "recipes" / "smoke_cpu.yaml"), *TINY, "train.steps=1", "train.eval_interval=0",
            "logging.tensorboard=false", f"logging.run_dir={tmp_path / 'run'}", *overrides]
    assert pretrain.main(args) == 0
    assert f"  {line}\n" in capsys.readouterr().out
    assert torch.get_num_threads() == int(line.split()[2])
