"""The token-dispatcher protocol (moe_core/dispatcher.py): a new transport is a new class, plugged into an MoELayer
without touching the layer or the other dispatchers; the driver runs its phases in order and marks each profiler
phase once."""
from __future__ import annotations

import copy

import pytest
import torch

from moe_core.config import MoEConfig, MoNEConfig
from moe_core.dispatcher import DispatchState, TokenDispatcher, dispatch_compute_combine
from moe_core.layer import LocalDispatcher, MoELayer
from moe_core.matryoshka import KSchedule
from moe_core.permute import make_permutation

D, T = 16, 24
PHASE_ORDER = ["dispatch_preprocess", "token_dispatch", "dispatch_postprocess", "compute_experts",
               "combine_preprocess", "token_combine", "combine_postprocess", "gather_output"]


class LoopbackDispatcher(TokenDispatcher):
    """A test transport written only against the protocol: sends only the kept rows through a "wire" (a copy, as a
    transport's buffer would be), combines with index_add instead of moe_core's unpermute, and records its
    phases."""

    def __init__(self):
        self.calls: list[str] = []

    def dispatch_preprocess(self, x_TD, topk_idx_TK, topk_weight_TK, experts):
        self.calls.append("dispatch_preprocess")
        local_idx_TK = torch.where(topk_idx_TK >= 0, topk_idx_TK - experts.first_expert, topk_idx_TK)
        perm = make_permutation(local_idx_TK, experts.num_local_experts)
        kept = int(perm.tokens_per_expert_E.sum())  # this transport sends only the kept rows (a host read)
        return x_TD.index_select(0, perm.token_idx_N[:kept]), DispatchState(experts, perm, topk_weight_TK)

    def token_dispatch(self, x_ND, state):
        self.calls.append("token_dispatch")
        return x_ND.clone()

    def dispatch_postprocess(self, x_MD, state):
        self.calls.append("dispatch_postprocess")
        state.tokens_per_expert = state.perm.tokens_per_expert_E
        return x_MD

    def compute_experts(self, x_MD, state):
        self.calls.append("compute_experts")
        return super().compute_experts(x_MD, state)

    def combine_preprocess(self, y_MD, state):
        self.calls.append("combine_preprocess")
        return y_MD

    def token_combine(self, y_MD, state):
        self.calls.append("token_combine")
        return y_MD.clone()

    def combine_postprocess(self, y_ND, state):
        self.calls.append("combine_postprocess")
        rows = y_ND.shape[0]
        slot_N = state.perm.slot_idx_N[:rows]
        weight_N = state.topk_weight_TK.reshape(-1).index_select(0, slot_N)
        y_TD = torch.zeros(state.perm.row_TK.shape[0], y_ND.shape[1], dtype=torch.float32, device=y_ND.device)
        y_TD.index_add_(0, state.perm.token_idx_N[:rows], y_ND.float() * weight_N[:, None])
        return y_TD.to(y_ND.dtype)

    def gather_output(self, y_tD, state):
        self.calls.append("gather_output")
        return super().gather_output(y_tD, state)


def _layer(**moe) -> MoELayer:
    cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=32, **moe)
    torch.manual_seed(0)
    return MoELayer(D, cfg, layer_idx=0, k_schedule=KSchedule(cfg, seed=1)).train()


def _forward_backward(layer: MoELayer, x: torch.Tensor, g: torch.Tensor) -> dict:
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * g).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    return {"y": y.detach(), "x_grad": x.grad, **grads}


@pytest.mark.parametrize("moe", [{}, {"capacity_factor": 0.5},
                                 {"mone": MoNEConfig(enabled=True, keep_ratio=0.5, balance_loss_coeff=0.01)}],
                         ids=["top-k", "capacity dropping", "MoNE"])
def test_a_new_dispatcher_plugs_into_the_layer_and_matches_the_local_one(moe):
    local = _layer(**moe)
    plugged = copy.deepcopy(local)
    plugged.dispatcher = LoopbackDispatcher()
    gen = torch.Generator().manual_seed(3)
    x, g = torch.randn(2, T // 2, D, generator=gen), torch.randn(2, T // 2, D, generator=gen)
    ref, got = _forward_backward(local, x, g), _forward_backward(plugged, x, g)
    assert isinstance(local.dispatcher, LocalDispatcher) and set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    assert plugged.dispatcher.calls == PHASE_ORDER
    assert plugged.last_stats.k == local.last_stats.k == 2


def test_shared_expert_runs_between_dispatch_and_postprocess_and_adds_to_the_routed_output():
    """The driver calls the shared expert right after token_dispatch (where an asynchronous transport's exchange
    is in flight) and the layer's output is routed + sigmoid-gated shared, equal to the local dispatcher's."""
    local = _layer(shared_expert_ffn_hidden_size=24, shared_expert_gate=True)
    plugged = copy.deepcopy(local)
    plugged.dispatcher = LoopbackDispatcher()
    shared_forward = plugged.shared_expert.forward

    def recorded(x):
        plugged.dispatcher.calls.append("shared_expert")
        return shared_forward(x)

    plugged.shared_expert.forward = recorded
    gen = torch.Generator().manual_seed(3)
    x, g = torch.randn(T, D, generator=gen), torch.randn(T, D, generator=gen)
    ref, got = _forward_backward(local, x, g), _forward_backward(plugged, x, g)
    assert plugged.dispatcher.calls == [*PHASE_ORDER[:2], "shared_expert", *PHASE_ORDER[2:]]
    assert set(got) == set(ref) and "shared_expert_gate.weight" in ref
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    routed = copy.deepcopy(local)
    routed.shared_expert, routed.shared_expert_gate = None, None
    with torch.no_grad():
        shared = torch.sigmoid(local.shared_expert_gate(x)) * local.shared_expert(x)
        torch.testing.assert_close(local(x), routed(x) + shared)


def test_the_driver_marks_each_profiler_phase_in_order():
    layer = _layer()
    x = torch.randn(T, D)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layer(x)
    marks = [e.name[len("moetron."):] for e in sorted(prof.events(), key=lambda e: e.time_range.start)
             if e.name.startswith("moetron.")]
    assert marks == ["router", "permute", "dispatch", "permute", "experts", "unpermute", "combine", "unpermute",
                     "combine"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _layer(shared_expert_ffn_hidden_size=8)(x)
    marks = [e.name[len("moetron."):] for e in sorted(prof.events(), key=lambda e: e.time_range.start)
             if e.name.startswith("moetron.")]
    assert marks[:4] == ["router", "permute", "dispatch", "shared_experts"] and marks.count("shared_experts") == 1


def test_a_dispatcher_missing_a_phase_cannot_be_built():
    class Incomplete(TokenDispatcher):
        def dispatch_preprocess(self, x_TD, topk_idx_TK, topk_weight_TK, experts):
            raise AssertionError("never called")

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


def test_driver_equals_calling_phases_by_hand():
    """dispatch_compute_combine is exactly the phases in order (nothing hidden in the driver)."""
    layer = _layer()
    gen = torch.Generator().manual_seed(5)
    x_TD = torch.randn(T, D, generator=gen)
    routed = layer.router(x_TD, 2)
    d = LocalDispatcher()
    y = dispatch_compute_combine(d, x_TD, routed.topk_idx_TK, routed.topk_weight_TK, layer.experts)
    rows, state = d.dispatch_preprocess(x_TD, routed.topk_idx_TK, routed.topk_weight_TK, layer.experts)
    for name in PHASE_ORDER[1:]:
        rows = getattr(d, name)(rows, state)
    assert torch.equal(y, rows)
