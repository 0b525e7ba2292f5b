"""One run per run directory (issue 27, launcher/train/run_lock.py): a second pretrain on a directory in use is one
line, exit code 2, and touches nothing; a lock left by a run that is gone is recognised and taken over."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import pretrain
from launcher.train import run_lock
from launcher.train.run_lock import LOCK_NAME, Holder, RunDirLocked, RunLock, check_node_view
from tests.launcher.test_bad_inputs import REPO, TINY, _cli, run_pretrain  # noqa: F401 (fixture)

HOLD = ("import sys, time; from pathlib import Path; from launcher.train.run_lock import RunLock; "
        "RunLock(Path(sys.argv[1]), 'holder-job'); print('locked', flush=True); time.sleep(600)")


@pytest.fixture
def holder(tmp_path):
    """A process that holds the lock of ``tmp_path / 'run'`` (the run directory of ``run_pretrain``)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("overrides", [[], ["checkpoint.resume=never", "train.seed=7"]],
                         ids=["same config", "resume=never, another seed"])
def test_second_run_on_a_locked_dir_is_one_line(run_pretrain, holder, tmp_path, overrides):  # noqa: F811
    line = run_pretrain(*overrides)
    assert re.fullmatch(rf"moetron: run error: '{tmp_path / 'run'}' is in use by another moetron run \(host "
                        rf"{socket.gethostname()}, pid {holder.pid}, since [-\d :]+\): wait for it to finish or stop "
                        r"it, or give this run another logging.run_dir \(and checkpoint.dir\)", line), line
    assert holder.poll() is None
    assert [p.name for p in (tmp_path / "run").iterdir()] == [LOCK_NAME]  # nothing written
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == holder.pid


def test_lock_of_a_killed_run_is_taken_over(holder, tmp_path, capsys, monkeypatch):
    from tests.helpers.dist import free_port

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "r.yaml").write_text("{}\n")
    code = pretrain.main(["--recipe", str(tmp_path / "r.yaml"), *TINY, f"logging.run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"taking over the stale lock of '{tmp_path / 'run'}' from a run that is gone (host " \
           f"{socket.gethostname()}, pid {holder.pid}" in err
    assert (tmp_path / "run" / LOCK_NAME).read_text() == ""  # released at the end: free


def _record(directory: Path, mtime_age: float = 0.0, **fields) -> None:
    me = Holder.this_process("other-job")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    path.write_text(json.dumps({**me.__dict__, **fields}))
    os.utime(path, (time.time() - mtime_age,) * 2)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


RECORDS = {  # name: (record fields, file age in s, env, taken over?, message when refused)
    "this host, alive": (lambda: {"pid": os.getppid(), "start": run_lock._process_start(os.getppid())}, 0, {},
                         False, "is in use by another moetron run (host"),
    "this host, dead": (lambda: {"pid": _dead_pid(), "start": ""}, 0, {}, True, None),
    "this host, pid reused": (lambda: {"pid": os.getppid(), "start": "1"}, 0, {}, True, None),
    "other host, fresh": (lambda: {"host": "node-b"}, 10, {}, False, "its lock was refreshed 10 s ago and counts "
                                                                      "as stale 300 s after that, or delete"),
    "other host, stale": (lambda: {"host": "node-b"}, 400, {}, True, None),
    "other host, previous attempt of this Slurm job": (
        lambda: {"host": "node-b", "slurm_job": "77", "slurm_restart": 0}, 10,
        {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}, True, None),
    "other host, another Slurm job": (lambda: {"host": "node-b", "slurm_job": "76"}, 10,
                                      {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}, False, "Slurm job 76"),
}


@pytest.mark.parametrize("case", list(RECORDS))
def test_a_recorded_holder_is_refused_unless_gone(tmp_path, monkeypatch, case):
    """The record decides where flock cannot (a file system without it, or one that locks per node)."""
    fields, age, env, taken, message = RECORDS[case]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _record(tmp_path, age, **fields())
    if taken:
        lock = RunLock(tmp_path, "this-job")
        assert json.loads((tmp_path / LOCK_NAME).read_text())["job"] == "this-job"
        lock.release()
    else:
        with pytest.raises(RunDirLocked, match=re.escape(message)):
            RunLock(tmp_path, "this-job")
        assert json.loads((tmp_path / LOCK_NAME).read_text())["job"] == "other-job"  # untouched


def test_every_other_node_checks_its_view(tmp_path):
    assert "holds no lock of this run: logging.run_dir and checkpoint.dir must be on a file system shared by every " \
           "node" in check_node_view(tmp_path, "job-1")
    lock = RunLock(tmp_path, "job-1")
    assert check_node_view(tmp_path, "job-1") is None
    assert "is in use by another moetron run" in check_node_view(tmp_path, "job-2")
    lock.release()


def test_run_dir_that_cannot_be_created_is_one_line(run_pretrain, tmp_path):  # noqa: F811
    (tmp_path / "a_file").write_text("")
    line = run_pretrain(f"logging.run_dir={tmp_path / 'a_file' / 'run'}")
    assert line == (f"moetron: run error: cannot create the lock file '{tmp_path / 'a_file' / 'run' / LOCK_NAME}' (Not "
                    "a directory): logging.run_dir and checkpoint.dir must be writable directories"), line


def test_checkpoint_dir_outside_the_run_dir_is_locked_too(tmp_path):
    assert run_lock.directories(str(tmp_path / "run"), str(tmp_path / "run" / "checkpoints")) == [tmp_path / "run"]
    assert run_lock.directories(str(tmp_path / "run"), str(tmp_path / "ckpt")) == [tmp_path / "run", tmp_path / "ckpt"]


def test_two_pretrain_processes_on_one_run_dir(tmp_path):
    """The issue's case at the process boundary: the second `moetron pretrain` is refused while the first runs."""
    recipe, run_dir = str(REPO / "recipes" / "smoke_cpu.yaml"), tmp_path / "run"
    args = ["launcher.pretrain", "--recipe", recipe, *TINY, "train.steps=100000", f"logging.run_dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    first = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env={**env, "OMP_NUM_THREADS": "1"})
    try:
        for line in first.stdout:
            if re.match(r"step\s+\d+/", line):
                break
        second = _cli(*args)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert lines[0].startswith(f"moetron: run error: '{run_dir}' is in use by another moetron run")
        assert f"pid {first.pid}" in lines[0] and first.poll() is None
    finally:
        first.kill()
        first.wait()
