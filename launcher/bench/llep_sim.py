"""Simulated plain EP vs LLEP MoE-layer time at GPU scale (P ranks, E experts) from measured GEMM times and a
stated interconnect model; the simulation mode of ``python -m launcher.bench.llep --simulate``.

Model of one MoE layer, forward + backward, per the dispatchers' phases (``parallel/dispatch.py``,
``parallel/llep/dispatcher.py``); every collective ends when its slowest rank ends, so each phase costs its max over ranks:

  plain EP = 4 x a2a(token rows) + max_r GEMM_r
  LLEP     = count all-gather + planner (its measured CPU time here) + 4 x a2a(token rows) + max_r GEMM_r
             + max(0, weights(fwd) - a2a) + max(0, weight grads(bwd) - a2a)    (the P2P overlaps one a2a each way)

Token rows: plain EP (and LLEP below its threshold) sends one row per (token, EP rank) pair (deduplicated
dispatch), a rebalanced LLEP call one row per slot (``parallel/llep/dispatcher.py``); the rows' slot side tensor
(``2K`` fp32 values per row) is not modelled.

``GEMM_r`` = sum over the (expert, rank) groups rank r computes of ``g(n)``: the measured forward+backward time of
one SwiGLU expert on ``n`` rows with this repo's grouped GEMM (``moe_core.grouped.swiglu_grouped``), linearly
interpolated between measured sizes (so small GEMMs keep their measured inefficiency; beyond the largest measured
size, extrapolated from the last two). With ``cores`` set (validation on a CPU with fewer cores than ranks) the
ranks' GEMMs share the cores (processor sharing). Below the imbalance threshold LLEP is plain EP plus the count
all-gather and planner. Plans, token counts per rank pair and weight transfers are the real ones
(``parallel.llep.plan``) on routing drawn like the benchmark's (``launcher.bench.llep.routing``).
Not modelled: permutes, index gathers and the combine (memory-bound, the same for both but for LLEP's extra
send/compute reorders).

Interconnect (per GPU, full duplex): ranks ``8i .. 8i+7`` share a node. A rank's a2a time is
``latency + max(intra bytes / NVLink BW, inter bytes / IB BW)`` over the larger of what it sends and receives,
``latency`` = the inter-node one when any byte leaves the node. Defaults: NVLink 450 GB/s, 3 us; InfiniBand
50 GB/s (400 Gb/s NDR), 10 us. ``--net gloo`` instead uses constants measured on this machine's loopback gloo
(``measure_gloo``), for validating the model against real runs.
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Interconnect:
    name: str
    intra_gbps: float
    """GB/s per rank inside a node."""
    inter_gbps: float
    """GB/s per rank between nodes."""
    intra_latency_us: float
    inter_latency_us: float
    ranks_per_node: int = 8

    def a2a_ms(self, bytes_PP: np.ndarray) -> float:
        """Time of an all-to-all with ``bytes_PP[s, d]`` bytes from rank s to rank d (self-sends are free)."""
        P = bytes_PP.shape[0]
        node = np.arange(P) // self.ranks_per_node
        same = node[:, None] == node[None, :]
        off_diag = bytes_PP * (1 - np.eye(P))
        intra = np.maximum((off_diag * same).sum(1), (off_diag * same).sum(0))
        inter = np.maximum((off_diag * ~same).sum(1), (off_diag * ~same).sum(0))
        latency = np.where(inter > 0, self.inter_latency_us, self.intra_latency_us) * 1e-3
        t = latency + np.maximum(intra / (self.intra_gbps * 1e6), inter / (self.inter_gbps * 1e6))
        return float(t.max())


GPU_CLUSTER = Interconnect("NVLink 450 GB/s + IB 50 GB/s per GPU", 450.0, 50.0, 3.0, 10.0)


@dataclass(frozen=True)
class GemmTable:
    """Measured fwd+bwd milliseconds of one expert on ``rows`` tokens (``rows[0] == 0`` -> 0 ms)."""

    rows: tuple[int, ...]
    ms: tuple[float, ...]
    source: str

    def __call__(self, n: int) -> float:
        if n <= 0:
            return 0.0
        i = min(max(bisect.bisect_left(self.rows, n), 1), len(self.rows) - 1)
        (n0, n1), (t0, t1) = self.rows[i - 1:i + 1], self.ms[i - 1:i + 1]
        return t0 + (t1 - t0) * (n - n0) / (n1 - n0)


@dataclass(frozen=True)
class RooflineGemm:
    """A stated (not measured) GPU model of ``g(n)``: ``18 * hidden * ffn`` FLOPs per row (forward 6, backward
    12) at ``tflops``, but never faster than reading the expert's weights three times (forward, two backward
    GEMMs) from HBM at ``hbm_tbps``, plus ``launch_us`` per GEMM call (x3)."""

    hidden: int
    ffn: int
    tflops: float
    hbm_tbps: float = 4.8
    launch_us: float = 10.0
    elem_bytes: int = 2

    @property
    def source(self) -> str:
        return (f"roofline model {self.tflops:.0f} TFLOP/s, HBM {self.hbm_tbps} TB/s, 3 x {self.launch_us:.0f} us "
                f"launch (hidden {self.hidden}, ffn {self.ffn})")

    def __call__(self, n: int) -> float:
        if n <= 0:
            return 0.0
        flops_ms = 18 * self.hidden * self.ffn * n / (self.tflops * 1e9)
        weights_ms = 3 * 3 * self.hidden * self.ffn * self.elem_bytes / (self.hbm_tbps * 1e9)
        return max(flops_ms, weights_ms) + 3 * self.launch_us * 1e-3


def measure_gemm(hidden: int, ffn: int, max_rows: int, dtype=torch.float32, repeats: int = 3) -> GemmTable:
    """``g(n)`` on this machine: median fwd+bwd time of one SwiGLU expert (``swiglu_grouped``) for n up to
    ``max_rows`` (powers of 4 from 16, plus ``max_rows``)."""
    from moe_core.grouped import swiglu_grouped

    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(1, *s, generator=gen, dtype=dtype).mul_(0.02).requires_grad_()
         for s in ((ffn, hidden), (ffn, hidden), (hidden, ffn))]
    sizes = sorted({n for n in (16, 64, 256, 1024, 4096, 16384, 65536) if n < max_rows} | {max_rows})
    ms = []
    for n in sizes:
        x = torch.randn(n, hidden, generator=gen, dtype=dtype, requires_grad=True)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            swiglu_grouped(x, torch.tensor([n]), *w).sum().backward()
            times.append(time.perf_counter() - start)
        ms.append(float(np.median(times[1:])) * 1e3)
    return GemmTable((0, *sizes), (0.0, *ms), f"this machine, {dtype}, hidden {hidden}, ffn {ffn}, "
                                              f"{torch.get_num_threads()} thread(s)")


@dataclass(frozen=True)
class Layer:
    experts: int
    ranks: int
    tokens: int
    """Tokens per rank."""
    top_k: int
    hidden: int
    ffn: int
    elem_bytes: int


def _counts(layer: Layer, scenario: str, zipf_s: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(counts_PE, rows_PP)``: slots source rank s routes to expert e, and the rows its deduplicated dispatch sends
    to rank d (one per (token, rank) pair, ``moe_core.permute.group_by_device``)."""
    from launcher.bench.routing import routing

    P, L = layer.ranks, layer.experts // layer.ranks
    counts_PE, rows_PP = np.zeros((P, layer.experts), dtype=np.int64), np.zeros((P, P), dtype=np.int64)
    for r in range(P):
        idx = routing(scenario, layer.tokens, layer.experts, layer.top_k, zipf_s,
                      torch.Generator().manual_seed(seed * 1000 + r))
        counts_PE[r] = np.bincount(idx.flatten().numpy(), minlength=layer.experts)
        rank_TK = (idx // L).numpy()
        first_TK = np.ones(rank_TK.shape, dtype=bool)  # a token's first slot on each rank
        for k in range(1, rank_TK.shape[1]):
            first_TK[:, k] = (rank_TK[:, :k] != rank_TK[:, k:k + 1]).all(1)
        rows_PP[r] = np.bincount(rank_TK[first_TK], minlength=P)
    return counts_PE, rows_PP


def _gemm_ms(groups: list[list[int]], gemm: GemmTable, cores: int | None = None) -> float:
    """Time until every rank finished its GEMMs; with ``cores``, ranks share that many cores equally."""
    work = sorted(sum(gemm(n) for n in g) for g in groups)
    if cores is None:
        return work[-1]
    elapsed, done = 0.0, 0.0  # processor sharing: the k busiest ranks each run at min(1, cores / k)
    for i, w in enumerate(work):
        active = len(work) - i
        elapsed += (w - done) / min(1.0, cores / active)
        done = w
    return elapsed


def simulate(layer: Layer, scenario: str, llep_cfg, gemm: GemmTable, net: Interconnect, zipf_s: float = 1.2,
             seed: int = 0, cores: int | None = None) -> dict:
    """Predicted ms of plain EP and LLEP for one layer fwd+bwd (see the module docstring)."""
    from parallel.llep.plan import plain_ep_plan, plan_llep, rank_layout

    P, E = layer.ranks, layer.experts
    L = E // P
    counts_PE, rows_PP = _counts(layer, scenario, zipf_s, seed)
    row_bytes = layer.hidden * layer.elem_bytes
    expert_bytes = 3 * layer.hidden * layer.ffn * layer.elem_bytes
    plain = plain_ep_plan(counts_PE.sum(0), P, L)
    a2a_plain = net.a2a_ms(rows_PP * row_bytes)  # deduplicated: one row per (token, rank)
    gemm_plain = _gemm_ms([counts_PE.sum(0)[r * L:(r + 1) * L].tolist() for r in range(P)], gemm, cores)
    t_plain = 4 * a2a_plain + gemm_plain

    start = time.thread_time()  # CPU time: on a shared machine wall time would count other processes
    plan = plan_llep(counts_PE.sum(0), P, L, llep_cfg)
    layout_me = rank_layout(plan, counts_PE, 0) if plan.rebalanced else None
    planner_ms = (time.thread_time() - start) * 1e3
    gather_ms = net.a2a_ms(np.full((P, P), E * 8.0))  # the all-gather of int64 counts moves what an a2a would
    if not plan.rebalanced:
        t_llep, a2a_llep, gemm_llep, weights_ms = t_plain + gather_ms + planner_ms, a2a_plain, gemm_plain, 0.0
    else:
        layouts = [layout_me] + [rank_layout(plan, counts_PE, r) for r in range(1, P)]
        a2a_llep = net.a2a_ms(np.array([lay.recv_splits for lay in layouts]).T * row_bytes)
        gemm_llep = _gemm_ms([lay.home_tokens + lay.foreign_tokens for lay in layouts], gemm, cores)
        w_PP = np.zeros((P, P))
        for _, home, helper in plan.transfers:
            w_PP[home, helper] += expert_bytes
        weights_ms = net.a2a_ms(w_PP)
        t_llep = (gather_ms + planner_ms + 4 * a2a_llep + gemm_llep
                  + 2 * max(0.0, weights_ms - a2a_llep))  # forward weights, backward their gradients
    return {"scenario": scenario, "P": P, "E": E, "load_plain": plain.imbalance_before,
            "load_llep": plan.imbalance_after, "ms_plain": t_plain, "ms_llep": t_llep, "speedup": t_plain / t_llep,
            "gemm_plain": gemm_plain, "gemm_llep": gemm_llep, "a2a_plain": a2a_plain, "a2a_llep": a2a_llep,
            "weights_ms": weights_ms, "planner_ms": planner_ms, "transfers": len(plan.transfers)}


def format_sim_table(rows: list[dict]) -> str:
    lines = [f"{'P':>3} {'E':>4} {'routing':<8} {'load EP':>8} {'LLEP':>5} {'EP ms':>9} {'LLEP ms':>9} {'speedup':>8} "
             f"{'xfers':>6} {'w-xfer ms':>9} {'plan ms':>8}"]
    for r in rows:
        lines.append(f"{r['P']:>3} {r['E']:>4} {r['scenario']:<8} {r['load_plain']:>8.2f} {r['load_llep']:>5.2f} "
                     f"{r['ms_plain']:>9.2f} {r['ms_llep']:>9.2f} {r['speedup']:>7.2f}x {r['transfers']:>6} "
                     f"{r['weights_ms']:>9.3f} {r['planner_ms']:>8.2f}")
    return "\n".join(lines)


def measure_gloo(sizes_bytes=(0, 1 << 16, 1 << 20, 1 << 23), repeats: int = 5) -> Interconnect:
    """Latency and bandwidth of this world's all-to-all (every rank sends ``size`` bytes to every other), fitted
    as ``t = latency + bytes_out / bandwidth``; call on every rank of an initialised gloo world."""
    import torch.distributed as dist

    P = dist.get_world_size()
    xs, ts = [], []
    for size in sizes_bytes:
        buf = torch.zeros(P * max(size // 4, 1))
        out = torch.empty_like(buf)
        times = []
        for _ in range(repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            dist.all_to_all_single(out, buf)
            times.append(time.perf_counter() - start)
        t = torch.tensor([float(np.median(times[1:]))], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        xs.append((P - 1) * max(size // 4, 1) * 4)
        ts.append(float(t) * 1e3)
    slope, intercept = np.polyfit(xs, ts, 1)  # ms per byte, ms
    gbps = 1.0 / (max(slope, 1e-12) * 1e6)
    return Interconnect(f"gloo loopback (measured: {gbps:.2f} GB/s, {max(intercept, 0) * 1e3:.0f} us)", gbps, gbps,
                        max(intercept, 0.0) * 1e3, max(intercept, 0.0) * 1e3, ranks_per_node=P)


def plan_timing(ranks: int, experts: int, scenario: str, llep_cfg, tokens: int = 4096, top_k: int = 8,
                repeats: int = 20) -> dict:
    """Median host CPU milliseconds (``time.thread_time``, so other processes on a shared machine do not count) of
    planning + this rank's layout (what ``LLEPDispatcher.plan`` runs per layer)."""
    from parallel.llep.plan import plan_llep, rank_layout

    counts_PE, _ = _counts(Layer(experts, ranks, tokens, top_k, 0, 0, 0), scenario, 1.2, 0)
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        plan = plan_llep(counts_PE.sum(0), ranks, experts // ranks, llep_cfg)
        if plan.rebalanced:
            rank_layout(plan, counts_PE, 0)
        times.append(time.thread_time() - start)
    return {"P": ranks, "E": experts, "scenario": scenario, "ms": float(np.median(times)) * 1e3,
            "rebalanced": plan.rebalanced, "transfers": len(plan.transfers)}
