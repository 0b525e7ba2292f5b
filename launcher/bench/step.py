"""Training-step benchmark of the bench recipe in bf16, FP8, MoNE and Matryoshka MoE, side by side in one run.

    python -m launcher.bench.step [--recipe recipes/bench_h100.yaml] [--variants bf16,fp8,mone,mmoe]
                                  [--warmup 3] [--steps 10] [--budget-s 330] [KEY=VALUE ...]

For each variant it builds the real trainer (launcher/train/trainer.py: megatron-core DistributedOptimizer, one
process, ``train.compile=true`` on a GPU), runs ``--warmup`` steps (compilation, autotuning), times ``--steps``
steps and prints ms/step, tokens/s, MFU (FLOPs of the k each layer actually ran, launcher/train/flops.py, over the
datasheet peak of launcher/train/metrics.py) and peak device memory. Then it profiles one step with the torch
profiler, eager (``torch.compiler.set_stance("force_eager")``: a compiled block is one graph and cannot be split
by phase), and splits its device time (CPU time on a CPU) into the phases of ``moe_core.profiling.PHASES`` plus
"other": forward ops by their enclosing ``moetron.<phase>`` range, backward ops by the forward op that recorded
them (autograd sequence numbers). The last lines give every variant's speed relative to bf16.

Variants: ``bf16`` (the recipe in bf16), ``fp8`` (train.precision=fp8, torchao), ``mone`` (bf16, MoNE keep_ratio
0.5, Triton kernels on a GPU), ``mmoe`` (bf16, k drawn per layer and step from [1, 2 * top_k]). A variant that cannot run here (FP8 without
an FP8 GPU) is reported as skipped with the reason. ``--budget-s`` stops starting new variants once that many
seconds have passed, so the whole command stays within a 6-minute GPU slot. Needs no package registry: only
moetron's own dependencies. Bad arguments exit 2 with one line.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch

from launcher.errors import ArgumentParser, UsageError, report
from launcher.bench.world import free_port
from launcher.config import ConfigError, Config, load_config
from moe_core.profiling import PHASES

RECIPE = "recipes/bench_h100.yaml"


def variant_overrides(name: str, top_k: int) -> list[str]:
    """Config overrides that turn the recipe into variant ``name``."""
    table = {"bf16": ["train.precision=bf16"], "fp8": ["train.precision=fp8"],
             "mone": ["train.precision=bf16", "moe.mone.enabled=true", "moe.mone.keep_ratio=0.5"],
             "mmoe": ["train.precision=bf16", "moe.matryoshka.enabled=true", "moe.matryoshka.k_min=1",
                      f"moe.matryoshka.k_max={2 * top_k}"]}
    return table[name]


VARIANTS = ("bf16", "fp8", "mone", "mmoe")


@dataclass
class Result:
    name: str
    ms_per_step: float = 0.0
    tokens_per_s: float = 0.0
    mfu: Optional[float] = None
    tflops: float = 0.0
    peak_mem_gib: Optional[float] = None
    losses: list[float] = field(default_factory=list)
    phases_ms: dict[str, float] = field(default_factory=dict)
    profiled_wall_ms: float = 0.0
    skipped: Optional[str] = None


# ------------------------------------------------------------------------------------------- phase attribution

def _self_time_us(evt, on_device: bool) -> float:
    return evt.self_device_time_total if on_device else evt.self_cpu_time_total


def _annotated_phase(evt) -> Optional[str]:
    while evt is not None:
        if evt.name.startswith("moetron."):
            return evt.name[len("moetron."):]
        evt = evt.cpu_parent
    return None


def _backward_root(evt):
    while evt is not None:
        if evt.name.startswith("autograd::engine::evaluate_function"):
            return evt
        evt = evt.cpu_parent
    return None


def phase_times_ms(events, on_device: bool) -> dict[str, float]:
    """Self time of every profiled op attributed to a phase: the enclosing ``moetron.<phase>`` range in forward (or
    around the optimizer), the phase of the forward op with the same autograd sequence number in backward, "other"
    for the rest. Milliseconds per phase, in ``PHASES`` order then "other"; their sum is the profiled total."""
    seq_phase: dict[int, str] = {}
    for evt in events:
        name = _annotated_phase(evt)
        if name is not None and evt.sequence_nr >= 0 and _backward_root(evt) is None:
            seq_phase.setdefault(evt.sequence_nr, name)
    totals: dict[str, float] = defaultdict(float)
    for evt in events:
        name = _annotated_phase(evt)
        root = _backward_root(evt) if name is None else None
        if root is not None:
            name = seq_phase.get(root.sequence_nr)
        totals[name or "other"] += _self_time_us(evt, on_device) / 1e3
    return {p: totals.get(p, 0.0) for p in (*PHASES, "other")}


# ------------------------------------------------------------------------------------------- one variant

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_flops(cfg: Config, layer_stats: dict) -> float:
    from launcher.train import flops

    return flops.training_flops(cfg, k_per_layer=flops.executed_k_per_layer(layer_stats)).train_per_step


def _profile_phases(trainer) -> tuple[dict[str, float], float]:
    """One eager step (after an eager warm-up step) under the torch profiler, split by phase; and its wall time
    in ms (the phases sum to the busy time: wall minus busy is where the device, or on a CPU the process, waited)."""
    on_device = trainer.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_device else [])
    with torch.compiler.set_stance("force_eager"):
        trainer.train_step()
        trainer.step += 1
        _sync(trainer.device)
        with torch.profiler.profile(activities=activities) as prof:
            start = time.perf_counter()
            trainer.train_step()
            _sync(trainer.device)
            wall_ms = (time.perf_counter() - start) * 1e3
        trainer.step += 1
    return phase_times_ms(prof.events(), on_device), wall_ms


def run_variant(name: str, recipe: Optional[str], overrides: list[str], warmup: int, steps: int) -> Result:
    from launcher.train.metrics import peak_flops_per_device
    from launcher.train.trainer import Trainer
    from parallel.fp8.swap import fp8_unavailable_here
    from parallel.groups import initialize

    base = load_config(recipe, overrides)
    # what a GPU run uses (after the variant's precision, so an fp32 recipe works too); an explicit override wins
    compile_default = [] if not torch.cuda.is_available() or any(o.startswith("train.compile=") for o in overrides) \
        else ["train.compile=true"]
    cfg_overrides = [*overrides, *variant_overrides(name, base.moe.top_k), *compile_default,  # the variant's keys win
                     f"train.steps={warmup + steps + 2}", "logging.tensorboard=false", "checkpoint.interval=0",
                     "checkpoint.save_at_end=false", "checkpoint.resume=never", "train.eval_interval=0"]
    try:
        cfg = load_config(recipe, cfg_overrides)
    except ConfigError as e:
        return Result(name, skipped=str(e))
    if cfg.train.precision == "fp8" and (reason := fp8_unavailable_here(cfg)):
        return Result(name, skipped=reason)
    trainer = Trainer(cfg, initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep))
    device, result = trainer.device, Result(name)
    for _ in range(warmup):
        trainer.train_step()
        trainer.step += 1
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    flop_total, start = 0.0, time.perf_counter()
    for _ in range(steps):
        loss, _, layer_stats, _ = trainer.train_step()
        trainer.step += 1
        result.losses.append(loss)
        flop_total += _step_flops(cfg, layer_stats)
    _sync(device)
    seconds = time.perf_counter() - start
    tokens = steps * cfg.train.global_batch_size * cfg.model.seq_length
    peak = peak_flops_per_device(device, cfg.train.precision, cfg.logging.peak_tflops)
    result.ms_per_step, result.tokens_per_s = seconds / steps * 1e3, tokens / seconds
    result.tflops = flop_total / seconds / 1e12
    result.mfu = None if peak is None else flop_total / seconds / peak
    if device.type == "cuda":
        result.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
    result.phases_ms, result.profiled_wall_ms = _profile_phases(trainer)
    return result


# ------------------------------------------------------------------------------------------- report

def format_result(r: Result) -> str:
    if r.skipped:
        return f"{r.name:5s} skipped: {r.skipped}"
    mfu = "MFU n/a (no datasheet peak for this device)" if r.mfu is None else f"MFU {100 * r.mfu:.1f}%"
    mem = "peak mem n/a (CPU)" if r.peak_mem_gib is None else f"peak mem {r.peak_mem_gib:.1f} GiB"
    total = sum(r.phases_ms.values())
    phases = " | ".join(f"{p} {100 * v / total:.0f}%" for p, v in r.phases_ms.items()) if total else "n/a"
    busy = f"busy {total:.1f} of {r.profiled_wall_ms:.1f} ms wall ({100 * total / r.profiled_wall_ms:.0f}%)"
    return (f"{r.name:5s} {r.ms_per_step:9.1f} ms/step | {r.tokens_per_s:11,.0f} tok/s | {mfu} "
            f"({r.tflops:.3g} TFLOP/s) | {mem} | loss {r.losses[0]:.4f} -> {r.losses[-1]:.4f}\n"
            f"      eager profiled step, {busy}; busy time by phase: {phases}")


def format_ratios(results: list[Result]) -> str:
    ran = {r.name: r for r in results if not r.skipped}
    if "bf16" not in ran:
        return "no bf16 result: no ratios"
    base = ran["bf16"].ms_per_step
    if len(ran) == 1:
        return "speed vs bf16: no other variant ran"
    return "speed vs bf16 (bf16 ms/step over variant ms/step): " + ", ".join(
        f"{n} {base / r.ms_per_step:.3f}x" for n, r in ran.items() if n != "bf16")


# ------------------------------------------------------------------------------------------- entry

def parse_args(argv):
    parser = ArgumentParser(prog="python -m launcher.bench.step", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=RECIPE, help="recipe YAML ('' = config defaults)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--budget-s", type=float, default=330.0, help="start no new variant after this many s")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides for every variant")
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        parser.error(f"--variants: unknown {bad or 'empty list'}; choose from {','.join(VARIANTS)}")
    if args.warmup < 0 or args.steps < 1 or not (0 < args.budget_s < float("inf")):
        parser.error("--warmup must be >= 0, --steps >= 1 and --budget-s a finite number > 0")
    args.variants = names
    return args


def _init_world() -> None:
    """A one-process world (megatron-core's optimizer needs torch.distributed even on one device)."""
    from parallel.groups import init_distributed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    init_distributed()


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    recipe = args.recipe or None
    if args.recipe == RECIPE and not torch.cuda.is_available():
        return report(UsageError(f"no CUDA GPU here and {RECIPE} is sized for an 80 GB GPU (~1.9B parameters); on "
                                 "a CPU pass --recipe '' with tiny overrides (tests/launcher/bench/test_step_bench.py "
                                 "has a set)"))
    overrides = list(args.overrides)
    try:
        load_config(recipe, overrides)
    except ConfigError as e:
        return report(e)
    _init_world()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {device} | torch {torch.__version__} | recipe {recipe or '(defaults)'} | "
          f"warmup {args.warmup}, timed {args.steps} steps | overrides {' '.join(overrides) or '-'}", flush=True)
    start, results = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as run_dir:
        for name in args.variants:
            if time.perf_counter() - start > args.budget_s:
                results.append(Result(name, skipped=f"--budget-s {args.budget_s:g} s used up"))
            else:
                results.append(run_variant(name, recipe, [*overrides, f"logging.run_dir={run_dir}/{name}"],
                                           args.warmup, args.steps))
            print(format_result(results[-1]), flush=True)
    print(format_ratios(results), flush=True)
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
