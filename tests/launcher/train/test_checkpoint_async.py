"""``checkpoint.async_save`` (issue 27): background writes give the same checkpoints and losses as synchronous
saves, every rank's files are in the manifest before ``latest`` moves, and a run killed while a background write is
going on keeps its last good checkpoint."""
import json

from launcher.train import checkpoint_manifest as manifest, checkpoint_root as disk
from tests.helpers.dist import run_distributed
from tests.launcher.train.test_checkpoint_chaos import _read_all, _same
from tests.launcher.train.test_checkpoint_safety import _fit, _state
from tests.launcher.train.test_train_resume import _overrides


def _checkpoints(root):
    """Every checkpoint's entries, without Python's ``random`` state (no run seeds it: it differs per process)."""
    out = {}
    for p in sorted(root.glob("step_*")):
        entries = _read_all(p)
        for key in [k for k in entries if k.startswith("rng/")]:
            entries[key] = [{k: v for k, v in state.items() if k != "python"} for state in entries[key]]
        out[p.name] = entries
    return out


def test_async_saves_equal_sync_saves_on_every_rank(tmp_path):
    """2 ranks (EP=2, each writes its own file), a save every 2 steps and at the end: the same tensors and
    per-rank objects, the same losses, every rank's file in each manifest, and the same resumed losses."""
    runs = {}
    for mode in ("sync", "async"):
        run = tmp_path / mode
        extra = ("parallel.ep=2", "checkpoint.interval=2", "checkpoint.keep_last=0",
                 f"checkpoint.async_save={mode == 'async'}")
        out = run_distributed(_fit, 2, _overrides(run, 5, *extra))[0]
        runs[mode] = (out, run / "checkpoints")
    (sync, sync_root), (async_, async_root) = runs["sync"], runs["async"]
    assert async_["losses"] == sync["losses"] and async_["checkpoint"].endswith("step_0000005")
    assert _state(async_root) == _state(sync_root) == {
        "latest": "step_0000005", "dirs": ["latest", "step_0000002", "step_0000004", "step_0000005"]}
    a, s = _checkpoints(async_root), _checkpoints(sync_root)
    assert a.keys() == s.keys() and all(_same(a[k], s[k]) for k in a)
    for ckpt in async_root.glob("step_*"):
        files = json.loads((ckpt / manifest.MANIFEST).read_text())["files"]
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "metadata.json"} <= set(files)
        assert manifest.problem(ckpt) is None
    resumed = {mode: run_distributed(_fit, 2, _overrides(tmp_path / mode, 7, "parallel.ep=2"))[0]["losses"]
               for mode in ("sync", "async")}
    assert sorted(resumed["async"]) == [5, 6] and resumed["async"] == resumed["sync"]


def _killed_while_writing(rank, world_size, overrides):
    """Train with async saves; the second save's write never ends; the process dies at step 5 (as a kill
    would: no cleanup)."""
    import threading

    from launcher.train.checkpoint_write import WriteJob

    real, jobs = WriteJob._write, []

    def stuck(self):
        jobs.append(self)
        if len(jobs) == 2:
            threading.Event().wait()  # the second background write never ends
        real(self)

    WriteJob._write = stuck
    from launcher.train import trainer as trainer_mod

    real_step = trainer_mod.Trainer.train_step

    def dies(self, *args, **kwargs):
        if self.step == 5:
            raise SystemExit("killed")
        return real_step(self, *args, **kwargs)

    trainer_mod.Trainer.train_step = dies
    try:
        return _fit(rank, world_size, overrides)
    except SystemExit:
        return "killed"


def test_kill_during_a_background_write_keeps_the_last_good_checkpoint(tmp_path):
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    extra = ("checkpoint.interval=2", "checkpoint.async_save=true")
    assert run_distributed(_killed_while_writing, 1, _overrides(run, 8, *extra)) == ["killed"]
    assert _state(root) == {"latest": "step_0000002", "dirs": ["latest", "step_0000002", "step_0000004.tmp"]}
    assert disk.find_latest(root).name == "step_0000002" and manifest.problem(root / "step_0000002") is None
    again = run_distributed(_fit, 1, _overrides(run, 8, *extra))[0]
    assert sorted(again["losses"]) == [2, 3, 4, 5, 6, 7]
    assert _state(root) == {"latest": "step_0000008", "dirs": ["latest", "step_0000006", "step_0000008"]}
