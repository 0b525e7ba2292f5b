"""Checkpoint integrity and resume safety (issue 15): a re-save never leaves `latest` without a loadable
checkpoint, pruning keeps what `latest` names, other runs' checkpoints and the last one before a non-finite streak,
stale `.tmp` directories go at start, full or unwritable disks are one line, resume refuses a different model, and a
finished run restarted does nothing."""
import contextlib
import io
import json
import os
import shutil

import pytest

from launcher.train import checkpoint, checkpoint_manifest as manifest, checkpoint_root as disk
from launcher.train.checkpoint_rank0 import prepare
from parallel.groups import ParallelGroups
from tests.helpers.dist import run_distributed
from tests.launcher.train.test_train_resume import _overrides


# ---------------------------------------------------------------- commit protocol on fake checkpoints

def _fake(root, step, payload, run="r"):
    d = root / checkpoint.step_name(step)
    d.mkdir(parents=True)
    (d / "payload").write_text(payload)
    (d / "part2").write_text(payload)
    (d / disk.COMPLETE_MARKER).write_text("{}")
    (d / manifest.MANIFEST).write_text(json.dumps({"step": step, "run": run}))
    return d


def _complete(path):
    """A fake checkpoint is complete when both of its files are there and agree."""
    return ((path / "payload").is_file() and (path / "part2").is_file()
            and (path / "payload").read_text() == (path / "part2").read_text())


class Killed(BaseException):
    pass


def _kill_at(monkeypatch, n):
    """Die (BaseException, like SIGKILL: no cleanup runs) at the n-th filesystem mutation of checkpoint.py; an
    rmtree dies after deleting one file, as a kill inside rmtree would."""
    calls = {"n": 0}
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def tick():
        calls["n"] += 1
        if calls["n"] == n:
            raise Killed

    def replace(src, dst):
        tick()
        real_replace(src, dst)

    def rmtree(path, *a, **k):
        files = sorted(p for p in os.listdir(path)) if os.path.isdir(path) else []
        if files and calls["n"] + 1 == n:
            os.remove(os.path.join(path, files[0]))
        tick()
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(disk.os, "replace", replace)
    monkeypatch.setattr(disk.shutil, "rmtree", rmtree)
    return calls


@pytest.mark.parametrize("latest_step", [4, 2], ids=["resave-latest", "resave-other"])
def test_resave_never_leaves_latest_without_a_complete_checkpoint(tmp_path, monkeypatch, latest_step):
    """Every kill point of re-saving step 4 (the step `latest` names, or an older one): `latest` resolves to a
    complete checkpoint at once, and after the next start's recovery it is the old or the new copy of step 4 (or
    step 2), with no leftovers. The old save removed step 4 before renaming the new copy (resave_race.py)."""
    n = 1
    while True:
        root = tmp_path / f"kill{n}"
        _fake(root, 2, "two")
        _fake(root, 4, "old")
        disk.write_latest(root, checkpoint.step_name(latest_step))
        tmp = root / (checkpoint.step_name(4) + disk.TMP)
        tmp.mkdir()
        for f in ("payload", "part2", disk.COMPLETE_MARKER):
            (tmp / f).write_text("new")
        calls = _kill_at(monkeypatch, n)
        try:
            disk.commit(root, tmp.name, checkpoint.step_name(4))
            finished = True
        except Killed:
            finished = False
        monkeypatch.undo()
        assert _complete(disk.find_latest(root)), f"kill at mutation {n}"
        prepare(root, ParallelGroups(*(None,) * 5), resume=True)
        latest = disk.find_latest(root)
        assert _complete(latest) and (latest / "payload").read_text() in ("old", "new", "two")
        assert not [p.name for p in root.iterdir() if p.name.endswith((".tmp", ".new"))]
        if finished:
            assert latest.name == "step_0000004" and (latest / "payload").read_text() == "new"
            assert calls["n"] >= 3
            break
        n += 1


def test_stale_tmp_directories_are_removed_at_start(tmp_path):
    """tmp_accumulate.py: `.tmp` of killed saves (and of killed removals) stayed for good."""
    root = tmp_path / "ckpt"
    _fake(root, 10, "ten")
    disk.write_latest(root, "step_0000010")
    for name in ("step_0000015.tmp", "step_0000024.tmp", "step_0000005.removing.tmp", "step_0000010.new"):
        (root / name).mkdir()
        (root / name / "__0_0.distcp").write_bytes(b"x" * 100)
    assert prepare(root, ParallelGroups(*(None,) * 5), resume=True).name == "step_0000010"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000010"]


def test_prune_keeps_latest_protected_and_other_runs(tmp_path):
    root = tmp_path / "ckpt"
    for step in (5, 10):
        _fake(root, step, "A", run="A")
    for step in (1, 2, 3, 4):
        _fake(root, step, "B", run="B")
    _fake(root, 7, "B", run="B")  # B's abandoned branch (latest was moved back to step 4)
    disk.write_latest(root, "step_0000004")
    disk.prune(root, 2, "B", 4, ("step_0000001",), manifest.run_of)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001", "step_0000003", "step_0000004",
                                                      "step_0000005", "step_0000010"]


# ---------------------------------------------------------------- the trainer

def _fit(rank, world_size, overrides, nan_from=None):
    import torch

    from launcher.config import load_config
    from launcher.train.trainer import Trainer, TrainingError
    from parallel.groups import initialize

    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep))
    if nan_from is not None:
        forward = trainer._forward
        trainer._forward = lambda m, mb, x: forward(m, mb, x) * (torch.tensor(float("nan"))
                                                                 if trainer.step >= nan_from else 1.0)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            result = trainer.fit()
    except (TrainingError, checkpoint.CheckpointError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"losses": result.losses, "final": result.final_step, "checkpoint": result.checkpoint,
            "stdout": stdout.getvalue()}


def _state(root):
    return {"latest": (root / "latest").read_text().strip() if (root / "latest").exists() else None,
            "dirs": sorted(p.name for p in root.iterdir())}


def test_resume_never_in_a_used_directory_keeps_its_checkpoints_and_restarts_itself(tmp_path):
    """prune_deletes_latest.py: run B (resume=never) pruned its own new checkpoint by step order, `latest` named
    nothing, and a restart of B resumed run A's step 10."""
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    run_distributed(_fit, 1, _overrides(run, 6, "checkpoint.interval=3", "checkpoint.keep_last=2"))
    b = ("checkpoint.interval=1", "checkpoint.keep_last=2", "train.seed=99")
    out = run_distributed(_fit, 1, _overrides(run, 4, *b, "checkpoint.resume=never"))[0]
    assert out["final"] == 4  # B's step 3 replaced A's; A's step 6 is kept
    assert _state(root) == {"latest": "step_0000004", "dirs": ["latest", "step_0000003", "step_0000004",
                                                                "step_0000006"]}
    again = run_distributed(_fit, 1, _overrides(run, 4, *b))[0]
    assert again["final"] == 4 and again["losses"] == {} and again["checkpoint"].endswith("step_0000004")


def test_nonfinite_stop_keeps_and_names_the_last_checkpoint_before_the_streak(tmp_path):
    """nan_lr.py: keep_last=2 pruned every checkpoint from before the blow-up and the message pointed at an
    earlier checkpoint that did not exist."""
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    overrides = _overrides(run, 20, "checkpoint.interval=1", "checkpoint.keep_last=2",
                           "train.max_consecutive_nonfinite=4")
    out = run_distributed(_fit, 1, overrides, 3)[0]
    assert out["error"].startswith("TrainingError: 4 consecutive non-finite steps")
    assert f"'latest' now names {root / 'step_0000003'}, the last checkpoint saved before them" in out["error"]
    assert _state(root) == {"latest": "step_0000003",
                            "dirs": ["latest", "step_0000003", "step_0000005", "step_0000006"]}
    resumed = run_distributed(_fit, 1, overrides[:-1] + ["train.max_consecutive_nonfinite=4", "train.steps=5"])[0]
    assert sorted(resumed["losses"]) == [3, 4]  # resumed from step_0000003, the branch after it is replaced
    assert _state(root)["dirs"] == ["latest", "step_0000004", "step_0000005"]


def test_finished_run_restarted_does_nothing_and_writes_nothing(tmp_path):
    """Every restart of a finished run re-saved its last step (resave_race.py)."""
    run = tmp_path / "run"
    run_distributed(_fit, 1, _overrides(run, 3))
    before = {str(p): p.stat().st_mtime_ns for p in run.rglob("*")}
    out = run_distributed(_fit, 1, _overrides(run, 3))[0]
    assert out["losses"] == {} and out["final"] == 3
    assert out["stdout"].splitlines()[-1] == "[moetron] nothing to do: finished at step 3"
    assert {str(p): p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_resume_refuses_a_different_model_in_one_line(tmp_path):
    run = tmp_path / "run"
    run_distributed(_fit, 1, _overrides(run, 2))
    bad = run_distributed(_fit, 1, _overrides(run, 4, "model.num_layers=1", "moe.top_k=1", "moe.expert_bias=true"))[0]
    assert bad["error"] == (
        f"CheckpointError: cannot resume from '{run / 'checkpoints' / 'step_0000002'}': the model differs from the "
        "checkpoint's (model.num_layers 2 -> 1, moe.expert_bias False -> True, moe.top_k 2 -> 1); restore these "
        "values, or start a new run (another logging.run_dir or checkpoint.resume=never)")
    ok = run_distributed(_fit, 1, _overrides(run, 4, "optim.lr=0.005", "logging.log_interval=2"))[0]
    assert sorted(ok["losses"]) == [2, 3]  # steps, LR, logging and eval settings may change


def _fit_on_small_disk(rank, world_size, overrides, free):
    shutil.disk_usage = lambda path: shutil._ntuple_diskusage(1 << 40, (1 << 40) - free, free)
    return _fit(rank, world_size, overrides)


def test_preflight_names_the_path_and_the_bytes_needed(tmp_path):
    """disk_full_ro.py: a disk too small for keep_last + 1 checkpoints was found only when the 4th save failed."""
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    out = run_distributed(_fit_on_small_disk, 1, _overrides(run, 4, "checkpoint.interval=1", "checkpoint.keep_last=3"),
                          1000)[0]
    assert out["error"].startswith(f"CheckpointError: checkpoint.dir '{root}' is too small: 1,000 bytes free but "
                                   "this run needs ")
    assert "(4 more checkpoint(s) of " in out["error"] and "\n" not in out["error"]
    assert not (run / "tb").exists() and not list(root.iterdir())


def _enospc_at_second_save(rank, world_size, overrides):
    import errno

    from megatron.core import dist_checkpointing

    real = dist_checkpointing.save
    calls = []

    def full(sd, ckpt_dir, *a, **k):
        calls.append(ckpt_dir)
        if len(calls) == 2:
            (checkpoint.Path(ckpt_dir) / "__0_0.distcp").write_bytes(b"partial")
            raise RuntimeError("Worker failure") from OSError(errno.ENOSPC, "No space left on device")
        return real(sd, ckpt_dir, *a, **k)

    dist_checkpointing.save = full
    try:
        return _fit(rank, world_size, overrides)
    finally:
        dist_checkpointing.save = real


def test_enospc_during_a_save_is_one_line_and_removes_the_partial_tmp(tmp_path):
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    out = run_distributed(_enospc_at_second_save, 1, _overrides(run, 4, "checkpoint.interval=1"))[0]
    assert out["error"].startswith(f"CheckpointError: saving checkpoint '{root / 'step_0000002'}' failed: no space "
                                   "left on device (")
    assert "\n" not in out["error"]
    assert _state(root) == {"latest": "step_0000001", "dirs": ["latest", "step_0000001"]}


def test_unwritable_checkpoint_dir_is_one_line(tmp_path):
    """disk_full_ro.py: a checkpoint.dir that cannot be written was found only at the first save."""
    (tmp_path / "file").write_text("not a directory")
    out = run_distributed(_fit, 1, _overrides(tmp_path / "run", 2, f"checkpoint.dir={tmp_path / 'file' / 'ck'}"))[0]
    assert out["error"] == ("CheckpointError: checkpoint directory not usable: Not a directory (ENOTDIR): "
                            f"'{tmp_path / 'file' / 'ck'}'")


# ---------------------------------------------------------------- crafted checkpoints

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _reseal(ckpt):
    """Record the checkpoint's current bytes in its manifest, as a deliberate forger would."""
    value = json.loads((ckpt / manifest.MANIFEST).read_text())
    value["files"] = manifest.records(ckpt, sorted(value["files"]))
    (ckpt / manifest.MANIFEST).write_text(json.dumps(value))


def _load_everywhere(rank, world_size, ckpt, overrides):
    from launcher.config import load_config
    from launcher.train import evaluate
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize

    outcomes = []
    for attempt in (lambda: checkpoint.load_common(ckpt),
                    lambda: Trainer(load_config(None, overrides), initialize(1, 1, 1)).fit(),
                    lambda: evaluate.main(["--checkpoint", str(ckpt), "--batches", "1"])):
        try:
            outcomes.append(attempt())
        except checkpoint.CheckpointError as e:
            outcomes.append(str(e))
    return outcomes


def test_crafted_metadata_is_refused_without_running_code(tmp_path, capfd):
    """pickle_checkpoint.py: a crafted `.metadata` ran code in resume, `evaluate` and `convert to-hf`."""
    import pickle
    import subprocess
    import sys

    run = tmp_path / "run"
    run_distributed(_fit, 1, _overrides(run, 2))
    ckpt, marker = run / "checkpoints" / "step_0000002", tmp_path / "CODE_RAN"
    real = pickle.loads((ckpt / ".metadata").read_bytes())
    (ckpt / ".metadata").write_bytes(pickle.dumps((_Payload(str(marker)), real)))
    _reseal(ckpt)  # a forger rewrites the checksums too: the allowlist must still hold
    refused = (f"refusing to load '{ckpt}': it holds a pickled object outside the checkpoint allowlist "
               "(io.open); it was not written by moetron or was altered, so use another checkpoint")
    common, resume, evaluate_rc = run_distributed(_load_everywhere, 1, ckpt, _overrides(run, 4))[0]
    assert common == refused and resume == refused and evaluate_rc == 2
    p = subprocess.run([sys.executable, "-m", "launcher.convert", "to-hf", "--checkpoint", str(ckpt), "--output",
                        str(tmp_path / "hf")], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    lines = [line for line in p.stderr.splitlines() if line.strip() and "warn" not in line.lower()]
    assert p.returncode == 2 and lines == [f"moetron: checkpoint error: {refused}"], p.stderr[-3000:]
    assert not marker.exists()


def test_per_rank_objects_load_only_allowlisted_types(tmp_path):
    import io as _io
    import random

    import numpy as np
    import torch

    from launcher.train.safe_load import UnsafeCheckpointError, load_object

    state = [{"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}]
    buf = _io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = load_object(buf)[0]
    assert torch.equal(loaded["torch"], state[0]["torch"]) and loaded["python"] == state[0]["python"]
    assert (loaded["numpy"][1] == state[0]["numpy"][1]).all()
    evil = _io.BytesIO()
    torch.save([_Payload(str(tmp_path / "ran"))], evil)
    evil.seek(0)
    with pytest.raises(UnsafeCheckpointError):
        load_object(evil)
    assert not (tmp_path / "ran").exists()
