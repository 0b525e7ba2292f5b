"""Training metrics: TensorBoard writer (rank 0), device peak FLOP/s for MFU, MoE layer statistics, progress line.

Trainer usage, once per log step::

    stats = StepStats(step, loss, lr, grad_norm, step_time_s, tokens, flops, skipped_steps)  # flops: launcher.train.flops
    perf = throughput(stats, world_size, peak)          # peak = peak_flops_per_device(device, precision, override)
    writer.scalars({**training_scalars(stats, perf), **moe_layer_scalars(layer_stats)}, stats.step)
    writer.expert_load(layer_stats, stats.step)
    print(progress.format(stats, perf))

MFU = executed model FLOPs per step / (step time * world size * peak FLOP/s per device). Model FLOPs are analytic
(launcher/train/flops.py): recomputation is not counted, attention counts the full S x S square.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

# ---------------------------------------------------------------- peak FLOP/s per device

# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s from NVIDIA datasheets. "fp32" is plain FP32 (CUDA cores);
# "tf32" applies to fp32 training when torch lets matmuls use TF32. Order matters: the first name fragment found
# in torch.cuda.get_device_name() wins, so the more specific H100 variants come before plain "H100" (SXM).
_GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.5, "fp8": 1513.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "fp8": 1670.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp8": 1978.9, "tf32": 494.7, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "fp8": 1978.9, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]

Precision = Union[str, torch.dtype]
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8"}


def _precision_name(dtype: Precision) -> str:
    name = _DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, torch.dtype) else dtype
    if name not in ("fp32", "bf16", "fp8"):
        raise ValueError(f"precision {dtype!r} has no known peak: use fp32, bf16 or fp8 (train.precision)")
    return name


def gpu_peak_tflops(device_name: str, precision: str, tf32: bool) -> float:
    """Datasheet dense peak for a CUDA device name; raises naming the fix when the device is not in the table."""
    key = "tf32" if precision == "fp32" and tf32 else precision
    for fragment, peaks in _GPU_PEAK_TFLOPS:
        if fragment in device_name:
            if key not in peaks:
                raise ValueError(f"{device_name} has no {key} peak (no {key} tensor cores); "
                                 f"choose another train.precision or set logging.peak_tflops")
            return peaks[key]
    raise ValueError(f"no known peak TFLOP/s for GPU '{device_name}': set logging.peak_tflops to its dense "
                     f"{key} peak (datasheet value without sparsity)")


@functools.lru_cache(maxsize=None)
def measured_cpu_peak_flops(precision: str = "fp32", n: int = 512, budget_s: float = 0.3) -> float:
    """Best observed square-matmul FLOP/s on this CPU with the current torch thread count (cached per process).

    Takes about ``budget_s`` seconds. The best of the timed matmuls is the peak, so a busy neighbour process
    makes the number lower, never higher, than what the hardware can do. ``n = 512`` keeps one matmul short on a
    loaded 2-core machine; on a many-core server it under-uses the cores, so CPU MFU there is an upper bound."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision)
    if dtype is None:
        raise ValueError(f"cannot measure a CPU peak for precision {precision!r}: fp8 training needs a GPU")
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up: first call allocates and picks a kernel
    best, deadline = 0.0, time.perf_counter() + budget_s
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2.0 * n ** 3 / (time.perf_counter() - t0))
    return best


def peak_flops_per_device(device: Union[torch.device, str], dtype: Precision,
                          override: Optional[float] = None) -> float:
    """Peak FLOP/s of one device for MFU. ``override`` is in TFLOP/s (``logging.peak_tflops``) and wins; otherwise
    a datasheet value for known GPUs, or a measured matmul peak on CPU (so MFU is meaningful in CPU runs too)."""
    if override is not None:
        if override <= 0:
            raise ValueError(f"logging.peak_tflops must be > 0, got {override}")
        return override * 1e12
    device = torch.device(device)
    precision = _precision_name(dtype)
    if device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32
        return gpu_peak_tflops(torch.cuda.get_device_name(device), precision, tf32) * 1e12
    if device.type == "cpu":
        return measured_cpu_peak_flops(precision)
    raise ValueError(f"no peak FLOP/s for device type '{device.type}': set logging.peak_tflops")


# ---------------------------------------------------------------- per-step numbers

@dataclass
class StepStats:
    """What the trainer knows about one optimizer step (numbers summed over all ranks)."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    step_time_s: float
    """Wall time of one optimizer step (the mean over the log interval)."""
    tokens: int
    """Tokens per optimizer step over all data-parallel ranks (global_batch_size * seq_length)."""
    flops: float
    """Executed model FLOPs per optimizer step over all ranks (launcher.train.flops.FlopCount.train_per_step)."""
    skipped_steps: int = 0
    """Non-finite steps skipped so far in this run."""
    useful_flops: Optional[float] = None
    """MoNE only: FLOPs the kept neurons need (FlopCount.train_per_step_useful)."""


@dataclass
class Throughput:
    tokens_per_s: float
    tflops_per_device: float
    mfu: float
    useful_tflops_per_device: Optional[float] = None


def throughput(stats: StepStats, world_size: int, peak_flops: float) -> Throughput:
    """tokens/s (whole job), achieved TFLOP/s per device and MFU (a fraction, 1.0 = peak)."""
    if stats.step_time_s <= 0 or world_size < 1 or peak_flops <= 0:
        raise ValueError(f"throughput needs step_time_s > 0, world_size >= 1, peak_flops > 0; got "
                         f"{stats.step_time_s}, {world_size}, {peak_flops}")
    per_device_s = stats.step_time_s * world_size
    useful = None if stats.useful_flops is None else stats.useful_flops / per_device_s / 1e12
    return Throughput(tokens_per_s=stats.tokens / stats.step_time_s,
                      tflops_per_device=stats.flops / per_device_s / 1e12,
                      mfu=stats.flops / (per_device_s * peak_flops),
                      useful_tflops_per_device=useful)


def training_scalars(stats: StepStats, perf: Throughput) -> dict[str, float]:
    out = {"train/loss": stats.loss, "train/lr": stats.lr, "train/grad_norm": stats.grad_norm,
           "train/skipped_steps": float(stats.skipped_steps), "perf/step_time_s": stats.step_time_s,
           "perf/tokens_per_s": perf.tokens_per_s, "perf/tflops_per_device": perf.tflops_per_device,
           "perf/mfu": perf.mfu}
    if perf.useful_tflops_per_device is not None:
        out["perf/useful_tflops_per_device"] = perf.useful_tflops_per_device
    return out


# ---------------------------------------------------------------- MoE layer statistics

def _layer_tag(idx: int) -> str:
    return f"moe/layer{idx:02d}"


def moe_layer_scalars(stats_per_layer: dict[int, dict]) -> dict[str, float]:
    """Scalars from each MoE layer's ``last_stats`` (keyed by layer index): per layer the max and mean tokens per
    expert, their ratio (1.0 = perfectly balanced), dropped routing slots, the k drawn, and the MoNE kept fraction
    and aux / z losses when the layer reports them; plus the worst imbalance over layers and the total dropped."""
    out: dict[str, float] = {}
    for idx in sorted(stats_per_layer):
        st, tag = stats_per_layer[idx], _layer_tag(idx)
        load_E = torch.as_tensor(st["tokens_per_expert"]).double()
        mean, peak = load_E.mean().item(), load_E.max().item()
        out[f"{tag}/load_max"] = peak
        out[f"{tag}/load_mean"] = mean
        out[f"{tag}/load_max_over_mean"] = peak / mean if mean > 0 else 0.0
        out[f"{tag}/dropped_tokens"] = float(st.get("dropped_tokens") or 0)
        out[f"{tag}/k"] = float(st["k"])
        for name in ("mone_kept_fraction", "aux_loss", "z_loss"):  # reported by layers that have them
            if st.get(name) is not None:
                out[f"{tag}/{name}"] = float(st[name])
    if stats_per_layer:
        out["moe/load_max_over_mean_worst"] = max(v for t, v in out.items() if t.endswith("/load_max_over_mean"))
        out["moe/dropped_tokens_total"] = sum(v for t, v in out.items() if t.endswith("/dropped_tokens"))
    return out


def expert_load_histogram(tokens_per_expert_E: torch.Tensor) -> dict:
    """``SummaryWriter.add_histogram_raw`` arguments for a histogram over expert ids weighted by tokens: bucket e
    (right edge e + 0.5) holds expert e's token count, so TensorBoard draws the load of every expert."""
    counts = torch.as_tensor(tokens_per_expert_E).double().flatten()
    ids = torch.arange(counts.numel(), dtype=torch.float64)
    return dict(min=0.0, max=float(counts.numel() - 1), num=float(counts.sum()), sum=float((ids * counts).sum()),
                sum_squares=float((ids * ids * counts).sum()), bucket_limits=(ids + 0.5).tolist(),
                bucket_counts=counts.tolist())


# ---------------------------------------------------------------- TensorBoard

class MetricsWriter:
    """TensorBoard event files under ``<run_dir>/tb``, written only where ``enabled`` (the trainer passes
    ``rank == 0 and logging.tensorboard``); elsewhere every call is a no-op and tensorboard is never imported."""

    def __init__(self, run_dir: Union[str, Path], enabled: bool):
        self.enabled = enabled
        self.log_dir = Path(run_dir) / "tb"
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # lazy: only the logging rank pays the import

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            value = float(value)
            if not math.isfinite(value):
                continue  # a skipped NaN step is counted in train/skipped_steps; TensorBoard can't plot inf
            self._writer.add_scalar(tag, value, step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        if self._writer is not None:
            self._writer.add_histogram(tag, torch.as_tensor(values).detach().float().cpu(), step)

    def expert_load(self, stats_per_layer: dict[int, dict], step: int) -> None:
        """One histogram per MoE layer: tokens routed to each expert (see :func:`expert_load_histogram`)."""
        if self._writer is None:
            return
        for idx in sorted(stats_per_layer):
            hist = expert_load_histogram(stats_per_layer[idx]["tokens_per_expert"])
            if hist["num"] > 0:
                self._writer.add_histogram_raw(f"{_layer_tag(idx)}/expert_load", global_step=step, **hist)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- console

def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.1f}"


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressLine:
    """One console line per log step. ETA = remaining steps x an exponential moving average of the step time
    (weight ``ema`` on the newest), so it settles after warm-up and follows slow drifts."""

    def __init__(self, total_steps: int, ema: float = 0.3):
        if total_steps < 1 or not 0 < ema <= 1:
            raise ValueError(f"ProgressLine needs total_steps >= 1 and 0 < ema <= 1, got {total_steps}, {ema}")
        self.total_steps = total_steps
        self.ema = ema
        self._avg_step_s: Optional[float] = None

    def eta_s(self, step: int, step_time_s: float) -> float:
        prev = self._avg_step_s
        self._avg_step_s = step_time_s if prev is None else self.ema * step_time_s + (1 - self.ema) * prev
        return max(self.total_steps - step, 0) * self._avg_step_s

    def format(self, stats: StepStats, perf: Throughput) -> str:
        eta = self.eta_s(stats.step, stats.step_time_s)
        width = len(str(self.total_steps))
        return (f"step {stats.step:>{width}}/{self.total_steps} | loss {stats.loss:.4f} | lr {stats.lr:.2e} | "
                f"gnorm {stats.grad_norm:.3f} | {_si(perf.tokens_per_s)} tok/s | "
                f"{perf.tflops_per_device:.3g} TFLOP/s/dev | MFU {100 * perf.mfu:.1f}% | "
                f"{stats.step_time_s:.3f} s/step | skipped {stats.skipped_steps} | ETA {_hms(eta)}")
