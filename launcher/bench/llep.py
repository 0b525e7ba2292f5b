"""Plain EP vs LLEP, side by side in one run, on synthetic routing with controlled skew.

    python -m launcher.bench.llep                      # EP=4 gloo world on this machine
    python -m launcher.bench.llep --ep 4 --tokens 4096 --threads 4 --json out.json
    python -m launcher.bench.llep --simulate           # GPU-scale prediction (launcher/bench/llep_sim.py)
    python -m launcher.bench.llep --ep 2 --validate    # the same model vs this machine's real gloo runs
    python -m launcher.bench.llep --plan-timing        # planner + layout milliseconds per (E, P, routing)

Spawns its own gloo world (one process per EP rank, no torchrun needed). For every routing scenario it runs the
same MoE expert layer (SwiGLU experts, ``E/ep`` per rank) through ``AllToAllDispatcher`` and ``LLEPDispatcher`` and
prints, per dispatcher: max/mean EP-rank load (token-expert slots computed per rank), the median fwd+bwd time
of the layer (wall time of the slowest rank, barriers around each step) and the peak bytes each rank allocated
during one fwd+bwd (measured with ``torch.profiler(profile_memory=True)``: allocations minus frees, in time order,
above what was live when the step started; the max over ranks is printed).

Routing scenarios (every rank draws its own tokens; ``K = --top-k`` distinct experts per token):
``launcher/bench/routing.py`` (uniform, zipf, hotP). Each output is checked against the single-process reference.
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

from launcher.errors import ArgumentParser
from launcher.bench.routing import SCENARIOS, routing
from launcher.bench.world import free_port
from moe_core.config import MoNEConfig
from moe_core.dispatcher import dispatch_compute_combine
from parallel.config import LLEPConfig

__all__ = ["SCENARIOS", "bench_rank", "format_table", "main", "parse_args", "routing", "run_simulation"]

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
        (dispatch_compute_combine(dispatcher, x, idx_TK, w_TK, experts) * grad_TD).sum().backward()

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
        y = dispatch_compute_combine(dispatcher, x, idx_TK, w_TK, experts)
    return {"ms": statistics.median(times) * 1e3, "peak_mib": peak / 2**20, "y": y}


def _experts(args, world: int, rank: int):
    """This rank's ``E/world`` experts, sliced from one full set built identically on every rank (the full set is
    the single-process reference)."""
    from moe_core.experts import SwiGLUExperts

    E, epr = args.experts, args.experts // world
    torch.manual_seed(args.seed)
    full = SwiGLUExperts(E, args.hidden, args.ffn, MoNEConfig())
    local = SwiGLUExperts(epr, args.hidden, args.ffn, MoNEConfig(), first_expert=rank * epr)
    with torch.no_grad():
        for name, param in local.named_parameters():
            param.copy_(getattr(full, name)[rank * epr:(rank + 1) * epr])
    return full, local


def bench_rank(rank: int, world: int, args: argparse.Namespace) -> list[dict]:
    """One EP rank's part of the benchmark (the process group is already initialised); rows for rank 0.

    EP is the whole world and there is no TP: the TP group is ``SINGLE_PROCESS`` (each rank dispatches all of its
    own tokens). Every output is checked against this rank's single-process reference (all experts, no
    communication): ``err_plain`` / ``err_llep`` are the max over ranks of ``|y - y_ref|``."""
    from moe_core.layer import LocalDispatcher
    from parallel.comm import SINGLE_PROCESS
    from parallel.dispatch import AllToAllDispatcher
    from parallel.llep.dispatcher import LLEPDispatcher

    torch.set_num_threads(args.threads)
    E = args.experts
    dispatchers = {"plain_ep": AllToAllDispatcher(SINGLE_PROCESS, dist.group.WORLD, E),
                   "llep": LLEPDispatcher(SINGLE_PROCESS, dist.group.WORLD, E, _llep_cfg(args))}
    full, experts = _experts(args, world, rank)
    rows = []
    for scenario in args.scenarios:
        gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
        idx_TK = routing(scenario, args.tokens, E, args.top_k, args.zipf_s, gen)
        w_TK = torch.softmax(torch.randn(idx_TK.shape, generator=gen), dim=1)
        x_TD, grad_TD = torch.randn(args.tokens, args.hidden, generator=gen), torch.randn(args.tokens, args.hidden)
        res = {name: _bench_dispatcher(d, experts, x_TD, idx_TK, w_TK, grad_TD, args)
               for name, d in dispatchers.items()}
        with torch.no_grad():
            y_ref = dispatch_compute_combine(LocalDispatcher(), x_TD, idx_TK, w_TK, full)
        stats, plan = dispatchers["llep"].last_stats, dispatchers["llep"].last_plan
        errs = {name: _max_over_ranks(float((res[name].pop("y") - y_ref).abs().max())) for name in res}
        rows.append({"scenario": scenario, "load_plain": stats["imbalance_before"],
                     "load_llep": stats["imbalance_after"], "ms_plain": res["plain_ep"]["ms"],
                     "ms_llep": res["llep"]["ms"], "speedup": res["plain_ep"]["ms"] / res["llep"]["ms"],
                     "peak_mib_plain": res["plain_ep"]["peak_mib"], "peak_mib_llep": res["llep"]["peak_mib"],
                     "tokens_moved": stats["tokens_moved"], "weights_moved": stats["weights_moved"],
                     "slots": sum(plan.loads_before), "loads_plain": list(plan.loads_before),
                     "loads_llep": list(plan.loads_after),
                     "planner_ms": _max_over_ranks(stats["planner_ms"]), "err_plain": errs["plain_ep"],
                     "err_llep": errs["llep"]})
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'routing':<9} {'load max/mean':>15} {'fwd+bwd ms':>17} {'speedup':>8} {'peak MiB/rank':>15} "
            f"{'moved tok/w':>12} {'plan ms':>8} {'|y-ref| EP/LLEP':>17}")
    sub = f"{'':<9} {'EP':>7} {'LLEP':>7} {'EP':>8} {'LLEP':>8} {'':>8} {'EP':>7} {'LLEP':>7}"
    lines = [head, sub]
    for r in rows:
        lines.append(f"{r['scenario']:<9} {r['load_plain']:>7.2f} {r['load_llep']:>7.2f} {r['ms_plain']:>8.1f} "
                     f"{r['ms_llep']:>8.1f} {r['speedup']:>7.2f}x {r['peak_mib_plain']:>7.1f} "
                     f"{r['peak_mib_llep']:>7.1f} {int(r['tokens_moved']):>7}/{int(r['weights_moved']):<4} "
                     f"{r['planner_ms']:>8.2f} {r['err_plain']:>8.1e} {r['err_llep']:>8.1e}")
    return "\n".join(lines)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, gemm=None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = None
        if args.validate:
            from launcher.bench.llep_sim import measure_gloo

            net = measure_gloo()
        rows = bench_rank(rank, world, args)
        if rank == 0:
            print(f"EP={world} gloo, {args.tokens} tokens/rank, top-{args.top_k} of {args.experts} experts, "
                  f"hidden {args.hidden}, ffn {args.ffn}, {args.threads} thread(s)/rank, median of {args.iters}")
            print(format_table(rows))
            if args.validate:
                print(format_validation(validate_rows(rows, args, world, gemm, net), gemm, net))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    finally:
        dist.destroy_process_group()


def _llep_cfg(args: argparse.Namespace) -> LLEPConfig:
    return LLEPConfig(imbalance_threshold=args.imbalance_threshold, capacity_factor=args.capacity_factor,
                      min_tokens_per_gemm=args.min_tokens_per_gemm, max_foreign_experts=args.max_foreign_experts,
                      max_helpers_per_expert=args.max_helpers_per_expert)


def validate_rows(rows: list[dict], args: argparse.Namespace, world: int, gemm, net) -> list[dict]:
    """The simulation of exactly the measured runs (same routing draws), with this machine's GEMM table and
    gloo constants and the ranks sharing this machine's cores."""
    from launcher.bench.llep_sim import Layer, simulate

    layer = Layer(args.experts, world, args.tokens, args.top_k, args.hidden, args.ffn, elem_bytes=4)
    cores = max(1, len(os.sched_getaffinity(0)) // args.threads)
    out = []
    for r in rows:
        sim = simulate(layer, r["scenario"], _llep_cfg(args), gemm, net, args.zipf_s, args.seed, cores=cores)
        out.append({"scenario": r["scenario"], "ms_plain": r["ms_plain"], "sim_plain": sim["ms_plain"],
                    "ms_llep": r["ms_llep"], "sim_llep": sim["ms_llep"],
                    "speedup": r["speedup"], "sim_speedup": sim["speedup"]})
    return out


def format_validation(rows: list[dict], gemm, net) -> str:
    lines = [f"model vs measured (GEMM: {gemm.source}; net: {net.name})",
             f"{'routing':<9} {'EP meas':>8} {'EP pred':>8} {'err':>6} {'LLEP meas':>10} {'LLEP pred':>10} {'err':>6} "
             f"{'speedup meas/pred':>18}"]
    for r in rows:
        err_p, err_l = (r["sim_plain"] / r["ms_plain"] - 1) * 100, (r["sim_llep"] / r["ms_llep"] - 1) * 100
        lines.append(f"{r['scenario']:<9} {r['ms_plain']:>8.1f} {r['sim_plain']:>8.1f} {err_p:>5.0f}% "
                     f"{r['ms_llep']:>10.1f} {r['sim_llep']:>10.1f} {err_l:>5.0f}% "
                     f"{r['speedup']:>8.2f}x/{r['sim_speedup']:.2f}x")
    return "\n".join(lines)


SIM_SCENARIOS = ("uniform", "zipf", "hot80", "hot95", "hot100")
PAPER = "paper (arXiv 2601.17111): up to 5-6x MoE-layer speedup at extreme skew, 0.92-1.07x balanced"


def run_simulation(args: argparse.Namespace) -> list[dict]:
    """GPU-scale table: plain EP vs LLEP for every (P, E, routing) with this machine's measured GEMM."""
    from launcher.bench.llep_sim import GPU_CLUSTER, Layer, RooflineGemm, format_sim_table, measure_gemm, simulate

    torch.set_num_threads(args.threads)
    if args.gemm_tflops:
        gemm = RooflineGemm(args.sim_hidden, args.sim_ffn, args.gemm_tflops)
    else:
        gemm = measure_gemm(args.sim_hidden, args.sim_ffn, max_rows=4096)
    rows = []
    for P in args.sim_ranks:
        for E in args.sim_experts:
            layer = Layer(E, P, args.sim_tokens, args.sim_top_k, args.sim_hidden, args.sim_ffn, elem_bytes=2)
            rows += [simulate(layer, sc, _llep_cfg(args), gemm, GPU_CLUSTER, args.zipf_s, args.seed)
                     for sc in SIM_SCENARIOS]
    print(f"simulated MoE layer fwd+bwd: {args.sim_tokens} tokens/rank, top-{args.sim_top_k}, hidden "
          f"{args.sim_hidden}, ffn {args.sim_ffn}, bf16 on the wire; GEMM g(n): {gemm.source}; net: {GPU_CLUSTER.name}")
    print(format_sim_table(rows))
    print(PAPER)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    defaults = LLEPConfig()
    p = ArgumentParser(prog="python -m launcher.bench.llep", description=__doc__.split("\n")[0])
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
    p.add_argument("--max-helpers-per-expert", type=int, default=defaults.max_helpers_per_expert)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--simulate", action="store_true", help="print the GPU-scale simulation table instead")
    p.add_argument("--validate", action="store_true", help="also predict the measured runs with the simulation")
    p.add_argument("--plan-timing", action="store_true", help="print planner + layout ms per (E, P, routing)")
    p.add_argument("--sim-ranks", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--sim-experts", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--sim-tokens", type=int, default=4096, help="simulated tokens per rank")
    p.add_argument("--sim-top-k", type=int, default=8)
    p.add_argument("--sim-hidden", type=int, default=1024)
    p.add_argument("--sim-ffn", type=int, default=512)
    p.add_argument("--gemm-tflops", type=float, default=None,
                   help="simulate with a stated GPU roofline GEMM at this many TFLOP/s instead of measuring here")
    args = p.parse_args(argv)
    if args.ep < 1 or args.experts % args.ep:
        p.error(f"--experts ({args.experts}) must be a positive multiple of --ep ({args.ep})")
    if not 1 <= args.top_k < args.experts:
        p.error(f"--top-k must be in [1, --experts - 1], got {args.top_k}")
    return args


def main(argv=None) -> None:
    import torch.multiprocessing as mp

    args = parse_args(argv)
    if args.simulate:
        run_simulation(args)
        return
    if args.plan_timing:
        from launcher.bench.llep_sim import plan_timing

        torch.set_num_threads(args.threads)
        print(f"{'E':>4} {'P':>3} {'routing':<8} {'plan+layout ms':>15} {'transfers':>10}")
        for E in args.sim_experts:
            for P in args.sim_ranks:
                for sc in SIM_SCENARIOS:
                    r = plan_timing(P, E, sc, _llep_cfg(args), args.sim_tokens, args.sim_top_k)
                    print(f"{E:>4} {P:>3} {sc:<8} {r['ms']:>15.3f} {r['transfers']:>10}")
        return
    gemm = None
    if args.validate:  # measured here, alone, before the ranks start (they would share the cores)
        from launcher.bench.llep_sim import measure_gemm

        torch.set_num_threads(args.threads)
        gemm = measure_gemm(args.hidden, args.ffn, max_rows=args.ep * args.tokens * args.top_k)
    mp.spawn(_worker, args=(args.ep, free_port(), args, gemm), nprocs=args.ep, join=True)


if __name__ == "__main__":
    main()
