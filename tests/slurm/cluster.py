"""Drive the one-machine Slurm cluster of slurm/ci_cluster.sh from tests: start/stop, submit, poll, signal.

The cluster is real (slurmctld + one slurmd per node + munge); every client command runs with ``SLURM_CONF``
pointing at the cluster's own config, so nothing in /etc is used or changed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CI_CLUSTER = REPO / "slurm" / "ci_cluster.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


@dataclass
class SlurmCluster:
    state_dir: Path
    nodes: int = 2
    gpus_per_node: int = 2

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "MOETRON_SLURM_DIR": str(self.state_dir), "MOETRON_SLURM_NODES": str(self.nodes),
                "MOETRON_SLURM_GPUS": str(self.gpus_per_node), "SLURM_CONF": str(self.state_dir / "slurm.conf")}

    def _cluster_cmd(self, action: str) -> None:
        proc = subprocess.run(["bash", str(CI_CLUSTER), action], env=self.env, capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"slurm/ci_cluster.sh {action} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")

    def start(self) -> None:
        self._cluster_cmd("start")

    def stop(self) -> None:
        self._cluster_cmd("stop")

    def client(self, *args: str, env: dict[str, str] | None = None, attempts: int = 3) -> str:
        """Run a Slurm client command against this cluster from the repository root; return its stdout.
        Queries are retried: on a loaded machine a client call occasionally dies talking to slurmctld."""
        for attempt in range(attempts):
            proc = subprocess.run(list(args), cwd=REPO, env={**self.env, **(env or {})}, capture_output=True,
                                  text=True, timeout=60)
            if proc.returncode == 0:
                return proc.stdout
            time.sleep(1.0)
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}, {attempts} attempts): {proc.stderr.strip()}")

    def submit(self, script: str, args: list[str], sbatch_opts: list[str], env: dict[str, str] | None = None) -> str:
        """``sbatch`` from the repository root (the job's MOETRON_HOME); returns the job id."""
        # All "nodes" share this machine's cores: one OpenMP thread per worker. Without it, workers that torchrun
        # starts alone on a node use every core, and spinning OpenMP threads oversubscribe the CPU (20x slower).
        job_env = {"MOETRON_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
        out = self.client("sbatch", "--parsable", *sbatch_opts, script, *args, env=job_env, attempts=1)
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        line = self.client("scontrol", "show", "job", "-o", job_id).strip()
        return dict(field.split("=", 1) for field in line.split() if "=" in field)

    def wait_until(self, job_id: str, done, what: str, timeout: float, log: Path) -> dict[str, str]:
        """Poll the job until ``done(job_info)`` is true; on timeout fail with the job log and daemon logs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if done(info):
                return info
            if info["JobState"] in FINAL_STATES:
                break
            time.sleep(0.25)
        raise AssertionError(f"job {job_id}: gave up waiting for {what} (state {info['JobState']}, "
                             f"{timeout:.0f} s)\n{self.diagnostics(log)}")

    def wait_final(self, job_id: str, timeout: float, log: Path) -> dict[str, str]:
        return self.wait_until(job_id, lambda i: i["JobState"] in FINAL_STATES, "the job to end", timeout, log)

    def cancel_all(self, timeout: float = 60) -> None:
        """Cancel every job still queued or running and wait until they are gone (frees the nodes)."""
        jobs = self.client("squeue", "-h", "-o", "%A").split()
        if jobs:
            self.client("scancel", *jobs)
        deadline = time.monotonic() + timeout
        while self.client("squeue", "-h", "-o", "%A").strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"jobs {jobs} still in the queue {timeout:.0f} s after scancel")
            time.sleep(0.5)

    def diagnostics(self, log: Path) -> str:
        parts = [f"--- job log {log}:\n{log.read_text() if log.exists() else '<none>'}"]
        for daemon_log in sorted((self.state_dir / "log").glob("*.log")):
            tail = daemon_log.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {daemon_log.name} (last lines):\n" + "\n".join(tail))
        return "\n".join(parts)
