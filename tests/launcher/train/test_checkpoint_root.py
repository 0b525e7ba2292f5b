"""The checkpoint root's directory protocol against hostile entries (issue 27): commit, prune and the start-up tidy
delete only real directories with protocol names inside the root, never follow a link, and refuse a hostile
``latest`` before touching anything; every row keeps a victim directory outside the root and a note next to it."""
import json
import os

import pytest

from launcher.train import checkpoint_manifest as manifest, checkpoint_root as disk
from launcher.train.checkpoint_rank0 import prepare
from parallel.groups import ParallelGroups
from tests.launcher.test_bad_inputs import _tree


def _checkpoint(path, step, run="r"):
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"x" * 64)
    (path / disk.COMPLETE_MARKER).write_text("{}")
    (path / manifest.MANIFEST).write_text(json.dumps({"step": step, "run": run}))


@pytest.fixture
def world(tmp_path):
    """``root`` with run r's step_0000002 named by latest; ``victim``, another checkpoint of run r outside it."""
    root, victim = tmp_path / "run" / "checkpoints", tmp_path / "victim"
    _checkpoint(root / "step_0000002", 2)
    disk.write_latest(root, "step_0000002")
    _checkpoint(victim, 1)
    (tmp_path / "run" / "notes.txt").write_text("next to the root")
    return root, victim


def _link(name):
    return lambda root, victim: (root / name).symlink_to(victim, target_is_directory=True)


def _prune(root):
    disk.prune(root, 1, "r", 2, (), manifest.run_of)


def _tidy(resume):
    return lambda root: prepare(root, ParallelGroups(*(None,) * 5), resume=resume)


def _commit_over(root):
    (root / "step_0000004.tmp").mkdir()
    disk.commit(root, "step_0000004.tmp", "step_0000004")


ROWS = {  # name -> (what is planted in the root, what runs, the error it must raise or None)
    "prune-skips-a-linked-step": (_link("step_0000001"), _prune, None),
    "prune-skips-a-file-named-like-a-step": (lambda root, v: (root / "step_0000001").write_text("mine"), _prune, None),
    "prune-skips-a-directory-without-manifest": (
        lambda root, v: (root / "step_0000001").mkdir(), _prune, None),
    "prune-skips-another-runs-step": (lambda root, v: _checkpoint(root / "step_0000001", 1, run="other"), _prune,
                                      None),
    "tidy-leaves-a-linked-tmp": (_link("step_0000003.tmp"), _tidy(True), None),
    "tidy-leaves-a-linked-removing-tmp": (_link("step_0000003.removing.tmp"), _tidy(True), None),
    "tidy-leaves-a-linked-new": (_link("step_0000003.new"), _tidy(True), None),
    "commit-refuses-to-replace-a-linked-step": (_link("step_0000004"), _commit_over,
                                                "step_0000004' is a symbolic link, not a checkpoint directory"),
    "latest-new-names-a-link": (lambda root, v: (_link("step_0000005.new")(root, v),
                                                 disk.write_latest(root, "step_0000005.new")), _tidy(True),
                                "names 'step_0000005.new', which is a symbolic link"),
    "resume-never-keeps-a-hostile-latest": (lambda root, v: (root / "latest").write_bytes(b"../../victim\n"),
                                            _tidy(False), "holds b'../../victim\\n', not a checkpoint name"),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_protocol_never_touches_what_it_did_not_write(tmp_path, world, row):
    root, victim = world
    plant, act, error = ROWS[row]
    plant(root, victim)
    before = _tree(tmp_path)
    if error is None:
        act(root)
        after = _tree(tmp_path)
        assert after == before
    else:
        with pytest.raises(disk.CheckpointError, match=None) as e:
            act(root)
        assert error in str(e.value) and "\n" not in str(e.value)
        after = _tree(tmp_path)
        assert {k: v for k, v in after.items() if "step_0000004.tmp" not in k} == before


def test_remove_refuses_names_outside_the_protocol(tmp_path):
    (tmp_path / "important").mkdir()
    for name in ("important", "..", "../important", "latest", "step_1"):
        with pytest.raises(disk.CheckpointError, match="not a name moetron gives checkpoints"):
            disk.remove(tmp_path, name)
    assert (tmp_path / "important").is_dir() and os.listdir(tmp_path) == ["important"]
