"""Training metrics: TensorBoard writer (rank 0), device peak FLOP/s for MFU, MoE layer statistics, progress line.

Trainer usage, once per log step::

    stats = StepStats(step, loss, lr, grad_norm, step_time_s, tokens, flops, skipped_steps)  # flops: train/flops.py
    perf = throughput(stats, world_size, peak)  # peak = peak_flops_per_device(device, precision, override) | None
    writer.scalars({**training_scalars(stats, perf), **moe_layer_scalars(layer_stats, cfg.moe)}, stats.step)
    writer.expert_load(layer_stats, stats.step)  # load pictures (heatmap.py)
    log.info(progress.format(stats, perf), extra=BARE)  # launcher.log

``step_time_s`` is the mean over the steps since the last log step (``IntervalTimes.take()``; every step
``add``s its wall time), so throughput, MFU and ETA are interval means. The run's last step is always logged.

MFU = executed model FLOPs per step / (step time * world size * peak FLOP/s per device). Model FLOPs are analytic
(launcher/train/flops.py): recomputation is not counted, attention counts the full S x S square. MFU is reported
only where the peak is known: ``logging.peak_tflops``, or a GPU in the datasheet table below. Elsewhere (CPU, a GPU
not in the table) ``peak`` is None, MFU is "n/a" and only TFLOP/s is logged: a measured or guessed peak would make
MFU a number nobody can compare (a CPU matmul "peak" measured under load swung MFU between 2.7% and 91.7%).

Tag names decide what a person sees first. TensorBoard's Time Series tab groups cards by the tag's first path
component and orders the groups by their tags (tensorboard/webapp/metrics/utils.ts, ``compareTagNames``: per
character, digits as numbers, ``/`` before anything else, so ``train`` < ``train_moe`` < ``valid``). Hence
``train/`` holds the headline curves (loss, lr, grad norm, skipped steps, throughput), MoE statistics and load
pictures follow in ``train_moe/``, then ``valid/``; a new group should sort after ``train`` too.
"""
from __future__ import annotations

import datetime
import functools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import torch
import yaml

from launcher.train import heatmap
from moe_core.config import MoEConfig

if TYPE_CHECKING:
    from launcher.train.step_reduce import LayerStepStats

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


def gpu_peak_tflops(device_name: str, precision: str, tf32: bool) -> Optional[float]:
    """Datasheet dense peak for a CUDA device name, or None when the GPU (or its peak at this precision) is not in
    the table."""
    key = "tf32" if precision == "fp32" and tf32 else precision
    for fragment, peaks in _GPU_PEAK_TFLOPS:
        if fragment in device_name:
            return peaks.get(key)
    return None


@functools.lru_cache(maxsize=None)
def _warn_unknown_peak(device_name: str, key: str) -> None:
    warnings.warn(f"no known dense {key} peak TFLOP/s for GPU '{device_name}': MFU is not reported (TFLOP/s is); "
                  "set logging.peak_tflops to the datasheet value without sparsity to get MFU", stacklevel=2)


def datasheet_peak_tflops(dtype: Precision, device: Union[torch.device, str, None] = None) -> Optional[float]:
    """Datasheet dense peak TFLOP/s of ``device`` (default: this process's CUDA device, else the CPU) at ``dtype``,
    or None where it is not known: a CPU (no datasheet value; a measured matmul rate is not a peak), or a GPU not in
    the table (B200, H20, L40S, ...; warns once). ``logging.peak_tflops``'s automatic value
    (``launcher.config.resolve``). Raises ValueError for an unknown precision."""
    precision = _precision_name(dtype)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    peak = gpu_peak_tflops(name, precision, tf32)
    if peak is None:
        _warn_unknown_peak(name, "tf32" if precision == "fp32" and tf32 else precision)
    return peak


def peak_flops_per_device(device: Union[torch.device, str], dtype: Precision,
                          override: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s of one device for MFU, or None when it is not known (then MFU is not reported).

    ``override`` is in TFLOP/s (``logging.peak_tflops``) and wins; otherwise :func:`datasheet_peak_tflops`.
    Raises ValueError for a non-positive override or an unknown precision."""
    if override is not None:
        if override <= 0:
            raise ValueError(f"logging.peak_tflops must be > 0, got {override}")
        return override * 1e12
    peak = datasheet_peak_tflops(dtype, device)
    return None if peak is None else peak * 1e12


# ---------------------------------------------------------------- per-step numbers

@dataclass
class StepStats:
    """What the trainer knows about one optimizer step (numbers summed over all ranks)."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    step_time_s: float
    """Wall time of one optimizer step in seconds: the mean over the log interval (:class:`IntervalTimes`)."""
    tokens: int
    """Tokens per optimizer step over all data-parallel ranks (global_batch_size * seq_length)."""
    flops: float
    """Executed model FLOPs per optimizer step over all ranks (launcher.train.flops.FlopCount.train_per_step)."""
    skipped_steps: int = 0
    """Non-finite steps skipped so far in this run."""
    useful_flops: Optional[float] = None
    """MoNE only: FLOPs the kept neurons need (FlopCount.train_per_step_useful)."""
    mtp_loss: Optional[float] = None
    """MTP only: ``mtp_loss_coeff`` times the mean over depths of their token-weighted losses (StepNumbers)."""


@dataclass
class Throughput:
    tokens_per_s: float
    tflops_per_device: float
    mfu: Optional[float]
    """A fraction (1.0 = peak); None when the device peak is not known."""
    useful_tflops_per_device: Optional[float] = None


def throughput(stats: StepStats, world_size: int, peak_flops: Optional[float]) -> Throughput:
    """tokens/s (whole job), achieved TFLOP/s per device and MFU (None when ``peak_flops`` is None)."""
    if stats.step_time_s <= 0 or world_size < 1 or (peak_flops is not None and peak_flops <= 0):
        raise ValueError(f"throughput needs step_time_s > 0, world_size >= 1, peak_flops > 0 or None; got "
                         f"{stats.step_time_s}, {world_size}, {peak_flops}")
    per_device_s = stats.step_time_s * world_size
    useful = None if stats.useful_flops is None else stats.useful_flops / per_device_s / 1e12
    return Throughput(tokens_per_s=stats.tokens / stats.step_time_s,
                      tflops_per_device=stats.flops / per_device_s / 1e12,
                      mfu=None if peak_flops is None else stats.flops / (per_device_s * peak_flops),
                      useful_tflops_per_device=useful)


def training_scalars(stats: StepStats, perf: Throughput) -> dict[str, float]:
    """TensorBoard scalars of one log step, all in the ``train`` group (see the module docstring on ordering):
    loss, lr, grad norm, skipped steps and throughput; ``train/mfu`` only where the peak is known,
    ``train/useful_tflops_per_device`` only for MoNE, ``train/mtp_loss`` only with multi-token prediction."""
    out = {"train/loss": stats.loss, "train/lr": stats.lr, "train/grad_norm": stats.grad_norm,
           "train/skipped_steps": float(stats.skipped_steps), "train/step_time_s": stats.step_time_s,
           "train/tokens_per_s": perf.tokens_per_s, "train/tflops_per_device": perf.tflops_per_device}
    if perf.mfu is not None:
        out["train/mfu"] = perf.mfu
    if perf.useful_tflops_per_device is not None:
        out["train/useful_tflops_per_device"] = perf.useful_tflops_per_device
    if stats.mtp_loss is not None:
        out["train/mtp_loss"] = stats.mtp_loss
    return out


# ---------------------------------------------------------------- MoE layer statistics

MOE_GROUP = "train_moe"
"""TensorBoard tag group of the MoE statistics and load pictures: right after ``train`` (module docstring)."""


def moe_layer_tag(idx: int) -> str:
    """Tag prefix of MoE layer ``idx``'s scalars, e.g. ``train_moe/layer03``."""
    return f"{MOE_GROUP}/layer{idx:02d}"


def moe_layer_scalars(stats_per_layer: dict[int, LayerStepStats], moe: MoEConfig) -> dict[str, float]:
    """Scalars from each MoE layer's step statistics (keyed by layer index), only those that can change in this
    run:

    - ``load_max_over_mean`` (max / mean tokens per expert; 1.0 = balanced): always;
    - ``aux_loss`` / ``z_loss``: when ``moe.aux_loss_coeff`` / ``moe.z_loss_coeff`` > 0 (else always 0);
    - ``dropped_slots``: when ``moe.capacity_factor`` is set (dropless runs drop nothing);
    - ``k``: when Matryoshka draws k (else always ``moe.top_k``);
    - over layers, when there is more than one: ``load_max_over_mean_worst`` and, with a capacity factor,
      ``dropped_slots_total``.

    Never logged: the mean load (tokens * k / E: fixed by the config and k), the max load (the ratio times that
    mean; the load pictures show it per expert), the MoNE kept fraction (keep_k / F, fixed by the config)."""
    out: dict[str, float] = {}
    for idx in sorted(stats_per_layer):
        st, tag = stats_per_layer[idx], moe_layer_tag(idx)
        load_E = st.tokens_per_expert_E.double()
        mean = load_E.mean().item()
        out[f"{tag}/load_max_over_mean"] = load_E.max().item() / mean if mean > 0 else 0.0
        if moe.aux_loss_coeff > 0:
            out[f"{tag}/aux_loss"] = float(st.aux_loss)
        if moe.z_loss_coeff > 0:
            out[f"{tag}/z_loss"] = float(st.z_loss)
        if moe.capacity_factor is not None:
            out[f"{tag}/dropped_slots"] = float(st.dropped_slots)
        if moe.matryoshka.enabled:
            out[f"{tag}/k"] = float(st.k)
    if len(stats_per_layer) > 1:
        out[f"{MOE_GROUP}/load_max_over_mean_worst"] = max(
            v for t, v in out.items() if t.endswith("/load_max_over_mean"))
        if moe.capacity_factor is not None:
            out[f"{MOE_GROUP}/dropped_slots_total"] = sum(v for t, v in out.items() if t.endswith("/dropped_slots"))
    return out


def load_shares(stats_per_layer: dict[int, LayerStepStats]) -> tuple[list[int], np.ndarray]:
    """(MoE layer indices, shares [L, E] float64): each expert's fraction of its layer's routed tokens (rows sum
    to 1; a layer that routed nothing is NaN)."""
    layer_ids = sorted(stats_per_layer)
    counts_LE = np.stack([stats_per_layer[i].tokens_per_expert_E.double().cpu().numpy() for i in layer_ids])
    totals_L1 = counts_LE.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return layer_ids, np.where(totals_L1 > 0, counts_LE / totals_L1, np.nan)


# ---------------------------------------------------------------- TensorBoard

def _image_summary(tag: str, rgb_HW3: np.ndarray):
    from tensorboard.compat.proto.summary_pb2 import Summary  # lazy, as SummaryWriter

    height, width, _ = rgb_HW3.shape
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=heatmap.png_bytes(rgb_HW3))
    return Summary(value=[Summary.Value(tag=tag, image=image)])


class MetricsWriter:
    """TensorBoard event files under ``<run_dir>/tb``, written only where ``enabled`` (the trainer passes
    ``rank == 0 and logging.tensorboard``); elsewhere every call is a no-op and tensorboard is never imported.

    Expert load is logged as pictures (launcher/train/heatmap.py has the colour scale), not histograms: a
    TensorBoard histogram of per-expert counts is drawn as a ridge plot over bucket edges, where no one can tell
    which expert is hot; a heatmap cell per (layer, expert) or (expert, step) says it at a glance."""

    HISTORY_COLUMNS = 128
    """The per-layer history pictures show at most this many columns (the whole run: see LoadHistory)."""
    HISTORY_REFRESH_COLUMNS = 32
    """History pictures are rewritten once this many new columns have accumulated (sooner early in the run: when
    the columns have doubled), and at close. Each refresh writes one picture per MoE layer, so refreshing every
    log step would make the event file grow with L x steps pictures."""

    def __init__(self, run_dir: Union[str, Path], enabled: bool, purge_step: Optional[int] = None):
        """``purge_step``: the step a resumed run restarts from; TensorBoard then hides the events an interrupted
        earlier run wrote at that step and after (the steps this run repeats), so every step shows once."""
        self.enabled = enabled
        self.log_dir = Path(run_dir) / "tb"
        self._writer = None
        self._history = heatmap.LoadHistory(self.HISTORY_COLUMNS)
        self._history_layers: list[int] = []
        self._history_written = (0, 0, None)
        """(columns created, columns shown, step) when the history pictures were last written."""
        self._last_step: Optional[int] = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # lazy: only the logging rank pays the import

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            value = float(value)
            if not math.isfinite(value):
                continue  # a skipped NaN step is counted in train/skipped_steps; TensorBoard can't plot inf
            self._writer.add_scalar(tag, value, step)

    def config_text(self, resolved: dict, step: int) -> None:
        """The resolved config (``launcher.config.to_dict``) as text: tag ``config`` in TensorBoard's Text tab, a
        YAML code block in the order and form of the run's config.yaml."""
        if self._writer is not None:
            text = yaml.safe_dump(resolved, sort_keys=False).rstrip()
            self._writer.add_text("config", f"```yaml\n{text}\n```", step)

    def expert_load(self, stats_per_layer: dict[int, LayerStepStats], step: int) -> None:
        """Pictures of where tokens went, from one log step's MoE layer statistics (see :func:`load_shares`):

        - ``train_moe/expert_load``: layers x experts at this step (rows: MoE layers, columns: experts);
        - ``train_moe/expert_load_over_steps/layerNN``: per layer, experts x log steps of this process's run so
          far (a resumed run starts a new history), refreshed as ``HISTORY_REFRESH_COLUMNS`` says.

        Colour: share of the layer's routed tokens on a fixed log scale, white = 1/E (heatmap.py). Every call
        must report the same MoE layers (ValueError otherwise)."""
        if self._writer is None or not stats_per_layer:
            return
        layer_ids, shares_LE = load_shares(stats_per_layer)
        if not self._history_layers:
            self._history_layers = layer_ids
        elif layer_ids != self._history_layers:
            raise ValueError(f"expert_load got MoE layers {layer_ids}, earlier calls {self._history_layers}")
        self._add_image(f"{MOE_GROUP}/expert_load", heatmap.layers_by_experts(shares_LE, layer_ids, step), step)
        self._history.append(step, shares_LE)
        self._last_step = step
        created, shown, _ = self._history_written
        if self._history.columns_created - created >= min(self.HISTORY_REFRESH_COLUMNS, max(1, shown)):
            self._write_history()

    def _write_history(self) -> None:
        shares_LEC, last_steps = self._history.shares_LEC(), self._history.last_steps()
        for pos, idx in enumerate(self._history_layers):
            image = heatmap.experts_by_steps(shares_LEC[pos], idx, last_steps, self._history.steps_per_column)
            self._add_image(f"{MOE_GROUP}/expert_load_over_steps/layer{idx:02d}", image, self._last_step)
        self._history_written = (self._history.columns_created, len(self._history), self._last_step)

    def _add_image(self, tag: str, rgb_HW3: np.ndarray, step: int) -> None:
        # palette PNG written directly (SummaryWriter.add_image re-encodes as RGB, about 3x the bytes) through the
        # event file writer SummaryWriter opened in __init__ (it already wrote the purge_step marker)
        self._writer.file_writer.add_summary(_image_summary(tag, rgb_HW3), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Writes the history pictures if they miss the last log step, then closes the event file."""
        if self._writer is not None:
            if self._history_written[2] != self._last_step:
                self._write_history()
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


def _percent(fraction: Optional[float]) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class IntervalTimes:
    """Step wall times since the last progress line. The line's s/step, tok/s, TFLOP/s, MFU and ETA come from their
    mean (sum of step times / steps, as megatron-core and torchtitan do), not from the logged step alone: one slow
    step (a checkpoint save, a busy machine) would otherwise swing every number on its line."""

    def __init__(self) -> None:
        self._total_s, self._steps = 0.0, 0

    def add(self, step_time_s: float) -> None:
        """One optimizer step's wall time in seconds (skipped non-finite steps too: they took the time)."""
        self._total_s += step_time_s
        self._steps += 1

    def take(self) -> float:
        """Mean step time in seconds since the last ``take``, and start a new interval. ValueError when no step
        was added since."""
        if self._steps == 0:
            raise ValueError("IntervalTimes.take: no step time added since the last progress line")
        mean = self._total_s / self._steps
        self._total_s, self._steps = 0.0, 0
        return mean


class ProgressLine:
    """One console line per log step, ending in a timestamp. ``stats.step_time_s`` is the mean step time over the
    log interval (:class:`IntervalTimes`); ETA = remaining steps x that mean."""

    def __init__(self, total_steps: int):
        if total_steps < 1:
            raise ValueError(f"ProgressLine needs total_steps >= 1, got {total_steps}")
        self.total_steps = total_steps

    def eta_s(self, step: int, mean_step_s: float) -> float:
        """Seconds left after ``step`` at ``mean_step_s`` per step."""
        return max(self.total_steps - step, 0) * mean_step_s

    def format(self, stats: StepStats, perf: Throughput, now: Optional[datetime.datetime] = None) -> str:
        """The line, ending in the local wall-clock time (``now``, default: the current time) for Slurm logs."""
        eta = self.eta_s(stats.step, stats.step_time_s)
        width = len(str(self.total_steps))
        stamp = (now or datetime.datetime.now()).strftime("%Y-%m-%d %H:%M:%S")
        return (f"step {stats.step:>{width}}/{self.total_steps} | loss {stats.loss:.4f} | lr {stats.lr:.2e} | "
                f"gnorm {stats.grad_norm:.3f} | {_si(perf.tokens_per_s)} tok/s | "
                f"{perf.tflops_per_device:.3g} TFLOP/s/dev | MFU {_percent(perf.mfu)} | "
                f"{stats.step_time_s:.3f} s/step | skipped {stats.skipped_steps} | ETA {_hms(eta)} | {stamp}")
