"""Hang detection (issue 27, launcher/train/watchdog.py): when a phase outlasts train.hang_timeout_s, every rank that
can run writes its stacks to <run_dir>/hang/, one line names the ranks that stopped and their phase, and the job
exits non-zero. The demo: SIGSTOP one rank of a 2-rank torchrun."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from launcher.train.watchdog import HANG_EXIT_CODE, Watchdog
from tests.helpers.dist import free_port
from tests.launcher.test_bad_inputs import TINY

REPO = Path(__file__).resolve().parents[3]


class DictStore:
    """The three calls of torch.distributed.Store the watchdog makes, on a dict (one process, many threads)."""

    def __init__(self):
        self.data: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode()

    def get(self, key: str) -> bytes:
        return self.data[key]

    def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)


def test_a_stuck_phase_dumps_stacks_and_names_the_silent_rank(tmp_path, capsys):
    """Rank 0 of 2 stays in one phase past the timeout; rank 1 beat once (in step 3's forward_backward) and never
    answers: rank 0 dumps its stacks, reports rank 1 by its last heartbeat, writes HUNG and exits 75."""
    store, exits = DictStore(), []
    silent = Watchdog(tmp_path, 1, 2, 0.3, store, exit=exits.append, poll_s=0.05)
    silent.enter("forward_backward", 3)
    silent._beat()  # its only heartbeat: then it is stopped
    dog = Watchdog(tmp_path, 0, 2, 0.3, store, exit=exits.append, poll_s=0.05)
    dog.enter("step_reduce", 3)
    dog.start()
    dog._thread.join(timeout=10)
    assert exits == [HANG_EXIT_CODE]
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(r"moetron: hang error: no progress for over 0.3 s \(train.hang_timeout_s\): rank 1 did not "
                        r"answer \(stopped, dead or stuck outside Python; last heartbeat [\d.]+ s ago, in step 3 "
                        r"'forward_backward'\); rank 0 in step 3 'step_reduce' for up to [\d.]+ s; "
                        r"stacks in .*/hang/rank_N.txt; exiting with code 75 .*", line), line
    dump = (tmp_path / "hang" / "rank_0.txt").read_text()
    assert dump.startswith("rank 0 of 2") and "step 3 'step_reduce'" in dump
    assert "test_a_stuck_phase_dumps_stacks" in dump  # the main thread's stack, where it waits
    assert not (tmp_path / "hang" / "rank_1.txt").exists()
    assert (tmp_path / "HUNG").read_text().strip() == line.removeprefix("moetron: hang error: ")


def test_every_rank_answers_an_alarm_and_only_the_lowest_reports(tmp_path, capsys):
    store, exits = DictStore(), []
    dogs = [Watchdog(tmp_path, r, 3, 0.3 if r == 2 else 60, store, exit=exits.append, poll_s=0.05)
            for r in range(3)]
    for rank, dog in enumerate(dogs):
        dog.enter("optimizer" if rank == 2 else "step_reduce", 7)
        dog.start()
    for dog in dogs:
        dog._thread.join(timeout=10)
    assert exits == [HANG_EXIT_CODE] * 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "ranks 0,1 in step 7 'step_reduce'" in lines[0] and \
        "rank 2 in step 7 'optimizer'" in lines[0] and "did not answer" not in lines[0], lines
    assert sorted(p.name for p in (tmp_path / "hang").iterdir()) == ["rank_0.txt", "rank_1.txt", "rank_2.txt"]


def test_no_alarm_while_phases_move_on(tmp_path):
    store, exits = DictStore(), []
    dog = Watchdog(tmp_path, 0, 1, 0.3, store, exit=exits.append, poll_s=0.05).start()
    for step in range(20):
        dog.enter("forward_backward", step)
        time.sleep(0.05)
    dog.enter(None, 20)
    time.sleep(0.5)  # nothing watched between runs
    dog.stop()
    assert exits == [] and not (tmp_path / "hang").exists()


def _rank_pid(torchrun: subprocess.Popen, rank: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(torchrun.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank):
                    return child.pid
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank}")


def test_sigstop_one_rank_of_two(tmp_path):
    """The demo: a 2-rank CPU run, rank 1 stopped after the second step; with train.hang_timeout_s=5 rank 0
    reports within seconds, the job exits non-zero (rank 0's code 75 in torchrun's report) and rank 0's stacks
    are on disk."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "launcher.pretrain", "--recipe", str(REPO / "recipes" /
           "smoke_cpu.yaml"), *TINY, "train.steps=100000", "train.global_batch_size=4", "logging.log_interval=1",
           "train.hang_timeout_s=5", f"logging.run_dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout: list[str] = []
    stderr: list[str] = []
    readers = [threading.Thread(target=lambda src=src, dst=dst: dst.extend(src), daemon=True)
               for src, dst in ((proc.stdout, stdout), (proc.stderr, stderr))]
    for reader in readers:
        reader.start()
    rank1 = None
    try:
        deadline = time.monotonic() + 120
        while not any(re.match(r"step\s+2/", line) for line in list(stdout)):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(stderr)
            time.sleep(0.1)
        rank1 = _rank_pid(proc, 1)
        time.sleep(2)  # a few heartbeats into training, so rank 1's last one names a training phase
        os.kill(rank1, signal.SIGSTOP)
        stopped_at = time.monotonic()
        while not any("hang error" in line for line in list(stderr)):
            assert time.monotonic() - stopped_at < 60 and proc.poll() is None, "".join(stderr)
            time.sleep(0.1)
        detected_after = time.monotonic() - stopped_at
        os.kill(rank1, signal.SIGKILL)  # torchrun's SIGTERM would wait for a stopped process
        proc.wait(timeout=60)
        for reader in readers:
            reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        if rank1 is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rank1, signal.SIGKILL)
    hang = [line.strip() for line in stderr if "hang error" in line]
    print("\n".join(hang), f"(detected {detected_after:.1f} s after SIGSTOP)")
    assert len(hang) == 1 and re.search(r"rank 1 did not answer \(stopped, dead or stuck outside Python; last "
                                        r"heartbeat [\d.]+ s ago, in step \d+ '(data|forward_backward|optimizer|"
                                        r"step_reduce)'", hang[0]), hang
    assert re.search(r"rank 0 in step \d+ '\w+' for up to", hang[0]), hang[0]
    assert proc.returncode != 0 and f"exitcode  : {HANG_EXIT_CODE}" in "".join(stderr)
    assert detected_after < 30
    assert "File " in (run_dir / "hang" / "rank_0.txt").read_text()
    assert (run_dir / "HUNG").is_file()
