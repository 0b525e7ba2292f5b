"""Least-Loaded Expert Parallelism (LLEP, arXiv 2601.17111): the planner and the token layout it implies.

Host-only numpy on integer counts: no torch, no torch.distributed, no device work, so nothing here can make the
device wait. Every EP rank calls the same functions on the same all-gathered counts, so every rank derives the
same plan and the same collective sizes without further communication (that keeps the collectives in lock-step).

Vocabulary
  P          EP ranks; expert ``e`` lives ("home") on rank ``e // L`` (``L`` = experts per rank, ``E = P * L``).
  load       tokens (token-expert slots) a rank computes in one step.
  capacity   ``ceil(alpha * total / P)``: the load the planner aims to keep every rank under.
  chunk      a contiguous range ``[start, end)`` of one expert's tokens in *global order* computed by one rank.
             Global order of expert ``e``'s tokens = source rank 0's tokens for ``e`` (in its local order), then
             source rank 1's, and so on.
  transfer   ``(expert, home, helper)``: the expert's weights are sent to ``helper`` for this step and the
             gradient of those weights comes back to ``home``.

Algorithm (paper section "LLEP", our tie-breaks). If max/mean rank load < lambda (``imbalance_threshold``) the plan
is plain EP. Otherwise visit experts largest first (ties: lower id first). A rank's *effective* load is what it
has been assigned plus its own not-yet-visited experts, so a helper is not chosen if its own experts will fill it
later. The home rank keeps what fits under capacity; the rest spills in contiguous chunks, each to the *allowed*
helper with the lowest effective load (ties: lower rank), an allowed helper being a rank other than home with
load under capacity that keeps both memory caps: it hosts at most ``max_foreign_experts`` foreign experts, and
the expert has at most ``max_helpers_per_expert`` helpers (a helper it already has is always allowed).

Chunking rule (``min_tokens_per_gemm``, ``m``): no spilled chunk is smaller than ``min(m, remaining)``. The chosen
helper takes ``min(remaining, room)`` (``room = capacity - its effective load``) when that is at least
``min(m, remaining)``. Otherwise a remainder of fewer than ``m`` tokens stays on the home rank when the home then
ends less than ``m`` over capacity (also when a memory cap leaves no helper at all); in every other case the helper
takes ``min(m, remaining)`` tokens, ending less than ``m`` over capacity. So an expert spilling ``s`` tokens makes
at most ``ceil(s / m)`` weight transfers (taking only the room multiplied tiny chunks: 7 transfers where this rule
makes 2 at P=8, E=8), and no rank ends ``m`` or more tokens over capacity unless a memory cap forces it: a home
keeping several sub-GEMM remainders spills them once they add up to ``m`` (``[800]*4 + [70]*12`` on P=4 with
``m = 1024`` rebalances instead of leaving rank 0 2190 tokens over). When no rank is allowed (only possible because of a memory cap), a remainder of ``m`` or more is
*forced* onto the rank with the lowest effective load among home, the expert's helpers and ranks that may still host it (ties:
home, then lower rank), over capacity.

Cost: planning loops in Python over the experts that spill and their chunks only (an expert whose home is not
over capacity is kept without work); the layout is a handful of numpy operations on ``P x E`` arrays (measured
well under 1 ms at E=256, P=64: docs/benchmarks.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from parallel.config import LLEPConfig

_NEVER = np.iinfo(np.int64).max  # sort key of a rank that may not take a chunk


@dataclass(frozen=True)
class Chunk:
    """Tokens ``[start, end)`` (global order) of one expert, computed on ``rank`` (for inspection and tests)."""

    rank: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, eq=False)
class LLEPPlan:
    """A plan as flat int64 arrays over its chunks ``C``, sorted by (expert, start)."""

    ep_size: int
    experts_per_rank: int
    counts_E: np.ndarray
    """Global tokens per expert the plan was made from."""
    chunk_expert_C: np.ndarray
    chunk_rank_C: np.ndarray
    chunk_start_C: np.ndarray
    chunk_end_C: np.ndarray
    transfers: tuple[tuple[int, int, int], ...]
    """``(expert, home, helper)`` weight moves, sorted by (helper, expert)."""
    loads_before: tuple[int, ...]
    """Per-rank load under plain EP."""
    loads_after: tuple[int, ...]
    """Per-rank load under this plan."""
    capacity: int
    rebalanced: bool
    """False when the imbalance was below lambda (plain EP plan)."""

    def __eq__(self, other) -> bool:
        if not isinstance(other, LLEPPlan):
            return NotImplemented
        return all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
                   for a, b in ((getattr(self, f.name), getattr(other, f.name)) for f in fields(self)))

    __hash__ = None

    @property
    def num_experts(self) -> int:
        return len(self.counts_E)

    @property
    def chunks(self) -> tuple[tuple[Chunk, ...], ...]:
        """Per global expert: its chunks in global token order (built on demand; not for the hot path)."""
        out: list[list[Chunk]] = [[] for _ in range(self.num_experts)]
        for e, r, s, t in zip(*(a.tolist() for a in (self.chunk_expert_C, self.chunk_rank_C, self.chunk_start_C,
                                                     self.chunk_end_C))):
            out[e].append(Chunk(r, s, t))
        return tuple(tuple(c) for c in out)

    def home(self, expert: int) -> int:
        return expert // self.experts_per_rank

    def foreign_experts(self, rank: int) -> tuple[int, ...]:
        """Experts whose weights ``rank`` receives this step, ascending (the order of its received weights)."""
        return tuple(e for e, _, helper in self.transfers if helper == rank)

    def helpers(self, expert: int) -> tuple[int, ...]:
        """Ranks that receive ``expert``'s weights this step, ascending."""
        return tuple(helper for e, _, helper in self.transfers if e == expert)

    @property
    def imbalance_before(self) -> float:
        return _imbalance(self.loads_before)

    @property
    def imbalance_after(self) -> float:
        return _imbalance(self.loads_after)

    @property
    def tokens_moved(self) -> int:
        """Tokens computed away from their expert's home rank."""
        away = self.chunk_rank_C != self.chunk_expert_C // self.experts_per_rank
        return int((self.chunk_end_C - self.chunk_start_C)[away].sum())


def _imbalance(loads: Sequence[int]) -> float:
    """max/mean rank load; 1.0 for an empty step."""
    total = sum(loads)
    return 1.0 if total == 0 else max(loads) * len(loads) / total


def _as_counts(counts) -> np.ndarray:
    """Host int64 copy of a sequence, numpy array or (CPU) tensor of counts."""
    return np.array(counts.tolist() if hasattr(counts, "tolist") and not isinstance(counts, np.ndarray) else counts,
                    dtype=np.int64)


def _check_counts(counts_E: np.ndarray, ep_size: int, experts_per_rank: int) -> None:
    if ep_size < 1 or experts_per_rank < 1:
        raise ValueError(f"LLEP needs ep_size >= 1 and experts_per_rank >= 1, got {ep_size} and {experts_per_rank}")
    if counts_E.shape != (ep_size * experts_per_rank,):
        raise ValueError(f"LLEP got {counts_E.size} expert counts but ep_size * experts_per_rank = "
                         f"{ep_size}*{experts_per_rank}; pass the global per-expert token counts")
    if (counts_E < 0).any():
        raise ValueError(f"LLEP expert token counts must be >= 0, got {counts_E.tolist()}")


def _plan(counts_E: np.ndarray, P: int, L: int, chunks: tuple[np.ndarray, ...], loads_before: np.ndarray,
          loads_after: np.ndarray, capacity: int, rebalanced: bool) -> LLEPPlan:
    expert_C, rank_C = chunks[0], chunks[1]
    moved = np.unique(rank_C * len(counts_E) + expert_C)  # sorted by (helper, expert)
    moved = moved[moved // len(counts_E) != (moved % len(counts_E)) // L]
    transfers = tuple((int(k % len(counts_E)), int(k % len(counts_E)) // L, int(k // len(counts_E))) for k in moved)
    return LLEPPlan(P, L, counts_E, *chunks, transfers, tuple(loads_before.tolist()), tuple(loads_after.tolist()),
                    capacity, rebalanced)


def plain_ep_plan(counts, ep_size: int, experts_per_rank: int) -> LLEPPlan:
    """Every expert's tokens on its home rank, nothing moves."""
    counts_E = _as_counts(counts)
    _check_counts(counts_E, ep_size, experts_per_rank)
    loads = counts_E.reshape(ep_size, experts_per_rank).sum(1)
    expert_C = np.flatnonzero(counts_E)
    chunks = (expert_C, expert_C // experts_per_rank, np.zeros_like(expert_C), counts_E[expert_C])
    return _plan(counts_E, ep_size, experts_per_rank, chunks, loads, loads, int(loads.max(initial=0)), False)


class _Spiller:
    """Mutable state of one planning pass over the spilling experts (rules: module docstring)."""

    def __init__(self, loads: np.ndarray, capacity: int, min_chunk: int, max_foreign: int, max_helpers: int):
        self.effective = loads.astype(np.int64)
        self.capacity, self.min_chunk = capacity, min_chunk
        self.max_foreign, self.max_helpers = max_foreign, max_helpers
        self.hosted = np.zeros(len(loads), dtype=np.int64)  # foreign experts hosted per rank
        self.free_hosts = len(loads) if max_foreign > 0 else 0  # ranks that may still host a new foreign expert
        self.ranks = np.arange(len(loads))
        self.can_host = np.full(len(loads), max_foreign > 0)  # hosted < max_foreign, kept up to date
        self.under = self.effective < capacity  # effective < capacity, kept up to date
        self.version = 0  # bumped whenever a rank's effective load goes down
        self.stuck: dict[int, tuple[int, int]] = {}  # home -> (version, most room any helper had) of a failed spill

    def spill(self, expert: int, home: int, count: int) -> list[tuple[int, int, int]]:
        """Chunks ``(rank, start, end)`` of an expert whose home is over capacity (the home chunk first)."""
        effective, capacity, m = self.effective, self.capacity, self.min_chunk
        before = int(effective[home])
        first_spill = min(count, before - capacity)
        if self.free_hosts == 0 or (self.free_hosts == 1 and self.hosted[home] < self.max_foreign):
            return [(home, 0, count)]  # no other rank may host a new foreign expert
        stuck = self.stuck.get(home)
        if stuck and stuck[0] == self.version and m > first_spill > stuck[1] and before < capacity + m:
            return [(home, 0, count)]  # the same sub-GEMM spill failed here and no rank has gained room since
        keep = count - first_spill
        effective[home] -= first_spill
        self.under[home] = effective[home] < capacity
        chunks = [(home, 0, keep)] if keep else []
        is_helper = np.zeros(len(effective), dtype=bool)
        n_helpers, offset = 0, keep
        while offset < count:
            remaining = count - offset
            if n_helpers == 0:
                open_ = self.can_host & self.under
            elif n_helpers < self.max_helpers:
                open_ = (self.can_host | is_helper) & self.under
            else:
                open_ = is_helper & self.under
            open_[home] = False
            key = np.where(open_, effective, _NEVER)
            rank = int(key.argmin())
            room = capacity - int(effective[rank]) if key[rank] != _NEVER else 0
            if room >= min(m, remaining) and room > 0:
                size = min(remaining, room)
            elif remaining < m and effective[home] + remaining < capacity + m:
                # a sub-GEMM remainder that no helper has room for stays home, which ends less than m over capacity
                if offset == keep:
                    self.stuck[home] = (self.version, room)
                rank, size = home, remaining
            elif room > 0:
                size = min(m, remaining)  # a whole GEMM's worth (or the remainder), over capacity by less than m
            else:  # forced (a memory cap binds): over capacity, onto home or a rank that may host the expert
                may_host = is_helper | self.can_host if n_helpers < self.max_helpers else is_helper.copy()
                may_host[home] = True
                rank, size = int(np.where(may_host, effective * 2 + (self.ranks != home), _NEVER).argmin()), remaining
            if rank != home and not is_helper[rank]:
                is_helper[rank] = True
                self.hosted[rank] += 1
                if self.hosted[rank] == self.max_foreign:
                    self.free_hosts -= 1
                    self.can_host[rank] = False
                n_helpers += 1
            effective[rank] += size
            self.under[rank] = effective[rank] < capacity
            if chunks and chunks[-1][0] == rank:  # contiguous with the last chunk on the same rank: extend it
                chunks[-1] = (rank, chunks[-1][1], offset + size)
            else:
                chunks.append((rank, offset, offset + size))
            offset += size
        if int(effective[home]) < before:
            self.version += 1  # a rank's load went down: rooms may have opened
        return chunks


def plan_llep(counts, ep_size: int, experts_per_rank: int, cfg: LLEPConfig) -> LLEPPlan:
    """The LLEP plan for global per-expert token ``counts`` (length ``ep_size * experts_per_rank``; a sequence,
    numpy array or CPU tensor of non-negative ints) under the ``moe.llep`` settings ``cfg``. A pure, deterministic
    function of its arguments: equal inputs give equal plans on every rank. Raises ValueError naming the bad
    argument or ``moe.llep`` key."""
    counts_E = _as_counts(counts)
    _check_counts(counts_E, ep_size, experts_per_rank)
    cfg.validate()
    P, L = ep_size, experts_per_rank
    loads = counts_E.reshape(P, L).sum(1)
    if _imbalance(loads.tolist()) < cfg.imbalance_threshold:
        return plain_ep_plan(counts_E, P, L)
    capacity = math.ceil(cfg.capacity_factor * int(loads.sum()) / P)
    spiller = _Spiller(loads, capacity, cfg.min_tokens_per_gemm, cfg.max_foreign_experts, cfg.max_helpers_per_expert)
    split: list[int] = []  # (expert, rank, start, end) flat, of the experts not kept whole at home
    whole_E = counts_E > 0
    counts_list = counts_E.tolist()
    for e in np.lexsort((np.arange(len(counts_E)), -counts_E)).tolist():
        if counts_list[e] == 0:
            break  # sorted largest first: the rest are empty too
        if spiller.effective[e // L] > capacity:  # otherwise the home keeps the whole expert at no cost
            chunks = spiller.spill(e, e // L, counts_list[e])
            if len(chunks) > 1 or chunks[0][0] != e // L:
                whole_E[e] = False
                for c in chunks:
                    split += (e, *c)
    whole = np.flatnonzero(whole_E)
    table = np.concatenate([np.stack([whole, whole // L, np.zeros_like(whole), counts_E[whole]], 1),
                            np.array(split, dtype=np.int64).reshape(-1, 4)])
    table = table[np.lexsort((table[:, 2], table[:, 0]))]
    chunks = tuple(np.ascontiguousarray(table[:, i]) for i in range(4))
    return _plan(counts_E, P, L, chunks, loads, spiller.effective, capacity, True)


# ---------------------------------------------------------------- token and weight layout implied by a plan

@dataclass(frozen=True)
class RankLayout:
    """What one rank sends, receives and computes under a plan (host numpy/lists; segments are row ranges given
    as parallel int64 arrays of starts and lengths, zero-length ones left out)."""

    send_starts: np.ndarray
    send_lengths: np.ndarray
    """Rows of this rank's expert-sorted buffer, in send order (by destination rank, then expert, then start)."""
    send_splits: list[int]
    recv_splits: list[int]
    compute_starts: np.ndarray
    compute_lengths: np.ndarray
    """Rows of the received buffer, in compute order (home experts ascending, then foreign experts ascending)."""
    home_tokens: list[int]
    """Rows per home expert (all ``experts_per_rank`` of them, zeros included)."""
    foreign_experts: tuple[int, ...]
    foreign_tokens: list[int]
    weights_send: tuple[tuple[int, int, int], ...]
    """``(local expert, global expert, helper rank)`` of each weight copy this rank sends, by (helper, expert)."""
    weights_recv: tuple[tuple[int, int], ...]
    """``(global expert, home rank)`` of each weight copy this rank receives, by expert (= ``foreign_experts``)."""
    weights_move: bool
    """Whether any rank moves expert weights this step (the same on every rank: it comes from the plan)."""


def _exclusive_cumsum(a: np.ndarray, axis: int = 0) -> np.ndarray:
    return np.cumsum(a, axis=axis) - a


def rank_layout(plan: LLEPPlan, counts_PE, rank: int) -> RankLayout:
    """This rank's layout. ``counts_PE[s, e]`` (``P x E`` ints) = tokens source rank ``s`` routes to expert ``e``;
    its column sums must be the counts the plan was made from."""
    P, L = plan.ep_size, plan.experts_per_rank
    counts_PE = np.asarray(counts_PE, dtype=np.int64).reshape(P, plan.num_experts)
    start_PE = _exclusive_cumsum(counts_PE)  # global-order start of source s's tokens of expert e
    expert_C, rank_C, start_C, end_C = plan.chunk_expert_C, plan.chunk_rank_C, plan.chunk_start_C, plan.chunk_end_C

    # Send side: the overlap of every chunk with this rank's tokens of the chunk's expert.
    mine_C, base_C = counts_PE[rank, expert_C], start_PE[rank, expert_C]
    lo_C = np.clip(start_C - base_C, 0, mine_C)
    n_C = np.clip(end_C - base_C, 0, mine_C) - lo_C
    send = np.flatnonzero(n_C)
    send = send[np.lexsort((start_C[send], expert_C[send], rank_C[send]))]
    send_starts = _exclusive_cumsum(counts_PE[rank])[expert_C[send]] + lo_C[send]

    # Receive side: every source's overlap with the chunks computed here, received by source then chunk order.
    here = np.flatnonzero(rank_C == rank)
    e_J = expert_C[here]
    src_PJ, base_PJ = counts_PE[:, e_J], start_PE[:, e_J]
    lo_PJ = np.clip(start_C[here] - base_PJ, 0, src_PJ)
    n_PJ = np.clip(end_C[here] - base_PJ, 0, src_PJ) - lo_PJ
    recv_start_PJ = _exclusive_cumsum(n_PJ.ravel()).reshape(n_PJ.shape)
    foreign = plan.foreign_experts(rank)
    slot_of_E = np.full(plan.num_experts, -1, dtype=np.int64)  # compute position of each expert computed here
    slot_of_E[rank * L:(rank + 1) * L] = np.arange(L)
    slot_of_E[list(foreign)] = L + np.arange(len(foreign))
    slot_J = slot_of_E[e_J]
    src_grid, slot_grid = np.broadcast_to(np.arange(P)[:, None], n_PJ.shape), np.broadcast_to(slot_J, n_PJ.shape)
    nonzero = n_PJ.ravel() > 0
    compute = np.flatnonzero(nonzero)[np.lexsort((np.broadcast_to(start_C[here], n_PJ.shape).ravel()[nonzero],
                                                  src_grid.ravel()[nonzero], slot_grid.ravel()[nonzero]))]
    tokens = np.bincount(slot_J, weights=n_PJ.sum(0), minlength=L + len(foreign)).astype(np.int64).tolist()
    return RankLayout(
        send_starts=send_starts, send_lengths=n_C[send],
        send_splits=np.bincount(rank_C[send], weights=n_C[send], minlength=P).astype(np.int64).tolist(),
        recv_splits=n_PJ.sum(1).tolist(),
        compute_starts=recv_start_PJ.ravel()[compute], compute_lengths=n_PJ.ravel()[compute],
        home_tokens=tokens[:L], foreign_experts=foreign, foreign_tokens=tokens[L:],
        weights_send=tuple((e - rank * L, e, helper) for e, home, helper in plan.transfers if home == rank),
        weights_recv=tuple((e, home) for e, home, helper in plan.transfers if helper == rank),
        weights_move=bool(plan.transfers))
