"""A run that crashed after its last checkpoint and is resumed logs each step once: the events the crashed run wrote
at and after the resume step are purged (TensorBoard's restart handling), not shown twice."""
import pytest

from tests.helpers.dist import run_distributed
from tests.launcher.train.test_train_resume import _overrides


class Crash(RuntimeError):
    pass


def _run(rank, world, run_dir, steps, crash_at):
    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize

    cfg = load_config(None, _overrides(run_dir, steps, "checkpoint.interval=3", "logging.tensorboard=true"))
    trainer = Trainer(cfg, initialize(1, 1, 1))
    forward = trainer._forward

    def crashing(model, mb, x):
        if trainer.step == crash_at:
            trainer.writer.close()  # the events written so far reached the disk before the node died
            raise Crash(f"node lost at step {crash_at}")
        return forward(model, mb, x)

    trainer._forward = crashing
    try:
        trainer.fit()
    except Crash:
        return "crashed"
    return "finished"


def test_resumed_run_logs_every_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run_distributed(_run, 1, str(tmp_path), 8, 5)[0] == "crashed"  # steps 0-4 logged, checkpoint at 3
    assert run_distributed(_run, 1, str(tmp_path), 8, -1)[0] == "finished"  # resumes at 3, repeats 3 and 4
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("train/loss", "train/step_time_s"):
        assert [e.step for e in events.Scalars(tag)] == list(range(8)), tag


def _train_logging_every_3(rank, world, run_dir):
    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize

    cfg = load_config(None, _overrides(run_dir, 8, "logging.log_interval=3", "train.exit_interval=5",
                                       "logging.tensorboard=true"))
    return Trainer(cfg, initialize(1, 1, 1)).fit().losses


def test_the_last_step_of_a_run_reaches_tensorboard(tmp_path):
    """Steps 4 (train.exit_interval=5 ends the first run) and 7 (train.steps=8 ends the resumed one) are not
    multiples of logging.log_interval=3, yet their losses are logged: a run's final loss is always in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = run_distributed(_train_logging_every_3, 1, str(tmp_path))[0]
    second = run_distributed(_train_logging_every_3, 1, str(tmp_path))[0]
    assert sorted(first) == [0, 1, 2, 3, 4] and sorted(second) == [5, 6, 7]
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(logged) == [0, 3, 4, 6, 7]
    for step, value in logged.items():
        assert value == pytest.approx({**first, **second}[step], rel=1e-6)
    assert [e.step for e in events.Scalars("train/step_time_s")] == [0, 3, 4, 6, 7]
