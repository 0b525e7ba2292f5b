"""Non-finite losses are skipped and counted, too many in a row stop the run with a clear message, and SIGUSR2
makes every rank checkpoint and exit at the next step boundary."""
import math
import signal


from tests.helpers.dist import run_distributed
from tests.launcher.train.test_train_resume import _overrides


def _train_with_faults(rank, world_size, overrides, nan_steps, signal_at, signum=signal.SIGUSR2):
    import torch

    from launcher.config import load_config
    from launcher.train.preemption import Preemption
    from launcher.train.trainer import Trainer, TrainingError
    from parallel.groups import initialize

    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep))
    forward = trainer._forward

    def faulty_forward(model, mb, x):
        out = forward(model, mb, x)
        if trainer.step in nan_steps:
            out = out * torch.tensor(float("nan"))
        if trainer.step == signal_at and rank == 0 and not raised:
            raised.append(signum)  # once, like a person pressing Ctrl-C once (the step has several micro-batches)
            signal.raise_signal(signum)
        return out

    raised = []
    trainer._forward = faulty_forward
    try:
        result = trainer.fit(Preemption())
    except TrainingError as e:
        return {"error": str(e)}
    return {"losses": result.losses, "skipped": result.skipped_steps, "final": result.final_step,
            "preempted": result.preempted, "checkpoint": result.checkpoint}


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    out = run_distributed(_train_with_faults, 1, _overrides(tmp_path, 6), {2, 3}, -1)[0]
    assert out["skipped"] == 2 and out["final"] == 6
    assert math.isnan(out["losses"][2]) and math.isnan(out["losses"][3])
    assert all(math.isfinite(out["losses"][s]) for s in (0, 1, 4, 5))


def test_too_many_nonfinite_steps_stop_with_a_clear_message(tmp_path):
    overrides = _overrides(tmp_path, 10, "train.max_consecutive_nonfinite=3")
    out = run_distributed(_train_with_faults, 1, overrides, set(range(10)), -1)[0]
    assert out["error"].startswith("3 consecutive non-finite steps (train.max_consecutive_nonfinite=3) at step 2")
    assert "lower optim.lr" in out["error"]


def test_sigusr2_checkpoints_and_exits_on_all_ranks(tmp_path):
    overrides = _overrides(tmp_path / "run", 20, "parallel.ep=2")
    results = run_distributed(_train_with_faults, 2, overrides, set(), 3)
    for out in results:  # the signal reached rank 0 only; both stopped together after step 3
        assert out["preempted"] and out["final"] == 4
        assert out["checkpoint"].endswith("step_0000004")
    assert (tmp_path / "run" / "PREEMPTED").read_text().strip() == "4"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_0000004"


def test_ctrl_c_checkpoints_at_the_step_boundary_and_exits(tmp_path):
    overrides = _overrides(tmp_path / "run", 20)
    out = run_distributed(_train_with_faults, 1, overrides, set(), 2, signal.SIGINT)[0]
    assert out["preempted"] and out["final"] == 3 and out["checkpoint"].endswith("step_0000003")
