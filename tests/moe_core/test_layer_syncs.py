"""An MoE layer's forward and backward make no device-to-host synchronisation (issue 14): tokens per expert stay on
the device (grouped-GEMM offsets, dead rows for dropped slots), for every routing feature that composes into a
layer. Counted with tests/helpers/syncs.py; a failure names every call site."""
from __future__ import annotations

import pytest
import torch

from moe_core.config import MatryoshkaConfig, MoEConfig, MoNEConfig
from moe_core.layer import MoELayer
from moe_core.matryoshka import KSchedule
from tests.helpers.syncs import count_syncs

D, T = 16, 24
VARIANTS = {
    "top-k": {},
    "capacity dropping": dict(capacity_factor=0.5),
    "MoNE + neuron balance loss": dict(mone=MoNEConfig(enabled=True, keep_ratio=0.5, balance_loss_coeff=0.01)),
    "Matryoshka": dict(matryoshka=MatryoshkaConfig(enabled=True, k_min=1, k_max=3)),
    "expert bias + z-loss": dict(expert_bias=True, z_loss_coeff=1e-3),
    "all of them": dict(capacity_factor=0.75, mone=MoNEConfig(enabled=True, keep_ratio=0.5, balance_loss_coeff=0.01),
                        matryoshka=MatryoshkaConfig(enabled=True, k_min=1, k_max=3), expert_bias=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_moe_layer_forward_and_backward_make_no_host_sync(variant, dtype):
    cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=32, **VARIANTS[variant])
    torch.manual_seed(0)
    layer = MoELayer(D, cfg, layer_idx=0, k_schedule=KSchedule(cfg, seed=1)).to(dtype).train()
    layer.router.to(torch.float32)  # routing is decided in fp32 (parallel/model.py keeps the router fp32 too)
    layer.set_step(3)
    x = torch.randn(2, T // 2, D, dtype=dtype, requires_grad=True)
    with count_syncs() as forward:
        y = layer(x)
    with count_syncs() as backward:
        y.float().square().sum().backward()
    assert forward.count == 0 and backward.count == 0, forward.report() + "\n" + backward.report()
    assert x.grad.isfinite().all() and layer.experts.w_gate_EFD.grad.abs().sum() > 0


def test_the_counter_sees_a_host_read_inside_the_layer(monkeypatch):
    """The bound above can fail: reading the counts on the host (what the layer did before) is counted and named."""
    import moe_core.layer

    cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=32)
    layer = MoELayer(D, cfg, layer_idx=0, k_schedule=KSchedule(cfg, seed=1)).train()
    original = moe_core.layer.make_permutation

    def host_reading(*args, **kwargs):
        perm = original(*args, **kwargs)
        perm.tokens_per_expert_E.tolist()
        return perm

    monkeypatch.setattr(moe_core.layer, "make_permutation", host_reading)
    with count_syncs() as log:
        layer(torch.randn(T, D))
    assert log.count == 1 and "test_layer_syncs.py" in log.report() and "host_reading" in log.report()
