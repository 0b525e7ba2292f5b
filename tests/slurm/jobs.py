"""What a finished training run left in its run directory: TensorBoard steps, checkpoints, job log lines.

Shared by the Slurm tests and the single-node torchrun smoke test, so both check a run the same way.
"""
from __future__ import annotations

import re
from pathlib import Path

RECIPE = "recipes/smoke_cpu.yaml"
# Fast on CPU whatever the recipe's defaults are (gloo is picked by parallel.backend=auto). The global batch
# of 4 sequences divides evenly over 1, 2 and 4 data-parallel ranks.
SMOKE_OVERRIDES = ["data.source=synthetic", "model.num_layers=2", "model.seq_length=32",
                   "train.micro_batch_size=1", "train.global_batch_size=4",
                   "logging.log_interval=1", "logging.tensorboard=true", "checkpoint.resume=auto"]


def pretrain_args(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [RECIPE, *SMOKE_OVERRIDES, f"train.steps={steps}", f"logging.run_dir={run_dir}", *extra]


def tensorboard_steps(run_dir: Path, tag: str = "train/loss") -> list[list[int]]:
    """Steps logged under ``tag``, one list per event file in creation order (one file per training attempt)."""
    from tensorboard.backend.event_processing import event_accumulator

    files = sorted((run_dir / "tb").glob("events.out.tfevents.*"), key=lambda p: int(p.name.split(".")[3]))
    out = []
    for f in files:
        acc = event_accumulator.EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        out.append([e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else [])
    return out


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict]:
    """The checkpoint named by ``checkpoints/latest`` and its common state (step, layout, ...)."""
    from launcher.train import checkpoint, checkpoint_root

    root = run_dir / "checkpoints"
    latest = root / (root / checkpoint_root.LATEST).read_text().strip()
    assert latest.is_dir(), f"{root / checkpoint_root.LATEST} names {latest.name}, which does not exist"
    return latest, checkpoint.load_common(latest)


def preempted_step(log_text: str) -> int:
    steps = {int(s) for s in re.findall(r"^PREEMPTED step=(\d+)$", log_text, re.M)}
    assert len(steps) == 1, f"expected one 'PREEMPTED step=N' value in the job log, found {sorted(steps)}"
    return steps.pop()
