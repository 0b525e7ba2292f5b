"""MoE variant quality benchmark: validation loss of MoE vs MoNE(0.5) vs MoE with half the expert width, and of a
fixed-k MoE vs an M-MoE model evaluated at each k, all trained on the same data for the same number of steps.

    python -m launcher.bench.variants [--steps 250] [--seeds 1234 1235 1236] [--threads 1] [--json FILE]

Data: the shipped corpus (recipes/data/python_reference.jsonl) through ``launcher.data.preprocess`` into a temporary
directory (byte-level BPE of 512 tokens, 64-token samples, 20% of the documents held out). Every model sees the
same training batches in the same order (same seed) and is scored by ``Trainer.evaluate`` on the same validation
batches (the first ``--eval-batches`` micro-batches of 8 of the held-out split's 216 samples). Model: 2 layers,
hidden 64, 8 experts of width 128 (the half-width variant: 64).

Variants ("active" = expert neurons computed per token and MoE layer, the activated-parameter budget):
- ``moe``: top-2, the fixed-k model of the k sweep (2 x 128 = 256 active neurons);
- ``mone``: MoNE keep_ratio 0.5 on the same experts (2 x 64 = 128);
- ``moe_half``: top-2 with experts of width 64 (2 x 64 = 128), MoNE's equal-activated-parameters baseline;
- ``mmoe``: M-MoE, k drawn per layer and step from [1, 4] (evaluated at k_max = 4 in the first table).
Both sweep models are then evaluated with every layer routing to k = 1..4 experts.

This is a tiny CPU budget: paired differences of 0.01-0.02 nats are within seed noise (``--seeds`` repeats the
whole benchmark; the tables give mean and spread over seeds), and a short run says nothing about the published
large-scale results. The numbers in docs/benchmarks.md are whatever this script printed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from launcher.errors import ArgumentParser

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "recipes" / "data" / "python_reference.jsonl"
K_MAX = 4
BASE = ["data.source=shards", "model.vocab_size=512", "model.hidden_size=64", "model.num_layers=2",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.seq_length=64", "moe.num_experts=8",
        "moe.top_k=2", "moe.expert_ffn_hidden_size=128", "train.micro_batch_size=8", "train.global_batch_size=8",
        "optim.lr=0.003", "optim.min_lr=0.0003", "optim.warmup_steps=10", "logging.tensorboard=false",
        "checkpoint.resume=never", "checkpoint.save_at_end=false"]
VARIANTS = {
    "moe": ("MoE top-2", []),
    "mone": ("MoNE keep 0.5", ["moe.mone.enabled=true", "moe.mone.keep_ratio=0.5"]),
    "moe_half": ("MoE top-2, half width", ["moe.expert_ffn_hidden_size=64"]),
    "mmoe": (f"M-MoE k in [1,{K_MAX}]", ["moe.matryoshka.enabled=true", "moe.matryoshka.k_min=1",
                                        f"moe.matryoshka.k_max={K_MAX}"]),
}
SWEPT = ("moe", "mmoe")


def make_shards(out: Path, corpus: Path = CORPUS) -> Path:
    """Preprocess ``corpus`` into ``out`` (512-token BPE, 64-token samples, 20% of the documents held out)."""
    from launcher.data import preprocess

    argv = ["--input", str(corpus), "--output", str(out), "--vocab-size", "512", "--seq-length", "64",
            "--samples-per-shard", "256", "--valid-fraction", "0.2", "--workers", "1"]
    if preprocess.main(argv) != 0:
        raise SystemExit("bench_variants: preprocessing the shipped corpus failed (see above)")
    return out


def active_neurons(cfg) -> str:
    """Expert neurons computed per token and MoE layer (a range for M-MoE: one value per k)."""
    moe = cfg.moe
    from moe_core.mone import keep_count

    ffn = moe.expert_ffn_hidden_size
    per_expert = keep_count(moe.mone.keep_ratio, ffn) if moe.mone.enabled else ffn
    if moe.matryoshka.enabled:
        return f"{moe.matryoshka.k_min * per_expert}-{moe.matryoshka.k_max * per_expert}"
    return str(moe.top_k * per_expert)


def train_and_eval(name: str, overrides: list[str]) -> dict:
    """Train one variant in this process (one rank, no process group, no checkpoint) and evaluate it."""
    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel.groups import ParallelGroups

    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, ParallelGroups.single())
    result = trainer.fit()
    train_s = time.perf_counter() - t0
    batches = cfg.train.eval_batches
    row = {"variant": name, "active": active_neurons(cfg), "train_loss": result.losses[cfg.train.steps - 1],
           "valid_loss": trainer.evaluate(None, batches), "train_s": train_s}
    if name in SWEPT:
        row["valid_loss_at_k"] = {k: trainer.evaluate(k, batches) for k in range(1, K_MAX + 1)}
    return row


def _mean_sd(values: list[float], signed: bool = False) -> str:
    mean = f"{statistics.mean(values):+.4f}" if signed else f"{statistics.mean(values):.4f}"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.4f}"


def format_tables(runs: list[dict[str, dict]]) -> str:
    """Markdown tables over one or more seeds: mean ± sample standard deviation over seeds, and the paired
    difference to the reference model of the same seed (same init of shared weights, same batches), which is
    far less noisy than the spread of the losses themselves."""
    def col(name: str, key: str) -> list[float]:
        return [run[name][key] for run in runs]

    def at_k(name: str, k: int) -> list[float]:
        return [run[name]["valid_loss_at_k"][k] for run in runs]

    def delta(a: list[float], b: list[float]) -> str:
        return _mean_sd([x - y for x, y in zip(a, b)], signed=True)

    lines = ["| variant | active neurons/token/layer | final train loss | val loss | val loss - MoE top-2 |",
             "|---|---|---|---|---|"]
    for name, (label, _) in VARIANTS.items():
        valid = col(name, "valid_loss")
        versus_moe = delta(valid, col("moe", "valid_loss")) if name != "moe" else "reference"
        lines.append(f"| {label} | {runs[0][name]['active']} | {_mean_sd(col(name, 'train_loss'))} | "
                     f"{_mean_sd(valid)} | {versus_moe} |")
    fixed, mmoe = SWEPT
    lines += ["", f"| inference k | {VARIANTS[fixed][0]} (trained at k=2) | {VARIANTS[mmoe][0]} | M-MoE - fixed-k |",
              "|---|---|---|---|"]
    for k in range(1, K_MAX + 1):
        a, b = at_k(mmoe, k), at_k(fixed, k)
        lines.append(f"| {k} | {_mean_sd(b)} | {_mean_sd(a)} | {delta(a, b)} |")
    return "\n".join(lines)


def parse_args(argv):
    p = ArgumentParser(prog="python -m launcher.bench.variants", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=250, help="optimizer steps per model (8 sequences x 64 tokens)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235, 1236],
                   help="train.seed values: one run of every variant per seed (init and data order change)")
    add_run_arguments(p)
    return p.parse_args(argv)


def write_json(args: argparse.Namespace, runs) -> None:
    """The raw numbers and the arguments that made them, to ``--json`` when it is given."""
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs},
                                        indent=2) + "\n")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options every training-quality benchmark shares: threads, validation batches, the JSON output."""
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads; 1 is fastest for these tiny GEMMs (extra threads spin-wait on a "
                        "busy machine)")
    p.add_argument("--eval-batches", type=int, default=20, help="validation micro-batches of 8 sequences")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    runs: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="moetron-bench-") as tmp:
        data = make_shards(Path(tmp) / "data")
        for seed in args.seeds:
            run = {}
            for name, (_, extra) in VARIANTS.items():
                overrides = [*BASE, f"data.path={data}", f"train.seed={seed}", f"train.steps={args.steps}",
                             f"train.eval_batches={args.eval_batches}", f"logging.run_dir={Path(tmp) / name}",
                             f"logging.log_interval={args.steps}", *extra]
                run[name] = train_and_eval(name, overrides)
                print(f"[bench] seed {seed} {name}: val loss {run[name]['valid_loss']:.4f} "
                      f"({run[name]['train_s']:.1f} s)", flush=True)
            runs.append(run)
    print(f"\n{args.steps} steps x 8 x 64 tokens per model, seeds {args.seeds}, validation on "
          f"{args.eval_batches} x 8 x 64 held-out tokens, total {time.perf_counter() - start:.0f} s "
          f"({time.process_time() - cpu_start:.0f} s CPU)\n")
    print(format_tables(runs))
    write_json(args, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
