"""Training stall per checkpoint save, synchronous against ``checkpoint.async_save=true``, and the cost of the
manifest's checksums.

    python -m launcher.bench.checkpoint_stall                       # smoke model, 1 rank, 32 steps, a save every 5
    python -m launcher.bench.checkpoint_stall --world 2 --ep 2 --steps 22 --interval 4
    python -m launcher.bench.checkpoint_stall --hidden 256 --ffn 1024 --steps 22   # 7x the bytes

Both modes train the smoke recipe's model (``recipes/smoke_cpu.yaml`` on synthetic data, so no shards are needed)
in a gloo world of ``--world`` processes and save every ``--interval`` steps (no save at the end). The stall of a
save is the time the training loop waits for it (``Trainer.save_stalls``): synchronous, planning + writing +
manifest + commit; asynchronous, planning + the host copy of the state, then (once every rank's writes ended,
checked after each step) finalizing + manifest + commit. The training steps that run while a background write is
going on are slower on a machine whose cores both jobs share: the last columns show the mean step time of each run
(and the whole run's wall time) so that cost is seen too. ``crc32`` is the time to checksum one checkpoint's files
(``checkpoint_manifest.records``: what each rank adds to a save, and what a load verifies).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

from launcher.errors import ArgumentParser
from launcher.bench.world import run_gloo_world

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "smoke_cpu.yaml"


def measure(rank: int, world: int, overrides: list[str]) -> dict:
    """Train with interval saves; this rank's stalls, step times and wall time, and the checksum time of the last
    checkpoint."""
    from launcher.config import load_config
    from launcher.train import checkpoint_manifest as manifest
    from launcher.train.checkpoint_root import find_latest
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize

    cfg = load_config(str(RECIPE), overrides)
    trainer = Trainer(cfg, initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep))
    step_times: list[float] = []
    run_step = trainer.train_step

    def timed_step(*args, **kwargs):
        start = time.perf_counter()
        out = run_step(*args, **kwargs)
        step_times.append(time.perf_counter() - start)
        return out

    trainer.train_step = timed_step
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    latest = find_latest(trainer.ckpt_root)
    files = sorted(p.name for p in latest.iterdir() if p.name != manifest.MANIFEST)
    start = time.perf_counter()
    size = sum(r["bytes"] for r in manifest.records(latest, files).values())
    return {"stalls": trainer.save_stalls, "step_s": statistics.median(step_times), "wall_s": wall,
            "crc32_s": time.perf_counter() - start, "bytes": size}


def run(args: argparse.Namespace, runner: Callable = run_gloo_world) -> dict[str, dict]:
    """Rank 0's numbers for the synchronous and the asynchronous run; ``runner(fn, world, *args)`` runs the worlds."""
    out = {}
    for mode in ("sync", "async"):
        with tempfile.TemporaryDirectory(prefix="moetron-ckpt-stall-") as tmp:
            overrides = ["data.source=synthetic", "logging.tensorboard=false", "logging.log_interval=1000",
                         f"train.steps={args.steps}", f"checkpoint.interval={args.interval}",
                         "checkpoint.save_at_end=false", "checkpoint.keep_last=2", f"logging.run_dir={tmp}",
                         f"checkpoint.async_save={mode == 'async'}", f"parallel.ep={args.ep}",
                         f"model.hidden_size={args.hidden}", f"moe.expert_ffn_hidden_size={args.ffn}"]
            out[mode] = runner(measure, args.world, overrides)[0]
    return out


def report(results: dict[str, dict]) -> str:
    lines = [f"{'mode':<6} {'saves':>5} {'stall/save s':>13} {'step s':>8} {'wall s':>8}"]
    for mode, r in results.items():
        lines.append(f"{mode:<6} {len(r['stalls']):>5} {statistics.mean(r['stalls']):>13.4f} {r['step_s']:>8.4f} "
                     f"{r['wall_s']:>8.2f}")
    sync, async_ = (statistics.mean(results[m]["stalls"]) for m in ("sync", "async"))
    r = results["sync"]
    lines.append(f"stall ratio sync/async: {sync / async_:.1f}x "
                 f"({sync * 1e3:.1f} ms -> {async_ * 1e3:.1f} ms per save)")
    lines.append(f"crc32 of one checkpoint ({r['bytes'] / 2**20:.1f} MiB): {r['crc32_s'] * 1e3:.1f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m launcher.bench.checkpoint_stall", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=1, help="gloo processes (default 1)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (default 1)")
    p.add_argument("--steps", type=int, default=32,
                   help="training steps per mode (default 32: the last save has two steps to finish writing)")
    p.add_argument("--interval", type=int, default=5, help="save every N steps (default 5)")
    p.add_argument("--hidden", type=int, default=128, help="model.hidden_size (default 128, the smoke model's)")
    p.add_argument("--ffn", type=int, default=256, help="moe.expert_ffn_hidden_size (default 256, the smoke model's)")
    print(report(run(p.parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
