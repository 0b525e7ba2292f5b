"""CUDA-only checks (skipped without a GPU): the grouped GEMM path, the layer in bf16 and the MoNE kernel backend."""
import pytest
import torch

from moe_core.config import MoEConfig, MoNEConfig
from moe_core.experts import SwiGLUExperts, swiglu_reference
from kernels.grouped_gemm import grouped_mm_usable
from moe_core.layer import MoELayer
from moe_core.matryoshka import KSchedule
from moe_core.mone import mone_swiglu_torch, resolve_mone_fn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SPLITS = [40, 0, 130, 86]  # ragged, with an empty expert
D, FFN = 64, 128


def _run(fn, x, weights):
    x = x.detach().clone().requires_grad_()
    weights = [w.detach().clone().requires_grad_() for w in weights]
    y = fn(x, torch.tensor(SPLITS, device=x.device), *weights)
    y.float().square().sum().backward()
    return [y, x.grad] + [w.grad for w in weights]


def _experts(**mone):
    torch.manual_seed(0)
    return SwiGLUExperts(len(SPLITS), D, FFN, MoNEConfig(**mone)).cuda().to(torch.bfloat16)


def test_bf16_grouped_gemm_matches_fp32_reference():
    experts = _experts()
    x = torch.randn(sum(SPLITS), D, device="cuda", dtype=torch.bfloat16)
    weights = [experts.w_gate_EFD, experts.w_up_EFD, experts.w_down_EDF]
    assert grouped_mm_usable(x, experts.w_gate_EFD)
    got = _run(experts.functional, x, weights)
    ref = _run(swiglu_reference, x.float(), [w.float() for w in weights])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b, atol=2e-3, rtol=3e-2)


def test_layer_bf16_on_cuda_matches_fp32():
    cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=FFN, expert_bias=True)
    torch.manual_seed(0)
    layer = MoELayer(D, cfg, 0, KSchedule(cfg, 0)).cuda()
    x = torch.randn(4, 64, D, device="cuda")
    y32 = layer(x)
    y16 = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert layer.router.expert_bias.dtype == torch.float32 and layer.router.expert_bias.is_cuda
    layer.update_expert_bias(layer.last_stats.tokens_per_expert_E)
    assert layer.router.expert_bias.abs().max() == cfg.expert_bias_update_rate  # 1e-3 survives: fp32
    torch.testing.assert_close(y16.float(), y32, atol=2e-3, rtol=5e-2)


@pytest.mark.parametrize("score", ["post_act", "pre_act"])
def test_mone_auto_backend_matches_torch_path(score):
    fn = resolve_mone_fn("auto", torch.device("cuda"))
    assert fn is not mone_swiglu_torch  # kernels.mone imports on a CUDA machine with triton
    experts = _experts(enabled=True, keep_ratio=0.5, score=score)
    x = torch.randn(sum(SPLITS), D, device="cuda", dtype=torch.bfloat16)
    weights = [experts.w_gate_EFD, experts.w_up_EFD, experts.w_down_EDF]
    got = _run(lambda *a: fn(*a, experts.keep_k, score), x, weights)
    ref = _run(lambda *a: mone_swiglu_torch(*a, experts.keep_k, score), x, weights)
    for a, b in zip(got, ref):  # bf16 near-ties may pick a different neuron: compare in aggregate
        assert (a.float() - b.float()).norm() <= 2e-2 * b.float().norm()


@pytest.mark.parametrize("mone", [False, True])
def test_moe_layer_makes_no_host_sync_on_cuda(mone):
    """What tests/moe_core/test_layer_syncs.py counts in Python, checked by CUDA itself (C++-level syncs too):
    torch.cuda.set_sync_debug_mode("error") raises on any synchronising call in forward or backward."""
    cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=FFN, capacity_factor=0.75,
                    mone=MoNEConfig(enabled=mone, keep_ratio=0.5))
    torch.manual_seed(0)
    layer = MoELayer(D, cfg, layer_idx=0, k_schedule=KSchedule(cfg, seed=1)).cuda().to(torch.bfloat16).train()
    layer.router.float()
    layer.set_step(0)
    x = torch.randn(256, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().square().sum().backward()  # warm-up: lazy CUDA/cuBLAS/Triton initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
