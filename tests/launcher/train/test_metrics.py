"""TensorBoard writer (read back from the event files), MoE layer scalars, MFU math, peak table, progress line."""
import math
import time

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from launcher.train.metrics import (MetricsWriter, ProgressLine, StepStats, expert_load_histogram, gpu_peak_tflops,
                              measured_cpu_peak_flops, moe_layer_scalars, peak_flops_per_device, throughput,
                              training_scalars)


def _read_events(log_dir) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def _layer_stats() -> dict[int, dict]:
    return {1: dict(tokens_per_expert=torch.tensor([6, 2, 0, 0]), k=2, dropped_tokens=torch.tensor(3),
                    mone_kept_fraction=None),
            3: dict(tokens_per_expert=torch.tensor([2, 2, 2, 2]), k=1, dropped_tokens=0,
                    mone_kept_fraction=0.5, aux_loss=torch.tensor(0.25))}


def test_moe_layer_scalars():
    out = moe_layer_scalars(_layer_stats())
    assert out["moe/layer01/load_max"] == 6.0 and out["moe/layer01/load_mean"] == 2.0
    assert out["moe/layer01/load_max_over_mean"] == 3.0 and out["moe/layer03/load_max_over_mean"] == 1.0
    assert out["moe/layer01/dropped_tokens"] == 3.0 and out["moe/layer01/k"] == 2.0 and out["moe/layer03/k"] == 1.0
    assert "moe/layer01/mone_kept_fraction" not in out and out["moe/layer03/mone_kept_fraction"] == 0.5
    assert out["moe/layer03/aux_loss"] == 0.25 and "moe/layer01/aux_loss" not in out
    assert out["moe/load_max_over_mean_worst"] == 3.0 and out["moe/dropped_tokens_total"] == 3.0
    assert moe_layer_scalars({}) == {}


def test_expert_load_histogram_buckets_are_experts():
    h = expert_load_histogram(torch.tensor([6, 2, 0, 1]))
    assert h["bucket_limits"] == [0.5, 1.5, 2.5, 3.5] and h["bucket_counts"] == [6.0, 2.0, 0.0, 1.0]
    assert (h["min"], h["max"], h["num"]) == (0.0, 3.0, 9.0)
    assert h["sum"] == 0 * 6 + 1 * 2 + 3 * 1 and h["sum_squares"] == 1 * 2 + 9 * 1


def test_writer_round_trip(tmp_path):
    with MetricsWriter(tmp_path, enabled=True) as writer:
        for step in (1, 2):
            writer.scalars({"train/loss": 5.0 - step, "train/lr": 1e-3 * step, "train/grad_norm": float("nan")}, step)
            writer.expert_load(_layer_stats(), step)
        writer.histogram("debug/values", torch.arange(10.0), step=2)
    acc = _read_events(tmp_path / "tb")
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"train/loss", "train/lr"}  # the NaN grad norm is not written
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 4.0), (2, 3.0)]
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([1e-3, 2e-3])
    assert set(tags["histograms"]) == {"moe/layer01/expert_load", "moe/layer03/expert_load", "debug/values"}
    hist = acc.Histograms("moe/layer01/expert_load")
    assert [e.step for e in hist] == [1, 2]
    value = hist[-1].histogram_value
    assert list(value.bucket) == [6.0, 2.0, 0.0, 0.0] and list(value.bucket_limit) == [0.5, 1.5, 2.5, 3.5]
    assert acc.Histograms("debug/values")[0].histogram_value.num == 10


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=False)
    writer.scalars({"train/loss": 1.0}, 1)
    writer.expert_load(_layer_stats(), 1)
    writer.histogram("x", torch.ones(3), 1)
    writer.flush()
    writer.close()
    assert not (tmp_path / "tb").exists()


def test_throughput_and_mfu_math():
    # 2 steps/s of 4096 tokens on 4 devices; 8e12 FLOPs/step = 16e12 FLOP/s = 4e12 per device; peak 10 TFLOP/s
    stats = StepStats(step=10, loss=2.0, lr=1e-3, grad_norm=0.5, step_time_s=0.5, tokens=4096, flops=8e12,
                      useful_flops=4e12)
    perf = throughput(stats, world_size=4, peak_flops=10e12)
    assert perf.tokens_per_s == 8192.0
    assert perf.tflops_per_device == pytest.approx(4.0)
    assert perf.mfu == pytest.approx(0.4)
    assert perf.useful_tflops_per_device == pytest.approx(2.0)
    scalars = training_scalars(stats, perf)
    assert scalars["perf/mfu"] == pytest.approx(0.4) and scalars["train/skipped_steps"] == 0.0
    assert scalars["perf/useful_tflops_per_device"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="step_time_s > 0"):
        throughput(StepStats(1, 0, 0, 0, 0.0, 1, 1.0), 1, 1.0)


def test_gpu_peak_table():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16", tf32=False) == 989.4
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "fp8", tf32=False) == 1978.9
    assert gpu_peak_tflops("NVIDIA H200", "bf16", tf32=False) == 989.4
    assert gpu_peak_tflops("NVIDIA H100 PCIe", "bf16", tf32=False) == 756.5
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16", tf32=False) == 312.0
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == 156.0
    with pytest.raises(ValueError, match="no fp8 peak"):
        gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp8", tf32=False)
    with pytest.raises(ValueError, match="set logging.peak_tflops"):
        gpu_peak_tflops("NVIDIA GeForce GTX 1080", "bf16", tf32=False)


def test_peak_override_and_bad_input():
    assert peak_flops_per_device("cpu", "bf16", override=123.0) == 123e12
    with pytest.raises(ValueError, match="must be > 0"):
        peak_flops_per_device("cpu", "bf16", override=0.0)
    with pytest.raises(ValueError, match="use fp32, bf16 or fp8"):
        peak_flops_per_device("cpu", "fp16")
    with pytest.raises(ValueError, match="fp8 training needs a GPU"):
        peak_flops_per_device("cpu", torch.float8_e4m3fn)


def test_cpu_peak_is_measured_once_and_plausible():
    measured_cpu_peak_flops.cache_clear()
    t0 = time.perf_counter()
    first = peak_flops_per_device("cpu", torch.float32)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0
    assert 1e8 < first < 1e13  # any CPU since 2005 does > 0.1 GFLOP/s fp32; none does 10 TFLOP/s
    t0 = time.perf_counter()
    assert peak_flops_per_device("cpu", "fp32") == first  # cached: same value, no second measurement
    assert time.perf_counter() - t0 < 0.01


def test_progress_line_fields_and_eta():
    line = ProgressLine(total_steps=100, ema=0.5)
    stats = StepStats(step=10, loss=2.34567, lr=3e-4, grad_norm=1.25, step_time_s=2.0, tokens=4096, flops=8e12,
                      skipped_steps=1)
    text = line.format(stats, throughput(stats, world_size=1, peak_flops=10e12))
    assert text == ("step  10/100 | loss 2.3457 | lr 3.00e-04 | gnorm 1.250 | 2.05k tok/s | 4 TFLOP/s/dev | "
                    "MFU 40.0% | 2.000 s/step | skipped 1 | ETA 0:03:00")  # 90 steps left * 2 s
    # the step-time average moves halfway to the new 4 s (ema 0.5): 3 s * 80 remaining steps
    assert line.eta_s(20, 4.0) == pytest.approx(240.0)
    assert line.eta_s(100, 4.0) == 0.0
    with pytest.raises(ValueError, match="total_steps >= 1"):
        ProgressLine(0)


def test_progress_line_survives_nan_loss():
    stats = StepStats(step=1, loss=math.nan, lr=1e-3, grad_norm=math.inf, step_time_s=1.0, tokens=10, flops=1e9)
    text = ProgressLine(5).format(stats, throughput(stats, 1, 1e12))
    assert "loss nan" in text and "gnorm inf" in text
