"""`moetron pretrain --recipe FILE [key.path=value ...]` (also `python -m launcher.pretrain`).

Single process: `python -m launcher.pretrain --recipe recipes/smoke_cpu.yaml`
Multi process:  `torchrun --nproc-per-node 4 -m launcher.pretrain --recipe recipes/smoke_cpu.yaml parallel.tp=2 parallel.ep=2
                 logging.run_dir=runs/smoke_cpu_tp2_ep2`
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from launcher import env, log as console
from launcher.errors import ArgumentParser, MoetronError, report
from launcher.config import ConfigError, check_data_dirs, load_config, validate_world
from launcher.train import memory

log = logging.getLogger("launcher.pretrain")  # by name: run as `python -m`, __name__ is "__main__"


def parse_args(argv):
    p = ArgumentParser(prog="moetron pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every key, with its type, default, range and meaning: "
                                       "moetron config [--recipe FILE] [key.path=value ...]")
    p.add_argument("--recipe", required=True, help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. moe.num_experts=8 train.steps=50")
    p.add_argument("--dry-run", action="store_true",
                   help="print parameter counts and the per-rank memory estimate for this layout, then exit")
    console.add_verbosity_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console.setup(args.quiet, args.verbose)
    env.cuda_connection_default()
    try:
        cfg = load_config(args.recipe, args.overrides)
        validate_world(cfg, env.world_size())  # before any process group exists
        if args.dry_run:
            return dry_run(cfg, env.world_size())
        check_data_dirs(cfg.data)  # a dry run reads no data
        memory.check_fits(cfg, env.world_size())  # before anything is built
    except ConfigError as e:  # every rank reads the same config: one line for the whole job, not one per rank
        return report(e, every_rank=False)
    from launcher.train import run_lock, summary, watchdog
    from launcher.train.preemption import Preemption
    from launcher.train.trainer import Trainer

    started = time.perf_counter()
    preemption = Preemption()  # first thing: a SIGUSR2/SIGTERM during start-up must still checkpoint + exit
    par = cfg.parallel
    with env.parallel_session(par.tp, par.pp, par.ep, par.backend, cfg.train.cpu_threads) as groups:
        try:
            with run_lock.holding(run_lock.directories(cfg.logging.run_dir, cfg.checkpoint.dir)), \
                    watchdog.watching(cfg.logging.run_dir, cfg.train.hang_timeout_s, groups.rank,
                                      groups.world_size) as dog:
                result = Trainer(cfg, groups, dog).fit(preemption)
        except run_lock.RunDirLocked as e:  # found by rank 0 or one node: the others stop silently
            return report(e) if e.prints_here else e.exit_code
        except MoetronError as e:  # bad data, config or checkpoint found once they are opened; a failed run
            return report(e)
        except KeyboardInterrupt:
            log.error("stopped by a second Ctrl-C; the last checkpoint is the newest in the run's checkpoint "
                      "directory (`latest`)")
            return 130
        tokens = len(result.losses) * summary.tokens_per_step(cfg)
        log.log(console.RESULT, summary.end_line(result.final_step, result.checkpoint, result.losses, tokens,
                                                 time.perf_counter() - started,
                                                 stopped_early=result.final_step < cfg.train.steps))
        return 0


def dry_run(cfg, world_size: int) -> int:
    """Parameter counts and the busiest rank's memory estimate (launcher/train/memory.py); nothing is built. A
    layout that does not fit this machine gets :func:`memory.fit_problem`'s line as a warning: a dry run plans
    for the machines the run will use, which are often not this one (a login node)."""
    from launcher.train import flops

    counts = flops.param_counts(cfg)
    par = cfg.parallel
    log.log(console.RESULT, f"dry run: {world_size} rank(s) = TP {par.tp} x PP {par.pp} x DP "
            f"{par.data_parallel_size(world_size)}, EP {par.ep}; {counts.total:,} parameters, "
            f"{int(counts.activated):,} activated per token; busiest rank:\n"
            + "\n".join(memory.estimate(cfg, world_size).lines()))
    problem = memory.fit_problem(cfg, world_size)
    if problem:
        log.warning(f"{problem} (a real run on such ranks stops with this line)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
