"""LLEP dispatcher on gloo worlds (EP=2, EP=4): outputs and every gradient equal plain EP (AllToAllDispatcher) and
the single-process reference, on balanced and heavily skewed routing, with the default min_tokens_per_gemm, MoNE
(also with its neuron balance loss, whose plain EP math is per EP rank), bf16 and duplicate top-k choices; plus
activation checkpointing and two micro-batches in flight (pipeline-style), which must neither deadlock nor change a
gradient."""
from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from moe_core.config import MoNEConfig
from moe_core.dispatcher import dispatch_compute_combine
from parallel.config import LLEPConfig
from moe_core.experts import SwiGLUExperts
from moe_core.layer import LocalDispatcher
from parallel.dispatch import AllToAllDispatcher
from parallel.comm import SINGLE_PROCESS, gather_dim0
from parallel.groups import initialize
from parallel.llep.dispatcher import LLEPDispatcher
from tests.helpers.dist import run_distributed
from tests.helpers.moe_reference import plain_ep_reference

E, D, F, T = 8, 8, 6, 12
CFG = LLEPConfig(imbalance_threshold=1.3, capacity_factor=1.0, min_tokens_per_gemm=1, max_foreign_experts=4)
ATOL = 1e-5
LAYOUTS = {2: [(1, 2)], 4: [(1, 4), (2, 2)]}  # world -> [(tp, ep)]


def _routing(kind: str, n_tokens: int, gen: torch.Generator) -> torch.Tensor:
    """topk_idx_TK for a routing pattern: balanced (K=2, every expert gets the same count when 2*T % E == 0), skew80 / skew95 (that share of tokens to expert 0,
    K=1), skew80_k2 (80% of tokens pick experts 0 and 1, K=2, 10% of second slots dropped)."""
    if kind == "balanced":
        slots = torch.arange(2 * n_tokens).view(n_tokens, 2) % E
        return slots[torch.randperm(n_tokens, generator=gen)]
    if kind == "duplicate_k2":  # 80% of tokens pick expert 0 twice (a router may repeat a choice), rest uniform
        other = torch.randint(1, E, (n_tokens,), generator=gen)
        first = torch.where(torch.rand(n_tokens, generator=gen) < 0.8, 0, other)
        return torch.stack([first, torch.where(torch.rand(n_tokens, generator=gen) < 0.5, first, (first + 3) % E)], 1)
    share = {"skew80": 0.8, "skew95": 0.95, "skew80_k2": 0.8}[kind]
    hot = torch.rand(n_tokens, generator=gen) < share
    other = torch.randint(1, E, (n_tokens,), generator=gen)
    first = torch.where(hot, torch.zeros_like(other), other)
    if kind != "skew80_k2":
        return first.unsqueeze(1)
    second = (first + 1) % E  # hot tokens pick experts 0 and 1, both homed on EP rank 0
    dropped = torch.rand(n_tokens, generator=gen) < 0.1
    return torch.stack([first, torch.where(dropped, torch.full_like(second, -1), second)], dim=1)


def _weights(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(E, F, D, generator=gen) * 0.3, torch.randn(E, F, D, generator=gen) * 0.3,
            torch.randn(E, D, F, generator=gen) * 0.3]


def _batch(kind: str, n_tokens: int, seed: int) -> list[torch.Tensor]:
    """One DP rank's micro-batch: ``[x_TD, idx_TK, w_TK, grad_TD]`` (same seed -> same batch on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    idx_TK = _routing(kind, n_tokens, gen)
    return [torch.randn(n_tokens, D, generator=gen), idx_TK,
            torch.rand(idx_TK.shape, generator=gen) * (idx_TK >= 0), torch.randn(n_tokens, D, generator=gen)]


def _experts(weights: list[torch.Tensor], first: int, count: int, mone: MoNEConfig | None = None,
             dtype: torch.dtype = torch.float32) -> SwiGLUExperts:
    experts = SwiGLUExperts(count, D, F, mone or MoNEConfig(), first_expert=first).to(dtype)
    with torch.no_grad():
        for p, w in zip((experts.w_gate_EFD, experts.w_up_EFD, experts.w_down_EDF), weights):
            p.copy_(w[first:first + count])
    return experts


def _run(dispatcher, experts, x_TD, idx_TK, w_TK, grad_TD) -> dict:
    """Forward + backward of ``sum(y * grad)``; returns the output and every gradient."""
    x_TD, w_TK = x_TD.clone().requires_grad_(), w_TK.clone().requires_grad_()
    y_TD = dispatch_compute_combine(dispatcher, x_TD, idx_TK, w_TK, experts)
    (y_TD * grad_TD).sum().backward()
    return dict(y=y_TD.detach(), x=x_TD.grad, w=w_TK.grad,
                experts=[p.grad.clone() for p in (experts.w_gate_EFD, experts.w_up_EFD, experts.w_down_EDF)])


# name -> (LLEP config, MoNE config, dtype, tolerance)
VARIANTS = {
    "fp32": (CFG, MoNEConfig(), torch.float32, 1e-5),
    "default_min_tokens": (LLEPConfig(), MoNEConfig(), torch.float32, 1e-4),  # 1024; sums over 1000s of rows
    "mone": (CFG, MoNEConfig(enabled=True, keep_ratio=0.5), torch.float32, 1e-5),
    "mone_balance": (CFG, MoNEConfig(enabled=True, keep_ratio=0.5, balance_loss_coeff=0.5), torch.float32, 1e-5),
    "bf16": (CFG, MoNEConfig(), torch.bfloat16, 3e-2),
}


def _compare_case(groups, kind: str, tokens_per_batch: list[int], seed: int, variant: str = "fp32") -> dict:
    """LLEP vs plain EP vs the single-process reference for this rank's micro-batch. The EP group computes the
    micro-batches of its members (TP peers share one); the reference runs their concatenation through all E
    experts, so an expert's reference gradient is exactly what its owner must end up with."""
    cfg, mone, dtype, tol = VARIANTS[variant]
    ep_batches = sorted(set(gather_dim0(torch.tensor([groups.dp_rank]), groups.ep_group).tolist()))
    batches = {d: _batch(kind, tokens_per_batch[d], seed + d) for d in ep_batches}
    for b in batches.values():
        b[0] = b[0].to(dtype)
    weights, epr = _weights(seed), E // groups.ep_size
    ref = plain_ep_reference(weights, mone, groups.ep_size, *[torch.cat(parts) for parts in zip(*batches.values())])
    lo = sum(tokens_per_batch[d] for d in ep_batches if d < groups.dp_rank)
    mine = slice(lo, lo + tokens_per_batch[groups.dp_rank])
    first = groups.ep_rank * epr
    ref_local = dict(y=ref["y"][mine], x=ref["x"][mine], w=ref["w"][mine],
                     experts=[g[first:first + epr] for g in ref["experts"]])
    llep = LLEPDispatcher(groups.tp_group, groups.ep_group, E, cfg)
    got = _run(llep, _experts(weights, first, epr, mone, dtype), *batches[groups.dp_rank])
    plain = _run(AllToAllDispatcher(groups.tp_group, groups.ep_group, E), _experts(weights, first, epr, mone, dtype),
                 *batches[groups.dp_rank])
    for name, other in (("plain EP", plain), ("reference", ref_local)):
        for key in ("y", "x", "w"):
            torch.testing.assert_close(got[key], other[key], atol=tol, rtol=tol,
                                       msg=lambda m: f"{kind}/{variant}: {key} differs from {name}: {m}")
        for i, (g, o) in enumerate(zip(got["experts"], other["experts"])):
            torch.testing.assert_close(g, o, atol=tol, rtol=tol,
                                       msg=lambda m: f"{kind}/{variant}: expert weight {i} grad vs {name}: {m}")
    assert got["y"].dtype == dtype
    return _plan_stats(llep)


def _plan_stats(llep: LLEPDispatcher) -> dict:
    """The stats every EP rank must agree on (the per-rank ones left out), plus the plan."""
    per_rank = ("planner_ms", "weight_buffer_bytes")
    plan, m = llep.last_plan, llep.cfg.min_tokens_per_gemm
    small = [c for e, cs in enumerate(plan.chunks) for c in cs
             if c.rank != plan.home(e) and c.size < min(m, int(plan.counts_E[e]) - c.start)]
    return dict({k: v for k, v in llep.last_stats.items() if k not in per_rank}, plan=repr(plan.transfers),
                chunks=repr(plan.chunks), sub_gemm_chunks=len(small))


def _layer_stack(dispatcher, experts_list, router_DE, x_TD, use_checkpoint: bool) -> torch.Tensor:
    """Two MoE layers with x-dependent top-1 routing biased to expert 0 (heavy skew), residual in between."""
    for experts in experts_list:
        def layer(h_TD, experts=experts):
            logits_TE = h_TD @ router_DE
            idx_TK = logits_TE.argmax(dim=1, keepdim=True)
            w_TK = torch.softmax(logits_TE, dim=1).gather(1, idx_TK)
            return h_TD + dispatch_compute_combine(dispatcher, h_TD, idx_TK, w_TK, experts)
        x_TD = checkpoint(layer, x_TD, use_reentrant=False) if use_checkpoint else layer(x_TD)
    return x_TD


def _checkpoint_and_microbatches(groups) -> dict:
    """Activation checkpointing and two micro-batches whose backwards run in reverse order give the same
    gradients as the plain run (and finish: a deadlock would time the world out)."""
    gen = torch.Generator().manual_seed(7)
    epr, first = E // groups.ep_size, groups.ep_rank * E // groups.ep_size
    weights = [_weights(1), _weights(2)]
    router_DE = torch.randn(D, E, generator=gen)
    router_DE[:, 0] += 3.0  # most tokens pick expert 0
    xs = [torch.randn(groups.dp_size, 12, D, generator=gen)[groups.dp_rank] + 1.0 for _ in range(2)]  # 2 micro-batches
    llep = LLEPDispatcher(groups.tp_group, groups.ep_group, E, CFG)
    grads = {}
    for mode in ("plain", "checkpoint", "interleaved"):
        stacks = [_experts(w, first, epr) for w in weights]
        params = [p for ex in stacks for p in ex.parameters()]
        if mode == "interleaved":  # forward mb0, forward mb1, backward mb1, backward mb0 (1F1B-like)
            outs = [_layer_stack(llep, stacks, router_DE, x, False) for x in xs]
            for out in reversed(outs):
                out.square().sum().backward()
        else:
            for x in xs:
                _layer_stack(llep, stacks, router_DE, x, mode == "checkpoint").square().sum().backward()
        grads[mode] = [p.grad.clone() for p in params]
    for mode in ("checkpoint", "interleaved"):
        for g, ref in zip(grads[mode], grads["plain"]):
            torch.testing.assert_close(g, ref, atol=ATOL, rtol=1e-5, msg=lambda m: f"{mode}: {m}")
    return _plan_stats(llep)


CASES = {  # name -> (routing kind, variant)
    "balanced": ("balanced", "fp32"), "skew80": ("skew80", "fp32"), "skew95": ("skew95", "fp32"),
    "skew80_k2": ("skew80_k2", "fp32"), "default_min_tokens": ("skew95", "default_min_tokens"),
    "mone": ("skew80_k2", "mone"), "mone_balance": ("skew80_k2", "mone_balance"), "bf16": ("skew80", "bf16"),
    "duplicate_k2": ("duplicate_k2", "fp32"),
}


def _all_cases(rank: int, world: int) -> dict:
    out = {}
    for tp, ep in LAYOUTS[world]:
        groups = initialize(tp, 1, ep)
        dp = groups.dp_size
        out[(tp, ep, "ep_group")] = gather_dim0(torch.tensor([rank]), groups.ep_group).tolist()
        for name, (kind, variant) in CASES.items():
            tokens = 1200 if variant == "default_min_tokens" else T  # enough to spill GEMM-sized chunks of 1024
            out[(tp, ep, name)] = _compare_case(groups, kind, [tokens] * dp, seed=11, variant=variant)
        out[(tp, ep, "empty_rank")] = _compare_case(groups, "skew80", [T] * (dp - 1) + [0], seed=3)
        out[(tp, ep, "checkpoint")] = _checkpoint_and_microbatches(groups)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_llep_matches_plain_ep_and_reference(world):
    results = run_distributed(_all_cases, world, timeout=150)
    for tp, ep in LAYOUTS[world]:
        peers = [r for r in results if r[(tp, ep, "ep_group")] == results[0][(tp, ep, "ep_group")]]
        assert len(peers) == ep
        for name in (*CASES, "empty_rank", "checkpoint"):
            stats = results[0][(tp, ep, name)]
            assert all(r[(tp, ep, name)] == stats for r in peers), f"{name}: EP ranks disagree on the plan"
            if name == "balanced":
                assert stats["rebalanced"] == 0.0 and stats["weights_moved"] == 0
            else:
                assert stats["rebalanced"] == 1.0 and stats["weights_moved"] > 0, f"{name}: LLEP did not spill"
                assert stats["imbalance_after"] < stats["imbalance_before"]
            assert stats["sub_gemm_chunks"] == 0, f"{name}: a spilled chunk breaks the min_tokens_per_gemm rule"
        assert results[0][(tp, ep, "skew80")]["imbalance_after"] <= 1.2


def test_single_process_llep_equals_local_dispatcher():
    batch, weights = _batch("skew80_k2", T, 5), _weights(5)
    ref = _run(LocalDispatcher(), _experts(weights, 0, E), *batch)
    llep = LLEPDispatcher(SINGLE_PROCESS, SINGLE_PROCESS, E, CFG)  # one EP rank holding every expert
    got = _run(llep, _experts(weights, 0, E), *batch)
    for key in ("y", "x", "w"):
        torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=1e-6)
    for g, r in zip(got["experts"], ref["experts"]):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)
    assert llep.last_stats["weights_moved"] == 0 and llep.last_stats["imbalance_before"] == 1.0


def test_bad_llep_config_or_missing_group_fails_when_the_dispatcher_is_built():
    with pytest.raises(ValueError, match=r"moe.llep.capacity_factor: 0.8 is outside the allowed range \[1, inf\)"):
        LLEPDispatcher(SINGLE_PROCESS, SINGLE_PROCESS, E, LLEPConfig(capacity_factor=0.8))
    with pytest.raises(ValueError, match=r"moe.llep.max_helpers_per_expert: 0 is outside the allowed range \[1, inf\)"):
        LLEPDispatcher(SINGLE_PROCESS, SINGLE_PROCESS, E, LLEPConfig(max_helpers_per_expert=0))
    for tp, ep in ((None, SINGLE_PROCESS), (SINGLE_PROCESS, None)):
        with pytest.raises(ValueError, match="is None: pass the process group explicitly"):
            LLEPDispatcher(tp, ep, E, CFG)
