"""Per-rank optimizer memory at DP = 1, 2, 4: megatron-core's distributed optimizer against replicated AdamW.

    python -m launcher.bench.optimizer_memory                 # ~22M-parameter MoE, DP 1 2 4 (gloo, this machine)
    python -m launcher.bench.optimizer_memory --dp 1 2 --hidden 128 --vocab 4096

Each DP size runs in its own gloo world of that many processes: the trainer is built from the config below, takes
one training step (so Adam's moments exist) and reports what its optimizer holds on this rank
(``TrainOptimizer.memory_bytes``): Adam moments, fp32 main weights beyond the model's own parameters, and gradient
buffers. ``distributed`` is the bf16 run (bf16 parameters; fp32 main weights, moments and gradient buffers in
megatron-core's ``DistributedOptimizer``); ``replicated`` is torch AdamW in fp32 on every rank
(``optim.distributed=false``), the baseline whose memory does not shrink with DP. The last column is the ratio of a
rank's moment bytes to DP=1's, times DP: 1.00 is perfect 1/DP sharding (bucket padding adds a little).
"""
from __future__ import annotations

import argparse
from typing import Callable

from launcher.errors import ArgumentParser
from launcher.bench.world import run_gloo_world

MiB = 1 << 20


def model_overrides(args: argparse.Namespace) -> list[str]:
    return [f"model.vocab_size={args.vocab}", f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
            "model.num_attention_heads=4", "model.num_query_groups=2", "model.seq_length=32",
            f"moe.num_experts={args.experts}", "moe.top_k=2", f"moe.expert_ffn_hidden_size={args.ffn}",
            "train.micro_batch_size=1", "train.steps=1", "data.source=synthetic", "logging.tensorboard=false",
            "checkpoint.save_at_end=false", "logging.run_dir=/nonexistent-unused"]


def measure(rank: int, world: int, overrides: list[str]) -> dict[str, int]:
    """One training step at DP=world; this rank's optimizer bytes and the model's parameter count."""
    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize

    cfg = load_config(None, [*overrides, f"train.global_batch_size={world}"])
    trainer = Trainer(cfg, initialize(1, 1, 1))
    trainer.train_step()
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"params": params, **trainer.optimizer.memory_bytes()}


KINDS = {"distributed": ["train.precision=bf16"], "replicated": ["train.precision=fp32", "optim.distributed=false"]}


def memory_table(dp_sizes: list[int], overrides: list[str], kinds: tuple[str, ...] = tuple(KINDS),
                 runner: Callable = None) -> list[dict]:
    """Rank 0's bytes per (optimizer kind, DP size), with the moment-sharding ratio against the first DP size.
    ``runner(fn, world, *args)`` runs the worlds (default :func:`run_gloo_world`)."""
    runner = runner or run_gloo_world
    rows = []
    for kind in kinds:
        extra = KINDS[kind]
        base = None
        for dp in dp_sizes:
            m = runner(measure, dp, [*overrides, *extra])[0]
            base = base or (m["optimizer_state"], dp)
            ratio = m["optimizer_state"] * dp / (base[0] * base[1])
            rows.append({"kind": kind, "dp": dp, **m, "sharding_ratio": ratio})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'optimizer':<12} {'DP':>3} {'params':>11} {'moments MiB':>12} {'main MiB':>9} {'grads MiB':>10} "
             f"{'moments x DP / DP=1':>20}"]
    for r in rows:
        lines.append(f"{r['kind']:<12} {r['dp']:>3} {r['params']:>11,} {r['optimizer_state'] / MiB:>12.2f} "
                     f"{r['main_params'] / MiB:>9.2f} {r['grads'] / MiB:>10.2f} {r['sharding_ratio']:>20.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m launcher.bench.optimizer_memory", description=__doc__.split("\n")[0])
    p.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16384)
    args = p.parse_args(argv)
    print(format_table(memory_table(args.dp, model_overrides(args))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
