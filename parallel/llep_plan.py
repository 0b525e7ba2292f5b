"""Least-Loaded Expert Parallelism (LLEP, arXiv 2601.17111): the planner and the token layout it implies.

Everything here is pure Python on integer counts: no torch.distributed, no tensors. Every EP rank calls the same
functions on the same all-gathered counts, so every rank derives the same plan and the same collective sizes
without any further communication (that is what keeps the dispatcher's collectives in lock-step).

Vocabulary
  P          EP ranks; expert ``e`` lives ("home") on rank ``e // experts_per_rank``.
  load       tokens (token-expert slots) a rank computes in one step.
  capacity   ``ceil(alpha * total / P)``: the most tokens the planner puts on a rank unless forced.
  chunk      a contiguous range ``[start, end)`` of one expert's tokens in *global order* computed by one rank.
             Global order of expert ``e``'s tokens = source rank 0's tokens for ``e`` (in its local order), then
             source rank 1's, and so on.
  transfer   ``(expert, home, helper)``: the expert's weights are sent to ``helper`` for this step and the
             gradient of those weights comes back to ``home``.

Algorithm (paper section "LLEP", our tie-breaks): if max/mean rank load < lambda, keep plain EP. Otherwise visit
experts largest first (ties: lower id first). Each rank's *effective* load is what it has been assigned plus its
own not-yet-visited experts (so a helper is not chosen if its own experts will fill it later). The home rank keeps
what fits under capacity; the rest spills in contiguous chunks to the helper with the lowest effective load, where
helpers that cannot take at least ``min_tokens_per_gemm`` tokens (or the whole remainder) are skipped; if no helper
can, the one with the most room takes a small chunk. A rank hosts at most ``max_foreign_experts`` foreign experts;
when no allowed rank has room left (only possible because of that cap) the remainder is *forced* onto the allowed
rank (home included) with the lowest effective load, over capacity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Chunk:
    """Tokens ``[start, end)`` (global order) of one expert, computed on ``rank``."""

    rank: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class LLEPPlan:
    ep_size: int
    experts_per_rank: int
    chunks: tuple[tuple[Chunk, ...], ...]
    """Per global expert: its chunks in global token order (empty for an expert with no tokens)."""
    transfers: tuple[tuple[int, int, int], ...]
    """``(expert, home, helper)`` weight moves, sorted by (helper, expert)."""
    loads_before: tuple[int, ...]
    """Per-rank load under plain EP."""
    loads_after: tuple[int, ...]
    """Per-rank load under this plan."""
    capacity: int
    rebalanced: bool
    """False when the imbalance was below lambda (plain EP plan)."""

    @property
    def num_experts(self) -> int:
        return len(self.chunks)

    def home(self, expert: int) -> int:
        return expert // self.experts_per_rank

    def foreign_experts(self, rank: int) -> tuple[int, ...]:
        """Experts whose weights ``rank`` receives this step, ascending (the order of its received weights)."""
        return tuple(e for e, _, helper in self.transfers if helper == rank)

    @property
    def imbalance_before(self) -> float:
        return _imbalance(self.loads_before)

    @property
    def imbalance_after(self) -> float:
        return _imbalance(self.loads_after)

    @property
    def tokens_moved(self) -> int:
        """Tokens computed away from their expert's home rank."""
        return sum(c.size for e, cs in enumerate(self.chunks) for c in cs if c.rank != self.home(e))


def _imbalance(loads: Sequence[int]) -> float:
    """max/mean rank load; 1.0 for an empty step."""
    total = sum(loads)
    return 1.0 if total == 0 else max(loads) * len(loads) / total


def check_hyperparameters(imbalance_threshold: float, capacity_factor: float, min_tokens_per_gemm: int,
                          max_foreign_experts: int) -> None:
    """Raise ValueError naming the ``moe.llep`` key that is out of range."""
    if imbalance_threshold <= 0:
        raise ValueError(f"moe.llep.imbalance_threshold must be > 0 (paper: 1.3), got {imbalance_threshold}")
    if capacity_factor < 1.0:
        raise ValueError(f"moe.llep.capacity_factor must be >= 1.0 so the ranks can hold every token "
                         f"(paper: 1.0-1.1), got {capacity_factor}")
    if min_tokens_per_gemm < 0 or max_foreign_experts < 0:
        raise ValueError(f"moe.llep.min_tokens_per_gemm and moe.llep.max_foreign_experts must be >= 0, got "
                         f"{min_tokens_per_gemm} and {max_foreign_experts}")


def _check_counts(counts: Sequence[int], ep_size: int, experts_per_rank: int) -> None:
    if ep_size < 1 or experts_per_rank < 1:
        raise ValueError(f"LLEP needs ep_size >= 1 and experts_per_rank >= 1, got {ep_size} and {experts_per_rank}")
    if len(counts) != ep_size * experts_per_rank:
        raise ValueError(f"LLEP got {len(counts)} expert counts but ep_size * experts_per_rank = "
                         f"{ep_size}*{experts_per_rank}; pass the global per-expert token counts")
    if any(c < 0 for c in counts):
        raise ValueError(f"LLEP expert token counts must be >= 0, got {list(counts)}")


def plain_ep_plan(counts: Sequence[int], ep_size: int, experts_per_rank: int) -> LLEPPlan:
    """Every expert's tokens on its home rank, nothing moves."""
    counts = [int(c) for c in counts]
    chunks = tuple((Chunk(e // experts_per_rank, 0, c),) if c else () for e, c in enumerate(counts))
    loads = tuple(sum(counts[r * experts_per_rank:(r + 1) * experts_per_rank]) for r in range(ep_size))
    return LLEPPlan(ep_size, experts_per_rank, chunks, (), loads, loads, max(loads, default=0), False)


class _Planner:
    """Mutable state of one planning pass (see the module docstring for the rules)."""

    def __init__(self, counts: list[int], ep_size: int, experts_per_rank: int, capacity: int,
                 min_tokens_per_gemm: int, max_foreign_experts: int):
        self.counts, self.P, self.epr = counts, ep_size, experts_per_rank
        self.capacity, self.min_chunk, self.max_foreign = capacity, min_tokens_per_gemm, max_foreign_experts
        self.pending = [sum(counts[r * experts_per_rank:(r + 1) * experts_per_rank]) for r in range(ep_size)]
        self.assigned = [0] * ep_size
        self.hosted: list[set[int]] = [set() for _ in range(ep_size)]

    def effective(self, rank: int) -> int:
        return self.assigned[rank] + self.pending[rank]

    def room(self, rank: int) -> int:
        return self.capacity - self.effective(rank)

    def allowed(self, expert: int, rank: int) -> bool:
        """May ``rank`` compute part of ``expert`` without breaking the foreign-expert memory cap?"""
        return (rank == expert // self.epr or expert in self.hosted[rank]
                or len(self.hosted[rank]) < self.max_foreign)

    def pick_helper(self, expert: int, remaining: int) -> tuple[int, int]:
        """(rank, tokens) for the next spilled chunk of ``expert``."""
        home = expert // self.epr
        open_ = sorted((r for r in range(self.P) if r != home and self.allowed(expert, r) and self.room(r) > 0),
                       key=lambda r: (self.effective(r), r))
        for r in open_:  # least loaded helper that can take a GEMM-sized chunk or the whole remainder
            if min(remaining, self.room(r)) >= min(self.min_chunk, remaining):
                return r, min(remaining, self.room(r))
        if open_:  # only small chunks fit: the most room gives the fewest of them
            r = max(open_, key=lambda r: (self.room(r), -self.effective(r), -r))
            return r, min(remaining, self.room(r))
        forced = min((r for r in range(self.P) if self.allowed(expert, r)),
                     key=lambda r: (self.effective(r), r != home, r))
        return forced, remaining

    def place(self, expert: int) -> tuple[Chunk, ...]:
        count, home = self.counts[expert], expert // self.epr
        self.pending[home] -= count
        keep = max(0, min(count, self.room(home)))
        chunks = [Chunk(home, 0, keep)] if keep else []
        self.assigned[home] += keep
        offset = keep
        while offset < count:
            rank, size = self.pick_helper(expert, count - offset)
            chunks.append(Chunk(rank, offset, offset + size))
            self.assigned[rank] += size
            if rank != home:
                self.hosted[rank].add(expert)
            offset += size
        return tuple(chunks)


def plan_llep(counts: Sequence[int], ep_size: int, experts_per_rank: int, *, imbalance_threshold: float = 1.3,
              capacity_factor: float = 1.0, min_tokens_per_gemm: int = 1024,
              max_foreign_experts: int = 4) -> LLEPPlan:
    """The LLEP plan for global per-expert token ``counts`` (length ``ep_size * experts_per_rank``).

    A pure, deterministic function of its arguments: equal inputs give equal plans on every rank.
    """
    counts = [int(c) for c in counts]
    _check_counts(counts, ep_size, experts_per_rank)
    check_hyperparameters(imbalance_threshold, capacity_factor, min_tokens_per_gemm, max_foreign_experts)
    plain = plain_ep_plan(counts, ep_size, experts_per_rank)
    if plain.imbalance_before < imbalance_threshold:
        return plain
    total = sum(counts)
    capacity = math.ceil(capacity_factor * total / ep_size)
    planner = _Planner(counts, ep_size, experts_per_rank, capacity, min_tokens_per_gemm, max_foreign_experts)
    chunks: list[tuple[Chunk, ...]] = [()] * len(counts)
    for e in sorted(range(len(counts)), key=lambda e: (-counts[e], e)):
        if counts[e]:
            chunks[e] = planner.place(e)
    transfers = tuple(sorted({(e, e // experts_per_rank, c.rank) for e, cs in enumerate(chunks) for c in cs
                              if c.rank != e // experts_per_rank}, key=lambda t: (t[2], t[0])))
    return LLEPPlan(ep_size, experts_per_rank, tuple(chunks), transfers, plain.loads_before,
                    tuple(planner.assigned), capacity, True)


# ---------------------------------------------------------------- token and weight layout implied by a plan

@dataclass(frozen=True)
class Piece:
    """The part of one chunk that comes from one source rank: rows ``[lo, hi)`` of ``expert``'s segment in the
    source's expert-sorted token buffer, computed on ``dst``."""

    src: int
    expert: int
    dst: int
    lo: int
    hi: int

    @property
    def size(self) -> int:
        return self.hi - self.lo


def pieces(plan: LLEPPlan, counts_PE: Sequence[Sequence[int]]) -> list[Piece]:
    """Split every chunk of ``plan`` by source rank. ``counts_PE[s][e]`` = tokens source rank ``s`` routes to
    expert ``e``; their column sums must be the counts the plan was made from."""
    out: list[Piece] = []
    offset_E = [0] * plan.num_experts
    for src, counts_E in enumerate(counts_PE):
        for e, n in enumerate(counts_E):
            lo_g, hi_g = offset_E[e], offset_E[e] + n
            for c in plan.chunks[e]:
                lo, hi = max(c.start, lo_g), min(c.end, hi_g)
                if lo < hi:
                    out.append(Piece(src, e, c.rank, lo - lo_g, hi - lo_g))
            offset_E[e] = hi_g
    return out


@dataclass(frozen=True)
class RankLayout:
    """What one rank sends, receives and computes under a plan. Segments are ``(start, length)`` row ranges."""

    send_segments: tuple[tuple[int, int], ...]
    """Rows of this rank's expert-sorted buffer, in send order (by destination rank, then expert)."""
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    compute_segments: tuple[tuple[int, int], ...]
    """Rows of the received buffer, in compute order (home experts ascending, then foreign experts ascending)."""
    home_tokens: tuple[int, ...]
    """Rows per home expert (all ``experts_per_rank`` of them, zeros included)."""
    foreign_experts: tuple[int, ...]
    foreign_tokens: tuple[int, ...]
    weights_send_local: tuple[int, ...]
    """Local indices of home experts whose weights go out, in send order (by helper rank, then expert)."""
    weights_send_splits: tuple[int, ...]
    weights_recv_splits: tuple[int, ...]
    weights_move: bool
    """Whether any rank moves expert weights this step (the same on every rank: it comes from the plan)."""


def rank_layout(plan: LLEPPlan, counts_PE: Sequence[Sequence[int]], rank: int) -> RankLayout:
    P, epr = plan.ep_size, plan.experts_per_rank
    all_pieces = pieces(plan, counts_PE)
    segment_start_E = [0] * plan.num_experts  # where each expert's rows start in this rank's sorted buffer
    for e in range(1, plan.num_experts):
        segment_start_E[e] = segment_start_E[e - 1] + counts_PE[rank][e - 1]
    sent = sorted((p for p in all_pieces if p.src == rank), key=lambda p: (p.dst, p.expert, p.lo))
    received = sorted((p for p in all_pieces if p.dst == rank), key=lambda p: (p.src, p.expert, p.lo))
    recv_start = {}
    row = 0
    for p in received:
        recv_start[p] = row
        row += p.size
    foreign = plan.foreign_experts(rank)
    compute_order = list(range(rank * epr, (rank + 1) * epr)) + list(foreign)
    by_expert = {e: [p for p in received if p.expert == e] for e in compute_order}
    tokens = [sum(p.size for p in by_expert[e]) for e in compute_order]
    out_moves = [(e, helper) for e, home, helper in plan.transfers if home == rank]
    return RankLayout(
        send_segments=tuple((segment_start_E[p.expert] + p.lo, p.size) for p in sent),
        send_splits=tuple(sum(p.size for p in sent if p.dst == r) for r in range(P)),
        recv_splits=tuple(sum(p.size for p in received if p.src == r) for r in range(P)),
        compute_segments=tuple((recv_start[p], p.size) for e in compute_order for p in by_expert[e]),
        home_tokens=tuple(tokens[:epr]),
        foreign_experts=foreign,
        foreign_tokens=tuple(tokens[epr:]),
        weights_send_local=tuple(e - rank * epr for e, _ in out_moves),
        weights_send_splits=tuple(sum(1 for _, h in out_moves if h == r) for r in range(P)),
        weights_recv_splits=tuple(sum(1 for e in foreign if e // epr == r) for r in range(P)),
        weights_move=bool(plan.transfers),
    )
