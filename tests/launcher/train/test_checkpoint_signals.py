"""Signals around checkpoint saves (issue 27): Ctrl-C twice, the second inside the save the first asked for, keeps
that checkpoint; SIGTERM to torchrun during the final save ends without a traceback; a resumed run that changes
the micro-batch size says in one line that the data position is approximate."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.train import checkpoint_manifest as manifest, checkpoint_root as disk
from tests.helpers.dist import run_distributed
from tests.launcher.train.test_checkpoint_safety import _fit, _state
from tests.launcher.train.test_train_resume import _overrides

REPO = Path(__file__).resolve().parents[3]


def _ctrl_c_twice(rank, world_size, overrides, where):
    """First Ctrl-C before step 3 (stop after it, with a checkpoint); the second inside that save, ``where``."""
    from launcher.train import checkpoint_root, trainer as trainer_mod
    from launcher.train.checkpoint_write import WriteJob

    def ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)

    def before(owner, name, when=lambda *a: True):
        real = getattr(owner, name)

        def wrapped(*args, **kwargs):
            if when(*args):
                ctrl_c()
            return real(*args, **kwargs)
        setattr(owner, name, wrapped)

    before(trainer_mod.Trainer, "train_step", lambda self, *a: self.step == 3)
    before(*{"write": (WriteJob, "_write"), "commit": (checkpoint_root, "write_latest")}[where])
    try:
        return _fit(rank, world_size, overrides)
    except KeyboardInterrupt:
        return "stopped"


@pytest.mark.parametrize("where", ["write", "commit"])
def test_ctrl_c_twice_inside_a_save_keeps_the_checkpoint(tmp_path, where):
    """The old trainer stopped inside the save: a run saving only at its end was left with no checkpoint."""
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    assert run_distributed(_ctrl_c_twice, 1, _overrides(run, 6, "checkpoint.interval=0"), where) == ["stopped"]
    assert _state(root) == {"latest": "step_0000004", "dirs": ["latest", "step_0000004"]}
    assert manifest.problem(root / "step_0000004") is None
    again = run_distributed(_fit, 1, _overrides(run, 6, "checkpoint.interval=0"))[0]
    assert sorted(again["losses"]) == [4, 5]


def test_sigterm_to_torchrun_during_the_final_save_is_one_line(tmp_path):
    """`moetron torchrun` (launcher/torchrun.py) is torchrun whose own shutdown on a signal ends with one line: the
    workers finish the final save and `latest` names it."""
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.torchrun", "--nproc-per-node", "2", "-m", "launcher.pretrain", "--recipe",
         str(REPO / "recipes" / "smoke_cpu.yaml"), *_overrides(run, 4, "parallel.ep=2", "logging.tensorboard=false",
                                                               "model.hidden_size=128")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 240
    while not (root / "step_0000004.tmp").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert "moetron: warning: torchrun stopped by SIGTERM" in err, err
    assert proc.returncode == 128 + signal.SIGTERM
    assert disk.find_latest(root).name == "step_0000004" and manifest.problem(root / "step_0000004") is None


def _fit_warnings(rank, world_size, overrides):
    """:func:`_fit`, plus the warnings the launcher logged."""
    import logging

    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("launcher").addHandler(handler)
    return dict(_fit(rank, world_size, overrides), warnings=warnings)


def test_micro_batch_change_on_resume_is_said_in_one_line(tmp_path):
    run = tmp_path / "run"
    run_distributed(_fit, 1, _overrides(run, 2))
    out = run_distributed(_fit_warnings, 1, _overrides(run, 3, "train.micro_batch_size=4"))[0]
    assert sorted(out["losses"]) == [2]
    assert out["warnings"] == ["train.micro_batch_size changed since the checkpoint (2 -> 4): the data position is "
                               "approximate (the synthetic batches drawn from here on differ from the uninterrupted "
                               "run's); set it back to continue exactly"]
