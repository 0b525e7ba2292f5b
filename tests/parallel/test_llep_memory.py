"""LLEP's weight transfer: sent straight from the parameter storage (no per-helper copies), helpers per expert and
foreign experts per rank capped by config, and the received bytes per rank within the stated bound
(``parallel.llep.extra_weight_bytes_bound``); measured on the P2P ops a 4-rank gloo world actually posts."""
from __future__ import annotations

import torch
import torch.distributed as dist

from moe_core.config import MoNEConfig
from moe_core.dispatcher import dispatch_compute_combine
from moe_core.experts import SwiGLUExperts
from parallel.comm import SINGLE_PROCESS
from parallel.config import LLEPConfig
from parallel.llep.dispatcher import LLEPDispatcher, extra_weight_bytes_bound
from tests.helpers.dist import run_distributed

E, D, F, T = 8, 8, 16, 64
CFG = LLEPConfig(min_tokens_per_gemm=1, max_foreign_experts=1, max_helpers_per_expert=2)


def _transfer(rank: int, world: int) -> dict:
    experts = SwiGLUExperts(E // world, D, F, MoNEConfig(), first_expert=rank * E // world)
    storages = {p.untyped_storage().data_ptr() for p in experts.parameters()}
    llep = LLEPDispatcher(SINGLE_PROCESS, dist.group.WORLD, E, CFG)
    posted: list[tuple[str, torch.Tensor]] = []
    original = dist.batch_isend_irecv

    def recording(ops):
        posted.extend(("send" if op.op is dist.isend else "recv", op.tensor) for op in ops)
        return original(ops)

    gen = torch.Generator().manual_seed(rank)
    # every token picks expert 0, the only expert of rank 0 that anyone picks (second choices avoid experts 0, 1)
    idx_TK = torch.stack([torch.zeros(T, dtype=torch.int64), torch.randint(2, E, (T,), generator=gen)], 1)
    x_TD = torch.randn(T, D, generator=gen, requires_grad=True)
    dist.batch_isend_irecv = recording
    try:
        y_TD = dispatch_compute_combine(llep, x_TD, idx_TK, torch.rand(T, 2, generator=gen), experts)
        forward = list(posted)
        y_TD.square().sum().backward()
    finally:
        dist.batch_isend_irecv = original
    expert_bytes = sum(p[0].numel() * p.element_size() for p in experts.parameters())
    return dict(
        sends_alias_params=all(t.untyped_storage().data_ptr() in storages for kind, t in forward if kind == "send"),
        sends=sum(kind == "send" for kind, _ in forward),
        recv_bytes=sum(t.numel() * t.element_size() for kind, t in posted if kind == "recv"),
        grad_bytes_of_received=sum(t.numel() * t.element_size() for kind, t in forward if kind == "recv"),
        bound=extra_weight_bytes_bound(CFG, E // world, expert_bytes), expert_bytes=expert_bytes,
        helpers_of_hot=len(llep.last_plan.helpers(0)), foreign=len(llep.last_plan.foreign_experts(rank)),
        recorded=llep.last_stats["weight_buffer_bytes"])


def test_weights_sent_from_parameter_storage_within_the_memory_bound():
    results = run_distributed(_transfer, 4)
    assert results[0]["helpers_of_hot"] == CFG.max_helpers_per_expert, "the hot expert wants every rank: capped"
    assert results[0]["sends"] == 3 * CFG.max_helpers_per_expert, "gate, up, down once per helper"
    for r in results:
        assert r["sends_alias_params"], "a weight copy was sent from a temporary instead of the parameter"
        assert r["foreign"] <= CFG.max_foreign_experts
        # received weights + (backward) their gradients + returned gradients of this rank's spilled experts
        extra = r["recv_bytes"] + r["grad_bytes_of_received"]
        assert extra == r["recorded"] <= r["bound"], r
    # only expert 0 moves: each helper receives it once, and rank 0 receives one gradient back per helper
    assert sum(r["recv_bytes"] for r in results) == 2 * CFG.max_helpers_per_expert * results[0]["expert_bytes"]
