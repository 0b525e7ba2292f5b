"""TensorBoard writer (read back from the event files), MoE layer scalars, MFU math, peak table, progress line.
The expert-load pictures are tested in test_tensorboard_images.py."""
import datetime
import math
import warnings

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from launcher.train import metrics
from launcher.train.metrics import (IntervalTimes, MetricsWriter, ProgressLine, StepStats, gpu_peak_tflops,
                                    moe_layer_scalars, peak_flops_per_device, throughput, training_scalars)
from launcher.train.step_reduce import LayerStepStats
from moe_core.config import MatryoshkaConfig, MoEConfig


def _read_events(log_dir) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _layer_stats() -> dict[int, LayerStepStats]:
    return {1: LayerStepStats(tokens_per_expert_E=torch.tensor([6.0, 2.0, 0.0, 0.0], dtype=torch.float64), k=2,
                              dropped_slots=3.0, aux_loss=0.5, z_loss=0.125, mone_kept_fraction=None),
            3: LayerStepStats(tokens_per_expert_E=torch.tensor([2.0, 2.0, 2.0, 2.0], dtype=torch.float64), k=1,
                              dropped_slots=0.0, aux_loss=0.25, z_loss=0.0625, mone_kept_fraction=0.5)}


def test_moe_layer_scalars_dropless_fixed_k_logs_only_what_can_change():
    out = moe_layer_scalars(_layer_stats(), MoEConfig())  # defaults: dropless, no Matryoshka, aux and z losses on
    assert out == {"train_moe/layer01/load_max_over_mean": 3.0, "train_moe/layer01/aux_loss": 0.5,
                   "train_moe/layer01/z_loss": 0.125, "train_moe/layer03/load_max_over_mean": 1.0,
                   "train_moe/layer03/aux_loss": 0.25, "train_moe/layer03/z_loss": 0.0625,
                   "train_moe/load_max_over_mean_worst": 3.0}
    assert moe_layer_scalars({}, MoEConfig()) == {}


def test_moe_layer_scalars_log_drops_k_and_losses_when_they_can_vary():
    moe = MoEConfig(capacity_factor=1.25, aux_loss_coeff=0.0, z_loss_coeff=0.0, expert_bias=True,
                    matryoshka=MatryoshkaConfig(enabled=True, k_min=1, k_max=2))
    out = moe_layer_scalars(_layer_stats(), moe)
    assert out["train_moe/layer01/dropped_slots"] == 3.0 and out["train_moe/layer03/dropped_slots"] == 0.0
    assert out["train_moe/layer01/k"] == 2.0 and out["train_moe/layer03/k"] == 1.0
    assert out["train_moe/dropped_slots_total"] == 3.0
    assert not any(t.endswith(("aux_loss", "z_loss", "load_mean", "load_max", "mone_kept_fraction")) for t in out)
    single = moe_layer_scalars({1: _layer_stats()[1]}, moe)  # one layer: no over-layer copies of its values
    assert set(single) == {"train_moe/layer01/load_max_over_mean", "train_moe/layer01/dropped_slots",
                           "train_moe/layer01/k"}


def test_writer_round_trip(tmp_path):
    with MetricsWriter(tmp_path, enabled=True) as writer:
        for step in (1, 2):
            writer.scalars({"train/loss": 5.0 - step, "train/lr": 1e-3 * step, "train/grad_norm": float("nan")}, step)
    acc = _read_events(tmp_path / "tb")
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"train/loss", "train/lr"}  # the NaN grad norm is not written
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 4.0), (2, 3.0)]
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([1e-3, 2e-3])
    assert tags["histograms"] == [] and tags["images"] == []


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=False)
    writer.scalars({"train/loss": 1.0}, 1)
    writer.expert_load(_layer_stats(), 1)
    writer.config_text({"moe": {"num_experts": 4}}, 1)
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
    assert scalars["train/mfu"] == pytest.approx(0.4) and scalars["train/skipped_steps"] == 0.0
    assert scalars["train/useful_tflops_per_device"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="step_time_s > 0"):
        throughput(StepStats(1, 0, 0, 0, 0.0, 1, 1.0), 1, 1.0)


def test_gpu_peak_table():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16", tf32=False) == 989.4
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "fp8", tf32=False) == 1978.9
    assert gpu_peak_tflops("NVIDIA H200", "bf16", tf32=False) == 989.4
    assert gpu_peak_tflops("NVIDIA H100 PCIe", "bf16", tf32=False) == 756.5
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16", tf32=False) == 312.0
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == 156.0
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp8", tf32=False) is None  # no fp8 tensor cores
    assert gpu_peak_tflops("NVIDIA B200", "bf16", tf32=False) is None


def test_peak_override_and_bad_input():
    assert peak_flops_per_device("cpu", "bf16", override=123.0) == 123e12
    with pytest.raises(ValueError, match="must be > 0"):
        peak_flops_per_device("cpu", "bf16", override=0.0)
    with pytest.raises(ValueError, match="use fp32, bf16 or fp8"):
        peak_flops_per_device("cpu", "fp16")


def test_cpu_has_no_invented_peak_and_mfu_reads_na():
    assert peak_flops_per_device("cpu", torch.float32) is None
    assert peak_flops_per_device("cpu", "bf16") is None
    stats = StepStats(step=3, loss=1.0, lr=1e-3, grad_norm=0.5, step_time_s=0.5, tokens=100, flops=4e12)
    perf = throughput(stats, world_size=2, peak_flops=None)
    assert perf.mfu is None and perf.tflops_per_device == pytest.approx(4.0)
    scalars = training_scalars(stats, perf)
    assert "train/mfu" not in scalars and scalars["train/tflops_per_device"] == pytest.approx(4.0)
    text = ProgressLine(10).format(stats, perf)
    assert "| 4 TFLOP/s/dev | MFU n/a |" in text


@pytest.mark.parametrize("name", ["NVIDIA B200", "NVIDIA H20", "NVIDIA L40S"])
def test_unknown_gpu_warns_once_and_does_not_abort(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    metrics._warn_unknown_peak.cache_clear()
    with pytest.warns(UserWarning, match=f"no known dense bf16 peak TFLOP/s for GPU '{name}'"):
        assert peak_flops_per_device("cuda", "bf16") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        assert peak_flops_per_device("cuda", "bf16") is None
    assert peak_flops_per_device("cuda", "bf16", override=2250.0) == 2250e12  # logging.peak_tflops gives MFU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops_per_device("cuda", "bf16") == 989.4e12


def test_progress_line_fields_and_eta():
    line = ProgressLine(total_steps=100)
    stats = StepStats(step=10, loss=2.34567, lr=3e-4, grad_norm=1.25, step_time_s=2.0, tokens=4096, flops=8e12,
                      skipped_steps=1)
    text = line.format(stats, throughput(stats, world_size=1, peak_flops=10e12),
                       now=datetime.datetime(2026, 11, 30, 6, 40, 1))
    assert text == ("step  10/100 | loss 2.3457 | lr 3.00e-04 | gnorm 1.250 | 2.05k tok/s | 4 TFLOP/s/dev | "
                    "MFU 40.0% | 2.000 s/step | skipped 1 | ETA 0:03:00 | 2026-11-30 06:40:01")  # 90 left * 2 s
    assert line.eta_s(100, 4.0) == 0.0
    with pytest.raises(ValueError, match="total_steps >= 1"):
        ProgressLine(0)


def test_progress_line_reports_interval_means_not_the_logged_step():
    # 10 steps since the last line: nine of 0.5 s and one outlier of 9.5 s (a busy machine); the logged step
    # itself took 0.5 s. s/step, tok/s, TFLOP/s and ETA are the interval mean: 14 s / 10 steps = 1.4 s
    times = IntervalTimes()
    for t in [0.5] * 4 + [9.5] + [0.5] * 5:
        times.add(t)
    mean = times.take()
    assert mean == pytest.approx(1.4)
    stats = StepStats(step=20, loss=1.0, lr=1e-3, grad_norm=1.0, step_time_s=mean, tokens=7000, flops=14e12)
    perf = throughput(stats, world_size=1, peak_flops=None)
    text = ProgressLine(120).format(stats, perf)
    assert "| 5.00k tok/s | 10 TFLOP/s/dev |" in text  # 7000 tokens / 1.4 s; 14e12 / 1.4 s
    assert "| 1.400 s/step |" in text and "| ETA 0:02:20 |" in text  # 100 steps left * 1.4 s
    times.add(2.0)  # the next interval starts empty
    assert times.take() == 2.0
    with pytest.raises(ValueError, match="no step time added"):
        times.take()


def test_progress_line_survives_nan_loss():
    stats = StepStats(step=1, loss=math.nan, lr=1e-3, grad_norm=math.inf, step_time_s=1.0, tokens=10, flops=1e9)
    text = ProgressLine(5).format(stats, throughput(stats, 1, 1e12))
    assert "loss nan" in text and "gnorm inf" in text


def test_dispatcher_scalars_log_rows_and_slots_per_token_and_llep_stats():
    """EP layers log kept slots and dispatched rows per token (deduplicated dispatch: rows <= slots); a layer whose
    dispatcher has sent nothing yet (or the single-device one) logs none."""
    from types import SimpleNamespace

    from launcher.train.trainer import Trainer
    from parallel.dispatch import DispatchCounts

    layers = {1: SimpleNamespace(dispatcher=SimpleNamespace(last_counts=DispatchCounts(tokens=8, slots=16, rows=10),
                                                            last_stats={"rebalanced": 1.0})),
              3: SimpleNamespace(dispatcher=SimpleNamespace(last_counts=None)),
              5: SimpleNamespace(dispatcher=SimpleNamespace())}
    fake = SimpleNamespace(model=SimpleNamespace(moe_layers=lambda: layers))
    assert Trainer._dispatcher_scalars(fake) == {"train_moe/layer01/dispatch_slots_per_token": 2.0,
                                                 "train_moe/layer01/dispatch_rows_per_token": 1.25,
                                                 "train_moe/layer01/llep_rebalanced": 1.0}
