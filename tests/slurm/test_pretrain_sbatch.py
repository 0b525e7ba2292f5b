"""slurm/pretrain.sbatch and slurm/convert.sbatch on a real two-node Slurm cluster (tests/slurm/conftest.py):
training, checkpoints, TensorBoard, SIGUSR2 -> checkpoint -> requeue -> resume, and HF export as a batch job.
CPU + gloo, one tiny model, few steps."""
from __future__ import annotations

import re

import pytest

from tests.slurm.jobs import latest_checkpoint, preempted_step, pretrain_args, tensorboard_steps

SCRIPT = "slurm/pretrain.sbatch"


def _sbatch_opts(log, gpus_per_node: int, name: str) -> list[str]:
    return ["--nodes=2", f"--gpus-per-node={gpus_per_node}", "--time=10", f"--output={log}", f"--job-name={name}"]


def _assert_completed(cluster, info: dict, log) -> None:
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), \
        f"job ended {info['JobState']} exit {info['ExitCode']}\n{cluster.diagnostics(log)}"


@pytest.fixture(scope="module")
def two_node_run(_slurm_session, tmp_path_factory):
    """One finished 2-node x 2-GPU (GRES counts) job: torchrun starts 2 workers per node -> a 4-rank gloo world.
    Shared by the training checks and the conversion job."""
    tmp, steps = tmp_path_factory.mktemp("two_node"), 3
    run_dir, log = tmp / "run", tmp / "job.out"
    job = _slurm_session.submit(SCRIPT, pretrain_args(run_dir, steps, "checkpoint.interval=2"),
                                _sbatch_opts(log, gpus_per_node=2, name="smoke-2n"))
    try:
        info = _slurm_session.wait_final(job, timeout=420, log=log)
    finally:
        _slurm_session.cancel_all()
    return run_dir, log, info, steps


def test_two_node_job_trains_checkpoints_and_logs(slurm_cluster, two_node_run):
    run_dir, log, info, steps = two_node_run
    _assert_completed(slurm_cluster, info, log)
    assert info["NodeList"] == "n[1-2]" and info["Restarts"] == "0"

    text = log.read_text()
    for node in ("n1", "n2"):
        assert re.search(rf"node {node} .*2 workers", text), f"node {node} did not start 2 workers:\n{text}"
    assert f"run dir {run_dir}" in text and "SLURM_JOB_NODELIST=n[1-2]" in text  # environment logged at start
    assert (run_dir / "config.yaml").is_file()

    ckpt, common = latest_checkpoint(run_dir)
    assert ckpt.name == f"step_{steps:07d}" and common["step"] == steps
    assert common["layout"]["world"] == 4, f"expected 2 nodes x 2 workers, checkpoint says {common['layout']}"
    assert (run_dir / "checkpoints" / "step_0000002").is_dir()  # checkpoint.interval=2
    assert tensorboard_steps(run_dir) == [list(range(steps))]


def test_convert_job_exports_the_checkpoint(slurm_cluster, two_node_run, tmp_path):
    run_dir, log, info, _ = two_node_run
    _assert_completed(slurm_cluster, info, log)
    out, convert_log = tmp_path / "hf", tmp_path / "convert.out"
    job = slurm_cluster.submit("slurm/convert.sbatch",
                               ["to-hf", "--checkpoint", str(run_dir / "checkpoints"), "--output", str(out)],
                               ["--cpus-per-task=1", f"--output={convert_log}"])
    info = slurm_cluster.wait_final(job, timeout=240, log=convert_log)
    _assert_completed(slurm_cluster, info, convert_log)
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert "step_0000003 -> " in convert_log.read_text()


def test_usr2_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    """SIGUSR2 to the batch shell (what --signal=B:USR2@120 does before the time limit): the trainer saves and
    exits 0, the job requeues itself, and the second run resumes from that checkpoint instead of step 0."""
    # Enough steps that training cannot finish in the ~1 s the signal needs to arrive after the first step.
    run_dir, log, steps = tmp_path / "run", tmp_path / "job.out", 40
    job = slurm_cluster.submit(SCRIPT, pretrain_args(run_dir, steps, "checkpoint.interval=0"),
                               _sbatch_opts(log, gpus_per_node=1, name="smoke-requeue"))
    # The first progress line means every rank is inside the training loop with its signal handler installed.
    slurm_cluster.wait_until(job, lambda _: log.exists() and re.search(r"^step +\d+/", log.read_text(), re.M),
                             "the first training step", timeout=240, log=log)
    slurm_cluster.client("scancel", "--signal=USR2", "--batch", job)

    slurm_cluster.wait_until(job, lambda i: i["Restarts"] == "1", "the requeue", timeout=120, log=log)
    info = slurm_cluster.wait_final(job, timeout=240, log=log)
    _assert_completed(slurm_cluster, info, log)

    text = log.read_text()
    stopped = preempted_step(text)
    assert 0 < stopped < steps, f"the signal should stop training early, it stopped at {stopped}/{steps}"
    assert f"trainer checkpointed at step {stopped}; requeueing job {job}" in text
    assert "restart 1:" in text and f"at step {stopped}" in text  # trainer's "resumed from ... at step N"
    _, common = latest_checkpoint(run_dir)
    assert common["step"] == steps and common["layout"]["world"] == 2
    # One event file per attempt; the second attempt continues at the preempted step instead of step 0.
    first, second = tensorboard_steps(run_dir)
    assert first == list(range(stopped)) and second == list(range(stopped, steps))


def test_bad_recipe_fails_fast_with_config_error(slurm_cluster, tmp_path):
    log = tmp_path / "job.out"
    job = slurm_cluster.submit(SCRIPT, pretrain_args(tmp_path / "run", 2, "moe.top_k=1000"),
                               _sbatch_opts(log, gpus_per_node=1, name="bad-recipe"))
    info = slurm_cluster.wait_final(job, timeout=120, log=log)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0"
    text = log.read_text()
    assert "config error: moe.top_k (1000) must be in [1" in text and "invalid recipe or overrides" in text
    assert "[moetron] node" not in text and not (tmp_path / "run").exists()  # no node ever started torchrun
