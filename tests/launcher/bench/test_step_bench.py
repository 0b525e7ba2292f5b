"""launcher/bench/step.py: the per-phase attribution of profiled time, and the whole command on a tiny model."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from launcher.bench.step import phase_times_ms
from moe_core.config import MoEConfig
from moe_core.layer import MoELayer
from moe_core.matryoshka import KSchedule
from moe_core.profiling import PHASES

TINY = ["model.vocab_size=128", "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.seq_length=32", "moe.num_experts=4", "moe.top_k=2",
        "moe.expert_ffn_hidden_size=32", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.precision=bf16", "data.source=synthetic"]


def _profiled_layer(backward: bool) -> dict[str, float]:
    cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=256)
    torch.manual_seed(0)
    layer = MoELayer(64, cfg, 0, KSchedule(cfg, 1)).train()
    layer.set_step(0)
    x = torch.randn(512, 64, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = layer(x)
        if backward:
            y.square().sum().backward()
    return phase_times_ms(prof.events(), on_device=False)


def _fastest_of(runs: int, backward: bool) -> dict[str, float]:
    """Per phase, the least time over ``runs`` profiled calls: a loaded machine only ever adds time."""
    times = [_profiled_layer(backward) for _ in range(runs)]
    return {name: min(t[name] for t in times) for name in times[0]}


def test_backward_time_is_attributed_to_the_phase_of_its_forward_op():
    forward, both = _fastest_of(5, False), _fastest_of(5, True)
    assert list(both) == [*PHASES, "other"]
    for name in ("router", "permute", "experts", "unpermute"):
        assert forward[name] > 0, name
    # the expert GEMMs' backward (2x the forward FLOPs) lands in "experts", not in "other"
    assert both["experts"] > 1.5 * forward["experts"], (forward, both)
    assert both["experts"] > both["other"], both


def test_the_command_reports_every_variant_and_the_ratios():
    run = subprocess.run([sys.executable, "-m", "launcher.bench.step", "--recipe", "", "--warmup", "1", "--steps",
                          "2", "--variants", "bf16,fp8,mmoe", *TINY], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert any(line.startswith("bf16") and "ms/step" in line and "tok/s" in line for line in lines), run.stdout
    assert any(line.startswith("fp8   skipped: train.precision=fp8 needs a CUDA GPU") for line in lines), run.stdout
    phases = [line for line in lines if "eager profiled step" in line]
    assert len(phases) == 2 and all(f"{p} " in phases[0] for p in (*PHASES, "other")), run.stdout
    percents = [int(part.split()[-1].rstrip("%")) for part in phases[0].split(":", 1)[1].split("|")]
    assert 97 <= sum(percents) <= 103, phases[0]  # rounded shares of one total
    assert any(line.startswith("speed vs bf16") and "mmoe" in line for line in lines), run.stdout


BAD = [["--recipe", "", "--variants", "bf16,fp4"], ["--recipe", "", "--steps", "0"], ["--recipe", "", "model.nope=1"],
       ["--recipe", "", "--budget-s", "nan"]]
if not torch.cuda.is_available():
    BAD.append([])  # the 1.9B-parameter bench recipe on a CPU: refused instead of running for hours


@pytest.mark.parametrize("args", BAD)
def test_bad_arguments_exit_2_with_one_line(args):
    run = subprocess.run([sys.executable, "-m", "launcher.bench.step", *args],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.parametrize("name", ["alltoall", "llep"])
def test_every_op_of_an_ep_dispatcher_call_is_in_an_moe_phase(name):
    """The driver marks the phases, not each dispatcher: LLEP's permute and count exchange used to land in "other"."""
    from moe_core.dispatcher import dispatch_compute_combine
    from moe_core.experts import SwiGLUExperts
    from moe_core.config import MoNEConfig
    from parallel.comm import SINGLE_PROCESS
    from parallel.config import LLEPConfig
    from parallel.dispatch import AllToAllDispatcher
    from parallel.llep.dispatcher import LLEPDispatcher

    E, T, D = 4, 64, 32
    dispatcher = (LLEPDispatcher(SINGLE_PROCESS, SINGLE_PROCESS, E, LLEPConfig()) if name == "llep"
                  else AllToAllDispatcher(SINGLE_PROCESS, SINGLE_PROCESS, E))
    experts = SwiGLUExperts(E, D, 64, MoNEConfig())
    gen = torch.Generator().manual_seed(0)
    x_TD, idx_TK, w_TK = torch.randn(T, D, generator=gen), torch.randint(0, E, (T, 2), generator=gen), torch.rand(T, 2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        dispatch_compute_combine(dispatcher, x_TD, idx_TK, w_TK, experts)
    times = phase_times_ms(prof.events(), on_device=False)
    assert times["other"] == 0 and times["attention"] == times["router"] == 0, times
    assert all(times[p] > 0 for p in ("permute", "dispatch", "experts", "unpermute")), times
