"""The Slurm scripts' own logic, without a cluster: the torchrun command each node runs, and the errors for
wrong use. launch_node.sh runs ``$MOETRON_PYTHON -m launcher.torchrun ...`` (torchrun, ending in one line on a
signal); with MOETRON_PYTHON=echo it prints the exact command instead of running it."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.slurm.cluster import REPO

SLURM_ENV = {"PATH": "/usr/bin:/bin", "SLURM_NNODES": "3", "SLURM_JOB_ID": "4242", "SLURMD_NODENAME": "gpu07",
             "SLURM_NODEID": "1", "MOETRON_PYTHON": "echo"}


def _launch_node(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "slurm" / "launch_node.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("gpu_env, nproc", [
    ({"SLURM_GPUS_ON_NODE": "8"}, 8),
    ({"CUDA_VISIBLE_DEVICES": "0,1,3"}, 3),
    ({"SLURM_GPUS_ON_NODE": "8", "MOETRON_NPROC_PER_NODE": "2"}, 2),  # explicit override wins
])
def test_torchrun_command_follows_the_allocation(gpu_env, nproc):
    proc = _launch_node({**SLURM_ENV, **gpu_env}, "head01:23456", "recipes/r.yaml", "train.steps=5", "moe.top_k=1")
    assert proc.returncode == 0, proc.stderr
    command = proc.stdout.strip().splitlines()[-1]
    assert command == ("-m launcher.torchrun --nnodes=3 --nproc-per-node=%d --rdzv-backend=c10d "
                       "--rdzv-endpoint=head01:23456 --rdzv-id=moetron-4242 --max-restarts=0 "
                       "-m launcher.pretrain --recipe recipes/r.yaml train.steps=5 moe.top_k=1" % nproc)
    assert "node gpu07" in proc.stdout and f"{nproc} workers" in proc.stdout


@pytest.mark.parametrize("gpu_env, message", [
    ({}, "no GPUs in this node's allocation: submit with --gpus-per-node=N, or set MOETRON_NPROC_PER_NODE"),
    ({"MOETRON_NPROC_PER_NODE": "two"}, "workers per node must be a positive integer, got 'two'"),
    ({"SLURM_GPUS_ON_NODE": "0"}, "workers per node must be a positive integer, got '0'"),
])
def test_launch_node_rejects_missing_or_bad_worker_count(gpu_env, message):
    proc = _launch_node({**SLURM_ENV, **gpu_env}, "head01:23456", "recipes/r.yaml")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_launch_node_needs_endpoint_and_recipe():
    proc = _launch_node({**SLURM_ENV, "SLURM_GPUS_ON_NODE": "1"}, "head01:23456")
    assert proc.returncode == 2 and "usage: launch_node.sh HEAD_ADDR:PORT RECIPE" in proc.stderr


@pytest.mark.parametrize("script", ["pretrain.sbatch", "convert.sbatch"])
def test_batch_scripts_refuse_to_run_outside_sbatch(script):
    proc = subprocess.run(["bash", str(REPO / "slurm" / script), "recipes/r.yaml"], cwd=REPO,
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "submit this script with sbatch" in proc.stderr


def test_pretrain_sbatch_needs_a_recipe():
    proc = subprocess.run(["bash", str(REPO / "slurm" / "pretrain.sbatch")], cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "1"}, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "usage: sbatch slurm/pretrain.sbatch RECIPE.yaml" in proc.stderr


def test_run_dir_resolves_overrides_and_names_bad_keys(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("logging:\n  run_dir: runs/from_recipe\n")
    run = [sys.executable, str(REPO / "slurm" / "run_dir.py"), str(recipe)]
    assert subprocess.run(run, capture_output=True, text=True).stdout.strip() == "runs/from_recipe"
    out = subprocess.run([*run, "logging.run_dir=/x/y"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "/x/y"
    bad = subprocess.run([*run, "trian.steps=3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "config error: unknown key 'trian'" in bad.stderr
