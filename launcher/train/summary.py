"""What rank 0 tells a person at the start and the end of a run: one block before the first step, one line after
the last. Everything a Slurm log reader needs to know what ran where. The logger (launcher/log.py) adds the
``[moetron]`` prefix."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from launcher import env
from launcher.config import Config
from launcher.train import flops
from parallel.groups import ParallelGroups


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def tokens_per_step(cfg: Config) -> int:
    return cfg.train.global_batch_size * cfg.model.seq_length


def data_description(cfg: Config) -> str:
    """What data a run or an evaluation reads, in words (a person should never guess it is synthetic)."""
    if cfg.data.source != "shards":
        return "synthetic tokens (data.source=synthetic)"
    if cfg.data.paths:
        total = sum(e.weight for e in cfg.data.paths)
        return "mixture of " + ", ".join(f"{e.weight / total:.3g} {e.path}" for e in cfg.data.paths)
    return f"shards in {cfg.data.path}"


def _threads_source(threads: int) -> str:
    """Where the resolved ``train.cpu_threads`` came from: the automatic value's source when it is that value."""
    auto = env.cpu_threads()
    return auto[1] if auto is not None and auto[0] == threads else "train.cpu_threads"


def start_block(cfg: Config, groups: ParallelGroups, start_step: int, ckpt_root: Path, optimizer: str,
                resumed: bool) -> str:
    """Layout, parameters (total and activated per token), tokens per step, CPU threads per rank (CPU runs), data,
    run dir, TensorBoard command.
    ``resumed``: the run continues from a checkpoint (at step 0 too: a ``convert from-hf`` checkpoint)."""
    counts = flops.param_counts(cfg)
    g, tr = groups, cfg.train
    data = data_description(cfg)
    begin = f"resuming at step {start_step}" if resumed else "from scratch"
    lines = [
        "run",
        f"  layout      {g.world_size} rank(s) = TP {g.tp_size} x PP {g.pp_size} x DP {g.dp_size}; "
        + (f"{cfg.parallel.virtual_pp} model chunks per pipeline rank (interleaved 1F1B); "
           if cfg.parallel.virtual_pp > 1 else "") +
        f"EP {g.ep_size}, expert-DP {g.edp_size}",
        f"  parameters  {counts.total:,} total, {math.floor(counts.activated):,} activated per token",
        f"  training    {tr.steps} steps ({begin}), {tokens_per_step(cfg):,} tokens per step "
        f"({tr.global_batch_size} x {cfg.model.seq_length}), {tr.precision}, {optimizer}",
        f"  data        {data}",
        f"  run dir     {cfg.logging.run_dir} (checkpoints: {ckpt_root})",
    ]
    if cfg.train.cpu_threads is not None:  # CPU runs (resolved): env.parallel_session set it
        lines.insert(4, f"  cpu threads {torch.get_num_threads()} per rank ({_threads_source(cfg.train.cpu_threads)})")
    if cfg.logging.tensorboard:
        lines.append(f"  tensorboard tensorboard --logdir {Path(cfg.logging.run_dir) / 'tb'}")
    return "\n".join(lines)


def end_line(final_step: int, checkpoint: str | None, losses: dict[int, float], tokens: int, wall_s: float,
             stopped_early: bool = False) -> str:
    """``done: step N, ...`` (``stopped at step N of M`` when a signal or train.exit_interval ended the
    run before train.steps), ``checkpoint C`` (or ``no checkpoint written``) ``; final loss L, T tokens this run, wall H:MM:SS``."""
    finite = [v for _, v in sorted(losses.items()) if math.isfinite(v)]
    loss = f"final loss {finite[-1]:.4f}" if finite else ("no step run" if not losses else "no finite loss this run")
    what = f"stopped at step {final_step} (resume with the same command)" if stopped_early else f"done: step {final_step}"
    saved = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint written"
    return f"{what}, {saved}; {loss}, {tokens:,} tokens this run, wall {_hms(wall_s)}"
