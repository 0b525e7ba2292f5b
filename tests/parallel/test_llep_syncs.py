"""Plain EP (deduplicated dispatch) makes one host sync per layer (its split sizes) and none in backward; LLEP
makes no more than plain EP (forward + backward), balanced or skewed, and none in backward, also with MoNE and its neuron balance loss (whose LLEP form adds an all-reduce of counts, never a host
read); counted with tests/helpers/syncs.py on a 2-rank gloo world."""
from __future__ import annotations

import torch
import torch.distributed as dist

from moe_core.config import MoNEConfig
from moe_core.dispatcher import dispatch_compute_combine
from moe_core.experts import SwiGLUExperts
from parallel.comm import SINGLE_PROCESS
from parallel.config import LLEPConfig
from parallel.dispatch import AllToAllDispatcher
from parallel.llep.dispatcher import LLEPDispatcher
from tests.helpers.dist import run_distributed
from tests.helpers.syncs import count_syncs

E, D, F, T = 8, 8, 16, 32


def _counts(rank: int, world: int) -> dict:
    out = {}
    for mone in (MoNEConfig(), MoNEConfig(enabled=True, keep_ratio=0.5, balance_loss_coeff=0.1)):
        experts = SwiGLUExperts(E // world, D, F, mone, first_expert=rank * E // world)
        out.update({(mone.enabled, *key): v for key, v in _counts_of(experts, rank).items()})
    return out


def _counts_of(experts: SwiGLUExperts, rank: int) -> dict:
    dispatchers = {"plain": AllToAllDispatcher(SINGLE_PROCESS, dist.group.WORLD, E),
                   "llep": LLEPDispatcher(SINGLE_PROCESS, dist.group.WORLD, E, LLEPConfig(min_tokens_per_gemm=4))}
    gen = torch.Generator().manual_seed(rank)
    out = {}
    for skew in ("balanced", "skewed"):
        idx_TK = torch.randint(0, E, (T, 2), generator=gen)
        if skew == "skewed":
            idx_TK[:, 0] = 0  # every token picks expert 0
            idx_TK[:, 1] = torch.randint(1, E, (T,), generator=gen)
        w_TK = torch.rand(T, 2, generator=gen)
        for name, dispatcher in dispatchers.items():
            x_TD = torch.randn(T, D, generator=gen, requires_grad=True)
            with count_syncs() as forward:
                y_TD = dispatch_compute_combine(dispatcher, x_TD, idx_TK, w_TK, experts)
            with count_syncs() as backward:
                y_TD.square().sum().backward()
            out[(skew, name)] = (forward.count, backward.count, forward.report() + "\n" + backward.report())
        out[(skew, "rebalanced")] = dispatchers["llep"].last_stats["rebalanced"]
    return out


def test_llep_makes_no_more_host_syncs_than_plain_ep():
    for rank_out in run_distributed(_counts, 2):
        for mone in (False, True):
            assert rank_out[(mone, "balanced", "rebalanced")] == 0.0
            assert rank_out[(mone, "skewed", "rebalanced")] == 1.0
            for skew in ("balanced", "skewed"):
                (plain_fwd, plain_bwd, plain_sites), (llep_fwd, llep_bwd, llep_sites) = (
                    rank_out[(mone, skew, "plain")], rank_out[(mone, skew, "llep")])
                assert plain_fwd == 1, f"plain EP reads its split sizes once, nothing else:\n{plain_sites}"
                assert llep_fwd <= plain_fwd and llep_bwd == plain_bwd == 0, (
                    f"mone={mone} {skew}: LLEP {llep_fwd}+{llep_bwd} syncs vs plain EP {plain_fwd}+{plain_bwd}\n"
                    f"LLEP:\n{llep_sites}\nplain EP:\n{plain_sites}")
