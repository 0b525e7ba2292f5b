"""Chaos test (issue 15): SIGKILL a real training run at seeded random moments, most of them inside checkpoint
saves, for one process and for a 4-rank torchrun (TP=2 x EP=2), then restart it until it finishes.

After every kill: no process of the run survives (a machine death kills them all; killing torchrun alone must take
its workers down by themselves, ``launcher/env.py``), ``latest`` names a complete checkpoint whose common state and
every tensor and per-rank object load through the restricted unpickler, it never moves back, and the run keeps its
lineage. Every restart resumes from exactly that checkpoint and prints, for every step it runs, the uninterrupted
run's loss, LR and grad norm; the last one's TensorBoard losses (float32) and its final checkpoint (weights, AdamW
moments, buffers, data-loader state) are bit-identical to the uninterrupted run's (fp32, synthetic data, same
layout). Every launch runs under a subreaper, so orphaned workers are not re-parented to init.

The kill schedule is fixed by :data:`SEED` and printed (pytest shows it on failure, or with ``-s``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch

from launcher.train import checkpoint, checkpoint_manifest as manifest, checkpoint_root as disk
from tests.helpers.dist import free_port, run_distributed
from tests.launcher.train.test_train_resume import _overrides

ROOT = Path(__file__).resolve().parents[3]
RECIPE = ROOT / "recipes" / "smoke_cpu.yaml"
SEED = 1515
POLL_S = 0.002
SEGMENT_TIMEOUT_S = 180.0
WORKERS_EXIT_S = 5.0
"""How long workers may outlive a killed torchrun once they run (PDEATHSIG or the parent watchdog)."""
STARTUP_EXIT_S = 30.0
"""...and while they start up: they notice at the end of start-up (``env.parallel_session``), before megatron."""
PROGRESS = re.compile(r"^step\s+(\d+)/\d+ \| loss (\S+) \| lr (\S+) \| gnorm (\S+) \|", re.MULTILINE)
RESUMED = re.compile(r"^\[moetron\] resumed from (\S+) at step (\d+)$", re.MULTILINE)
SUBREAPER = """
import ctypes, os, subprocess, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: the launch's orphans come here, not to init
launcher, code = subprocess.Popen(sys.argv[1:]), None
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        sys.exit(code)
    if pid == launcher.pid:
        code = os.waitstatus_to_exitcode(status)
        code = 128 - code if code < 0 else code
"""
"""Every launch runs under this: a supervisor that adopts orphans (systemd --user, some container inits), where a
worker cannot tell its launcher died by being re-parented to init. It exits once every descendant has, with the
launcher's exit status (128 + signal when killed)."""


@dataclasses.dataclass
class Kill:
    """One SIGKILL. ``when``: "save" = ``delay_s`` after the ``n``-th checkpoint save of the launch starts (its
    ``step_N.tmp`` appears); "commit" = as soon as that save renames ``step_N.tmp`` to ``step_N`` (while or just
    after ``latest`` moves and older checkpoints are pruned); "time" = ``delay_s`` after launch (start-up, resume,
    training or a save), at the latest when the ``n``-th save starts; "startup" = as soon as every torchrun worker
    is importing torch (before any can ask for PDEATHSIG). ``target``: "all" = the machine dies (every process of
    the run at once), "launcher" = torchrun alone (its workers must then exit by themselves)."""
    when: str
    n: int
    delay_s: float = 0.0
    target: str = "all"
    outcome: str = ""

    def __str__(self) -> str:
        what = {"save": f"{self.delay_s:.3f}s after save #{self.n} starts",
                "commit": f"when save #{self.n} renames its .tmp",
                "time": f"{self.delay_s:.2f}s after launch (at the latest at save #{self.n})",
                "startup": "while its workers import torch"}[self.when]
        return f"kill -9 {self.target} {what}: {self.outcome or 'not run'}"


def _schedule(world: int) -> list[Kill]:
    """Seeded: the single process dies 5 times (twice while a save writes, once at its commit, once anywhere in or
    after a save, once at a random moment); the 4-rank run 3 times (the machine while a save writes, torchrun alone
    in or after a save, torchrun alone during start-up). A kill lands at or before its launch's 2nd save, so the
    run advances at most 2 steps per kill and the last launch still trains (train.steps below). The first save
    kill has no delay: it lands inside the save for sure (a save takes 10-100 ms here)."""
    rng = random.Random(SEED + world)
    if world == 1:
        kills = [Kill("save", rng.choice((1, 2)), rng.uniform(0.0, 0.03)) for _ in range(2)]
        kills += [Kill("commit", rng.choice((1, 2))), Kill("save", rng.choice((1, 2)), rng.uniform(0.0, 0.15)),
                  Kill("time", 2, rng.uniform(0.5, 6.0))]
    else:
        kills = [Kill("save", rng.choice((1, 2)), rng.uniform(0.0, 0.08)),
                 Kill("save", rng.choice((1, 2)), rng.uniform(0.0, 0.15), target="launcher"),
                 Kill("startup", 1, target="launcher")]
    rng.shuffle(kills)
    next(k for k in kills if k.when == "save").delay_s = 0.0
    return kills


# ---------------------------------------------------------------- runs

def _config(run_dir: Path, steps: int, extra: tuple[str, ...]) -> list[str]:
    return _overrides(run_dir, steps, *extra, "checkpoint.interval=1", "checkpoint.keep_last=2")


def _reference(rank, world_size, overrides):
    """The uninterrupted run (same code path as launcher.pretrain: Trainer.fit); rank 0 returns its console."""
    import io

    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize

    cfg = load_config(str(RECIPE), overrides)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = Trainer(cfg, initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)).fit()
    return {"losses": result.losses, "stdout": stdout.getvalue(), "final": result.final_step}


def _launch(world: int, overrides: list[str], log: Path) -> subprocess.Popen:
    """``python -m launcher.pretrain`` or a 4-rank torchrun under :data:`SUBREAPER`, in a session of its own."""
    cmd = [sys.executable, "-m", "launcher.pretrain"] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr",
         "127.0.0.1", "--master-port", str(free_port()), "-m", "launcher.pretrain"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-c", SUBREAPER, *cmd, "--recipe", str(RECIPE), *overrides],
                                cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _processes_of(run_dir: Path) -> list[psutil.Process]:
    """Live processes launched for ``run_dir`` (torchrun, its workers, anything they forked): the run directory
    is on their command line."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and any(str(run_dir) in a for a in p.info["cmdline"] or ()):
            out.append(p)
    return out


def _sigkill(pids: list[int], group: bool = False) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            (os.killpg if group else os.kill)(pid, signal.SIGKILL)


class _Pids:
    """The launch's processes, learned while it starts (so a kill is a few syscalls, no process scan): the
    supervisor (session leader: it and the launcher share its process group), the launcher, and torchrun's
    workers (each leads a process group of its own, holding anything it forks)."""

    def __init__(self, supervisor: int, world: int):
        self.supervisor, self.world = supervisor, world
        self.launcher: int | None = None
        self.workers: list[int] = []
        self._next = 0.0

    def refresh(self) -> None:
        complete = self.launcher is not None and (self.world == 1 or bool(self.workers))
        if complete or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + 0.02
        with contextlib.suppress(psutil.NoSuchProcess):
            if self.launcher is None:
                self.launcher = next((c.pid for c in psutil.Process(self.supervisor).children()), None)
            if self.launcher is not None and self.world > 1:
                workers = [c.pid for c in psutil.Process(self.launcher).children()]
                self.workers = workers if len(workers) == self.world else []

    def kill_all(self) -> None:
        """The machine dies: every process of the launch at once."""
        _sigkill([self.supervisor, *self.workers], group=True)


class _Trigger:
    """When ``kill`` is due. A save has begun once its ``.tmp`` appears and committed once its ``step_N`` appears
    (either left by an earlier launch counts only after it went away) or ``latest`` names its step; start-up, once
    every worker has mapped libtorch."""

    def __init__(self, kill: Kill, root: Path, start: int):
        self.kill, self.root, self.t0 = kill, root, time.monotonic()
        self.step = start + kill.n
        self.path = root / (checkpoint.step_name(self.step) + ("" if kill.when == "commit" else disk.TMP))
        self.stale = self.path.exists()
        self.saving = root / (checkpoint.step_name(self.step) + disk.TMP)
        self.importing: set[int] = set()

    def spin(self) -> bool:
        """Poll without sleeping: a commit is due within the save now writing (a rename, ``latest``, pruning)."""
        return self.kill.when == "commit" and not self.stale and self.saving.exists()

    def due(self, pids: _Pids) -> bool:
        exists = self.path.exists()
        self.stale = self.stale and exists
        if (exists and not self.stale) or _latest_step(self.root) >= self.step:
            return True
        if self.kill.when == "time":
            return time.monotonic() - self.t0 >= self.kill.delay_s
        if self.kill.when == "startup":
            for pid in set(pids.workers) - self.importing:
                with contextlib.suppress(OSError):
                    if "libtorch" in Path(f"/proc/{pid}/maps").read_text():
                        self.importing.add(pid)
            return bool(pids.workers) and self.importing == set(pids.workers)
        return False


def _run_segment(world: int, overrides: list[str], run_dir: Path, log: Path, start: int,
                 kill: Kill | None) -> int:
    """Run one launch to its end or to ``kill``; returns its exit status (128 + signal when its launcher was
    killed; -9 when the machine died). Raises AssertionError when a kill leaves a process of the run alive or the
    launch hangs."""
    root = run_dir / "checkpoints"
    proc = _launch(world, overrides, log)
    pids, t0 = _Pids(proc.pid, world), time.monotonic()
    trigger = _Trigger(kill, root, start) if kill else None
    try:
        while proc.poll() is None:
            if time.monotonic() - t0 > SEGMENT_TIMEOUT_S:
                raise AssertionError(f"launch hung for {SEGMENT_TIMEOUT_S}s")
            pids.refresh()
            if trigger and trigger.due(pids):
                if kill.when == "save" and kill.delay_s:
                    time.sleep(kill.delay_s)
                return _kill(proc, pids, kill, run_dir)
            if not (trigger and trigger.spin()):
                time.sleep(POLL_S)
        return proc.returncode
    finally:  # a no-op unless an assertion broke off the run
        pids.kill_all()
        _sigkill([p.pid for p in _processes_of(run_dir)])
        proc.wait()


def _kill(proc: subprocess.Popen, pids: _Pids, kill: Kill, run_dir: Path) -> int:
    if kill.target == "launcher":
        assert pids.workers, "torchrun has no workers to orphan"
        _sigkill([pids.launcher])
        limit = STARTUP_EXIT_S if kill.when == "startup" else WORKERS_EXIT_S
        try:  # the supervisor exits once it has reaped every orphan
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            alive = [" ".join(psutil.Process(pid).cmdline())[:100] for pid in pids.workers if psutil.pid_exists(pid)]
            raise AssertionError(f"torchrun killed, workers still running after {limit}s: {alive}") from None
    else:
        pids.kill_all()
        _sigkill([p.pid for p in _processes_of(run_dir)])  # any process started since the last refresh
        proc.wait()
    deadline = time.monotonic() + WORKERS_EXIT_S  # SIGKILLed processes take a moment to be torn down
    while (survivors := _processes_of(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not survivors, f"still running after kill -9 {kill.target}: {[' '.join(p.cmdline()) for p in survivors]}"
    return proc.returncode


def _latest_step(root: Path) -> int:
    name = (root / disk.LATEST).read_text().strip() if (root / disk.LATEST).is_file() else ""
    m = re.match(r"step_(\d{7})", name)
    return int(m.group(1)) if m else -1


# ---------------------------------------------------------------- checks

def _read_all(ckpt: Path) -> dict[str, Any]:
    """Every tensor and per-rank object of a checkpoint, read through torch DCP with the restricted unpickler
    (so each shard file is there, whole and allowed); megatron's common state is left out (it names the run dir)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from launcher.train.safe_load import restricted_unpickling

    with restricted_unpickling():
        meta = FileSystemReader(str(ckpt)).read_metadata()
        sd = {k: torch.empty(m.size, dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata) else None
              for k, m in meta.state_dict_metadata.items()}
        dcp_load(sd, storage_reader=FileSystemReader(str(ckpt)), no_dist=True)
    return {k: v for k, v in sd.items() if not k.startswith("common_state/")}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _check_latest(root: Path, keys: set[str], previous: int, lineage: str | None) -> tuple[int, str | None]:
    """``latest`` right after a kill (before any restart tidies up): the complete checkpoint it names loads, it
    is not older than before, and it belongs to the run's lineage. Returns (its step, lineage); (0, None) when
    nothing was ever committed."""
    latest = disk.find_latest(root) if root.is_dir() else None  # CheckpointError if it names nothing
    if latest is None:
        assert previous == 0, f"'latest' vanished (it named step {previous})"
        return 0, None
    common = checkpoint.load_common(latest)
    step = int(common["step"])
    assert latest.name.removesuffix(disk.NEW) == checkpoint.step_name(step)
    assert step >= previous, f"'latest' moved back from step {previous} to {step}"
    assert set(_read_all(latest)) == keys, f"{latest} lacks entries"
    run = manifest.run_of(latest)
    assert run and run == (lineage or run), f"{latest} belongs to run {run}, not to the resumed run {lineage}"
    return step, run


def _progress(text: str) -> dict[int, tuple[str, str, str]]:
    return {int(s): tuple(rest) for s, *rest in PROGRESS.findall(text)}


def _check_console(text: str, start: int, reference: dict[int, tuple], resumed_from: Path | None) -> list[int]:
    """A launch resumed from the checkpoint ``latest`` named and printed the uninterrupted run's loss, LR and grad
    norm for each step it ran, with no step skipped or repeated; returns those steps."""
    resumed = RESUMED.findall(text)
    lines = PROGRESS.findall(text)
    steps = [int(s) for s, *_ in lines]
    if resumed_from is None:
        assert not resumed, f"resumed although 'latest' named nothing: {resumed}"
    elif resumed or steps:
        assert resumed == [(str(resumed_from.with_name(checkpoint.step_name(start))), str(start))], resumed
    assert steps == list(range(start, start + len(steps))), f"steps {steps} after resuming at {start}"
    for s, *fields in lines:
        assert tuple(fields) == reference[int(s)], f"step {s}: {fields} != uninterrupted {reference[int(s)]}"
    return steps


def _tb_losses(event_file: Path) -> dict[int, float]:
    """train/loss per step of one event file (the loader migrates scalars to float32 tensors)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    return {e.step: float(make_ndarray(v.tensor)) for e in EventFileLoader(str(event_file)).Load()
            for v in e.summary.value if v.tag == "train/loss"}


def _check_kill(kill: Kill, root: Path, ran: list[int], keys: set[str], start: int,
               lineage: str | None) -> tuple[int, str | None]:
    """Record what ``kill`` hit and check ``latest`` (see :func:`_check_latest`)."""
    left = sorted(p.name for p in root.iterdir() if p.name.endswith((disk.TMP, disk.NEW))) \
        if root.is_dir() else []
    kill.outcome = (f"ran steps {ran[0]}..{ran[-1]}" if ran else "ran no step") + \
        (f", left {', '.join(left)}" if left else "")
    start, lineage = _check_latest(root, keys, start, lineage)
    kill.outcome += f", latest step {start}"
    return start, lineage


def _check_final(root: Path, run_dir: Path, ran: list[int], steps: int, ref: dict, ref_final: dict,
                 events_before: set[Path]) -> None:
    """The last launch trained to the end; its TensorBoard losses and final checkpoint are the uninterrupted
    run's, bit for bit; nothing of a killed save is left."""
    assert ran and ran[-1] == steps - 1, f"the last launch ran {ran}"
    new_events = sorted(set((run_dir / "tb").glob("events.*")) - events_before)
    assert len(new_events) == 1, new_events
    assert _tb_losses(new_events[0]) == {s: float(np.float32(ref["losses"][s])) for s in ran}
    final = _read_all(disk.find_latest(root))
    assert final.keys() == ref_final.keys()
    # the global torch/python/numpy RNG states are the process's own (the trainer never seeds them and nothing in
    # training draws from them: model init and M-MoE draws use keyed generators), so they are only checked to load
    differ = [k for k in final if not k.startswith("rng/") and not _same(final[k], ref_final[k])]
    assert not differ, f"final checkpoint differs from the uninterrupted run's in {differ}"
    assert not [p.name for p in root.iterdir() if p.name.endswith((disk.TMP, disk.NEW))]


@pytest.mark.parametrize("world,extra,steps", [(1, (), 12), (4, ("parallel.tp=2", "parallel.ep=2"), 6)],
                         ids=["single", "tp2-ep2"])
def test_kill_9_anywhere_keeps_latest_loadable_and_resume_exact(tmp_path, world, extra, steps):
    ref = run_distributed(_reference, world, _config(tmp_path / "reference", steps, extra))[0]
    reference = _progress(ref["stdout"])
    assert ref["final"] == steps and sorted(reference) == list(range(steps))
    ref_final = _read_all(tmp_path / "reference" / "checkpoints" / checkpoint.step_name(steps))

    run_dir = tmp_path / "chaos"
    root, overrides, kills = run_dir / "checkpoints", _config(run_dir, steps, extra), _schedule(world)

    def story() -> str:
        return "\n".join([f"seed {SEED + world}, {world} process(es), {steps} steps",
                          *(f"  {i}. {k}" for i, k in enumerate(kills, 1))])

    print(story())
    start, lineage = 0, None
    try:
        for i, kill in enumerate(kills):
            latest = disk.find_latest(root) if root.is_dir() else None
            rc = _run_segment(world, overrides, run_dir, tmp_path / f"launch{i}.log", start, kill)
            text = (tmp_path / f"launch{i}.log").read_text(errors="replace")
            killed = -signal.SIGKILL if kill.target == "all" else 128 + signal.SIGKILL
            assert rc == killed, f"launch {i} ended by itself (rc {rc}) before its kill:\n{text[-3000:]}"
            ran = _check_console(text, start, reference, latest)
            start, lineage = _check_kill(kill, root, ran, set(ref_final), start, lineage)
        assert any(".tmp" in k.outcome for k in kills), "no kill landed inside a save"
        latest, events_before = disk.find_latest(root), set((run_dir / "tb").glob("events.*"))
        rc = _run_segment(world, overrides, run_dir, tmp_path / "last.log", start, None)
        text = (tmp_path / "last.log").read_text(errors="replace")
        assert rc == 0, f"the last launch failed (rc {rc}):\n{text[-3000:]}"
        assert f"[moetron] done: step {steps}, checkpoint {root / checkpoint.step_name(steps)}" in text
        ran = _check_console(text, start, reference, latest)
        _check_final(root, run_dir, ran, steps, ref, ref_final, events_before)
    except Exception as e:
        raise AssertionError(f"{e}\nkill schedule:\n{story()}") from e
    print(story())
