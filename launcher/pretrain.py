"""`moetron pretrain --recipe FILE [key.path=value ...]` (also `python -m launcher.pretrain`).

Single process: `python -m launcher.pretrain --recipe recipes/smoke_cpu.yaml`
Multi process:  `torchrun --nproc-per-node 4 -m launcher.pretrain --recipe recipes/smoke_cpu.yaml parallel.tp=2 parallel.ep=2`
"""
from __future__ import annotations

import argparse
import sys

from launcher import env
from launcher.config import ConfigError, load_config, validate_world


def parse_args(argv):
    p = argparse.ArgumentParser(prog="moetron pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. moe.num_experts=8 train.steps=50")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        validate_world(cfg, env.world_size())  # before any process group exists
    except ConfigError as e:
        print(f"moetron: config error: {e}", file=sys.stderr)
        return 2
    from launcher.train.trainer import Preemption, Trainer, TrainingError

    preemption = Preemption()  # first thing: a SIGUSR2/SIGTERM during start-up must still checkpoint + exit
    par = cfg.parallel
    with env.parallel_session(par.tp, par.pp, par.ep, par.backend) as groups:
        try:
            result = Trainer(cfg, groups).fit(preemption)
        except (TrainingError, ConfigError) as e:
            print(f"moetron: {e}", file=sys.stderr)
            return 1
        if groups.rank == 0:
            print(f"[moetron] done: step {result.final_step}, checkpoint {result.checkpoint}", flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())
