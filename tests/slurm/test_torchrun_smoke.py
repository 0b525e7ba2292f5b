"""Single-node launch without Slurm, as documented in slurm/README.md:
``torchrun --standalone --nproc-per-node N -m launcher.pretrain --recipe recipes/smoke_cpu.yaml ...``."""
from __future__ import annotations

import subprocess
import sys

from tests.slurm.cluster import REPO
from tests.slurm.jobs import latest_checkpoint, pretrain_args, tensorboard_steps


def test_torchrun_single_node_two_processes(tmp_path):
    run_dir, steps = tmp_path / "run", 3
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "launcher.pretrain", "--recipe", *pretrain_args(run_dir, steps)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"[moetron] done: step {steps}" in proc.stdout
    _, common = latest_checkpoint(run_dir)
    assert common["step"] == steps and common["layout"]["world"] == 2
    assert tensorboard_steps(run_dir) == [list(range(steps))]
