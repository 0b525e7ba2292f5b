"""Plain EP vs LLEP, side by side in one run, on synthetic routing with controlled skew.

    python -m launcher.bench.llep                      # EP=4 gloo world on this machine
    python -m launcher.bench.llep --ep 4 --tokens 4096 --threads 4 --json out.json

Spawns its own gloo world (one process per EP rank, no torchrun needed). For every routing scenario it runs the
same MoE expert layer (SwiGLU experts, ``E/ep`` per rank) through ``AllToAllDispatcher`` and ``LLEPDispatcher`` and
prints, per dispatcher: max/mean EP-rank load (token-expert slots computed per rank), the median fwd+bwd time
of the layer (wall time of the slowest rank, barriers around each step) and the peak bytes each rank allocated
during one fwd+bwd (measured with ``torch.profiler(profile_memory=True)``: allocations minus frees, in time order,
above what was live when the step started; the max over ranks is printed).

Routing scenarios (every rank draws its own tokens; ``K = --top-k`` distinct experts per token):
  uniform   experts drawn uniformly
  zipf      expert e drawn with probability proportional to 1 / (e + 1) ** --zipf-s
  hotP      P% of the tokens pick expert 0 as one of their K experts; the rest is uniform over other experts
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

from moe_core.config import MoNEConfig
from parallel.config import LLEPConfig

SCENARIOS = ("uniform", "zipf", "hot50", "hot80", "hot95")


def routing(scenario: str, tokens: int, experts: int, k: int, zipf_s: float, gen: torch.Generator) -> torch.Tensor:
    """``topk_idx_TK`` (int64, distinct experts per token) for one rank's tokens."""
    if scenario == "uniform":
        probs_E = torch.ones(experts)
    elif scenario == "zipf":
        probs_E = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** zipf_s
    elif scenario.startswith("hot") and scenario[3:].isdigit() and int(scenario[3:]) <= 100:
        hot_T = torch.rand(tokens, generator=gen) < int(scenario[3:]) / 100
        rest_TK = torch.multinomial(torch.ones(tokens, experts - 1), k, generator=gen) + 1  # never expert 0
        rest_TK[:, 0] = torch.where(hot_T, torch.zeros_like(rest_TK[:, 0]), rest_TK[:, 0])
        return rest_TK
    else:
        raise ValueError(f"unknown routing scenario '{scenario}' (choose from {', '.join(SCENARIOS)} or hotP, "
                         f"P in 0..100)")
    return torch.multinomial(probs_E.expand(tokens, experts).float(), k, generator=gen)


def peak_step_bytes(step: Callable[[], None]) -> int:
    """Peak of (bytes allocated - bytes freed) during ``step()``, relative to its start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    deltas = []  # frees outside an op appear as "[memory]" events; an op's own net allocation as its self usage
    for ev in prof.events():
        if ev.name == "[memory]":
            deltas.append((ev.time_range.start, ev.cpu_memory_usage))
        elif ev.self_cpu_memory_usage:
            deltas.append((ev.time_range.end, ev.self_cpu_memory_usage))
    live = peak = 0
    for _, delta in sorted(deltas):
        live += delta
        peak = max(peak, live)
    return peak


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _bench_dispatcher(dispatcher, experts, x_TD, idx_TK, w_TK, grad_TD, args) -> dict:
    def step():
        x = x_TD.clone().requires_grad_()
        (dispatcher(x, idx_TK, w_TK, experts) * grad_TD).sum().backward()

    times = []
    for i in range(args.warmup + args.iters):
        experts.zero_grad(set_to_none=True)
        dist.barrier()
        start = time.perf_counter()
        step()
        dist.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    experts.zero_grad(set_to_none=True)
    peak = _max_over_ranks(peak_step_bytes(step))
    x = x_TD.clone()
    with torch.no_grad():
        y = dispatcher(x, idx_TK, w_TK, experts)
    return {"ms": statistics.median(times) * 1e3, "peak_mib": peak / 2**20, "y": y}


def bench_rank(rank: int, world: int, args: argparse.Namespace) -> list[dict]:
    """One EP rank's part of the benchmark (the process group is already initialised); rows for rank 0."""
    from moe_core.experts import SwiGLUExperts
    from parallel.dispatch import AllToAllDispatcher
    from parallel.llep import LLEPDispatcher

    torch.set_num_threads(args.threads)
    E, epr = args.experts, args.experts // world
    llep_cfg = LLEPConfig(imbalance_threshold=args.imbalance_threshold, capacity_factor=args.capacity_factor,
                          min_tokens_per_gemm=args.min_tokens_per_gemm, max_foreign_experts=args.max_foreign_experts)
    dispatchers = {"plain_ep": AllToAllDispatcher(None, dist.group.WORLD, E),
                   "llep": LLEPDispatcher(None, dist.group.WORLD, E, llep_cfg)}
    torch.manual_seed(args.seed)
    experts = SwiGLUExperts(epr, args.hidden, args.ffn, MoNEConfig(), first_expert=rank * epr)
    rows = []
    for scenario in args.scenarios:
        gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
        idx_TK = routing(scenario, args.tokens, E, args.top_k, args.zipf_s, gen)
        w_TK = torch.softmax(torch.randn(idx_TK.shape, generator=gen), dim=1)
        x_TD, grad_TD = torch.randn(args.tokens, args.hidden, generator=gen), torch.randn(args.tokens, args.hidden)
        res = {name: _bench_dispatcher(d, experts, x_TD, idx_TK, w_TK, grad_TD, args)
               for name, d in dispatchers.items()}
        stats = dispatchers["llep"].last_stats
        err = _max_over_ranks(float((res["llep"].pop("y") - res["plain_ep"].pop("y")).abs().max()))
        rows.append({"scenario": scenario, "load_plain": stats["imbalance_before"],
                     "load_llep": stats["imbalance_after"], "ms_plain": res["plain_ep"]["ms"],
                     "ms_llep": res["llep"]["ms"], "speedup": res["plain_ep"]["ms"] / res["llep"]["ms"],
                     "peak_mib_plain": res["plain_ep"]["peak_mib"], "peak_mib_llep": res["llep"]["peak_mib"],
                     "tokens_moved": stats["tokens_moved"], "weights_moved": stats["weights_moved"],
                     "planner_ms": _max_over_ranks(stats["planner_ms"]), "max_abs_diff": err})
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'routing':<9} {'load max/mean':>15} {'fwd+bwd ms':>17} {'speedup':>8} {'peak MiB/rank':>15} "
            f"{'moved tok/w':>12} {'plan ms':>8} {'|dy|max':>8}")
    sub = f"{'':<9} {'EP':>7} {'LLEP':>7} {'EP':>8} {'LLEP':>8} {'':>8} {'EP':>7} {'LLEP':>7}"
    lines = [head, sub]
    for r in rows:
        lines.append(f"{r['scenario']:<9} {r['load_plain']:>7.2f} {r['load_llep']:>7.2f} {r['ms_plain']:>8.1f} "
                     f"{r['ms_llep']:>8.1f} {r['speedup']:>7.2f}x {r['peak_mib_plain']:>7.1f} "
                     f"{r['peak_mib_llep']:>7.1f} {int(r['tokens_moved']):>7}/{int(r['weights_moved']):<4} "
                     f"{r['planner_ms']:>8.2f} {r['max_abs_diff']:>8.1e}")
    return "\n".join(lines)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = bench_rank(rank, world, args)
        if rank == 0:
            print(f"EP={world} gloo, {args.tokens} tokens/rank, top-{args.top_k} of {args.experts} experts, "
                  f"hidden {args.hidden}, ffn {args.ffn}, {args.threads} thread(s)/rank, median of {args.iters}")
            print(format_table(rows))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    finally:
        dist.destroy_process_group()


def parse_args(argv=None) -> argparse.Namespace:
    defaults = LLEPConfig()
    p = argparse.ArgumentParser(prog="python -m launcher.bench.llep", description=__doc__.split("\n")[0])
    p.add_argument("--ep", type=int, default=4, help="EP ranks (gloo processes)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    p.add_argument("--zipf-s", type=float, default=1.2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--imbalance-threshold", type=float, default=defaults.imbalance_threshold)
    p.add_argument("--capacity-factor", type=float, default=defaults.capacity_factor)
    p.add_argument("--min-tokens-per-gemm", type=int, default=defaults.min_tokens_per_gemm)
    p.add_argument("--max-foreign-experts", type=int, default=defaults.max_foreign_experts)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.ep < 1 or args.experts % args.ep:
        p.error(f"--experts ({args.experts}) must be a positive multiple of --ep ({args.ep})")
    if not 1 <= args.top_k < args.experts:
        p.error(f"--top-k must be in [1, --experts - 1], got {args.top_k}")
    return args


def main(argv=None) -> None:
    import torch.multiprocessing as mp

    args = parse_args(argv)
    mp.spawn(_worker, args=(args.ep, _free_port(), args), nprocs=args.ep, join=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
