"""Data loader throughput vs what the trainer consumes, on the smoke recipe.

    python -m launcher.bench.data_loader [--recipe recipes/smoke_cpu.yaml] [--workers 0 2] [--batches 400]

1. Preprocesses the shipped corpus (recipes/data/) into a temporary directory with the recipe's seq_length and
   vocab size (or uses ``--data DIR``).
2. Loader: for each ``--workers`` value, builds the real train loader (DP rank 0 of 1), times the first batch
   (start-up: worker processes, first shard opened) and then ``--batches`` batches in steady state. tokens/s per
   core = tokens/s / max(1, num_workers) (with workers, the main process only receives ready batches).
3. Trainer: runs the real trainer (``python -m launcher.pretrain``, one process) on the same shards for
   ``--trainer-steps`` steps and reads its ``train/tokens_per_s`` back from TensorBoard (median, first step
   excluded as warm-up).
Prints the loader table, the trainer's rate and the headroom = loader tokens/s per core / trainer tokens/s.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launcher.errors import ArgumentParser

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "recipes" / "data" / "python_reference.jsonl"


def make_shards(out: Path, seq_length: int, vocab_size: int) -> Path:
    from launcher.data.preprocess import main as preprocess_main

    argv = ["--input", str(CORPUS), "--output", str(out), "--seq-length", str(seq_length),
            "--vocab-size", str(vocab_size), "--samples-per-shard", "128", "--valid-fraction", "0.05"]
    if preprocess_main(argv) != 0:
        raise SystemExit("bench_data: preprocessing the corpus failed (see above)")
    return out


def loader_rate(cfg, workers: int, batches: int) -> tuple[float, float]:
    """(start-up seconds, steady-state tokens/s) of the train loader with ``workers`` DataLoader workers."""
    from launcher.data.build import build_loader

    cfg.data.num_workers = workers
    start = time.perf_counter()
    loader = build_loader(cfg, "train", 0, 1)
    tokens = next(loader)["tokens"].numel()
    startup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    rate = tokens * batches / (time.perf_counter() - start)
    loader.close()
    return startup, rate


def trainer_rate(cfg, steps: int, run_dir: Path) -> float:
    """Median tokens/s the real trainer reports (TensorBoard train/tokens_per_s), first step excluded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from launcher.config import save_resolved

    recipe = save_resolved(cfg, run_dir.parent / "recipe")  # exactly the benchmarked config
    cmd = [sys.executable, "-m", "launcher.pretrain", "--recipe", str(recipe), f"train.steps={steps}",
           f"logging.run_dir={run_dir}", "checkpoint.interval=0", "train.eval_interval=0", "data.num_workers=0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_data: the trainer failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    values = [e.value for e in acc.Scalars("train/tokens_per_s")][1:]
    if not values:
        raise SystemExit(f"bench_data: no train/tokens_per_s after the first step in {run_dir / 'tb'}; "
                         "use more --trainer-steps")
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m launcher.bench.data_loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=str(REPO / "recipes" / "smoke_cpu.yaml"),
                   help="recipe YAML; '' = the config defaults plus the overrides")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.micro_batch_size=8")
    p.add_argument("--data", help="existing preprocess output (default: preprocess the shipped corpus)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--trainer-steps", type=int, default=8)
    args = p.parse_args(argv)

    from launcher.config import load_config

    args.recipe = args.recipe or None
    base = load_config(args.recipe, [*args.overrides, "data.source=synthetic"])
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        data = Path(args.data) if args.data else make_shards(Path(tmp) / "shards", base.model.seq_length,
                                                              base.model.vocab_size)
        overrides = [*args.overrides, "data.source=shards", f"data.path={data}"]
        cfg = load_config(args.recipe, overrides)
        mbs, seq = cfg.train.micro_batch_size, cfg.model.seq_length
        print(f"\nrecipe {args.recipe}: micro_batch_size {mbs}, seq_length {seq}, shuffle_buffer "
              f"{cfg.data.shuffle_buffer}, data {data}")
        print(f"{'num_workers':>11} {'start-up s':>10} {'loader tok/s':>13} {'tok/s per core':>15}")
        per_core = {}
        for workers in args.workers:
            startup, rate = loader_rate(cfg, workers, args.batches)
            per_core[workers] = rate / max(1, workers)
            print(f"{workers:>11} {startup:>10.2f} {rate:>13,.0f} {per_core[workers]:>15,.0f}", flush=True)
        train_tps = trainer_rate(cfg, args.trainer_steps, Path(tmp) / "run")
    print(f"trainer (launcher.pretrain, 1 process, {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}): "
          f"{train_tps:,.0f} tokens/s; loader per core / trainer: "
          + ", ".join(f"{per_core[w] / train_tps:.1f}x (num_workers={w})" for w in args.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
