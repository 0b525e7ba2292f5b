"""Mixtures of shard directories (``data.paths``): which source each global sample comes from, and how each rank's
workers draw every source's samples.

Mixtures (``data.paths: [{path, weight}, ...]``, Megatron's ``--data-path 0.7 a 0.3 b``): global sample ``g`` of the
run (step ``s`` holds ``[s * GBS, (s + 1) * GBS)``, DP rank ``r`` its ``r``-th contiguous share) comes from the
source :class:`Blend` assigns to ``g``: a fixed low-discrepancy rule of the normalised weights, so the sources of
every step do not depend on the layout and every N consecutive samples hold ``w * N + O(log N)`` of each source
(10k samples: within 3 samples of ``w * 10k``). Each source keeps its own position: it is read in the single-source
order of :mod:`launcher.data.reader` (micro-batch size 1), worker ``w`` of rank ``r`` drawing from its slot
``r * W + w`` of the source and moving that slot to the source's next epoch when it is used up. The state is the
rank's batch count (every position is a function of it), so resume is exact; at another layout the mixture
continues at the global index of the last completed step and each source from its global count there (its current
epoch approximately); a changed mixture (sources or weights) starts from its beginning, with a warning. Each source
has its own shuffle seed (derived from ``train.seed`` and its position); all sources must share one tokenizer.
Tokens drawn per source (:meth:`launcher.data.loader.MixtureLoader.source_tokens`, all DP ranks, cumulative) go to
TensorBoard as ``train_data/tokens/<source>``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import numpy as np

from launcher.data.batch import Batch
from launcher.data.format import DataError
from launcher.data.reader import ShardPlan

_WEYL_STEP = 0x9E3779B97F4A7C15  # the odd integer nearest 2**64 / golden ratio
_COUNT_CHUNK = 1 << 20  # global indices per numpy call when counting


@dataclass(frozen=True)
class Blend:
    """Which source each global sample index ``g`` comes from: a pure function of ``g`` and the weights.

    ``u_g = (g + 1) * 0x9E3779B97F4A7C15 mod 2**64`` (the golden-ratio Weyl sequence, exact in integers); sample
    ``g`` comes from the source ``j`` whose share ``[C_j, C_j + w_j)`` of ``[0, 1)`` holds ``u_g / 2**64``
    (``w`` the normalised weights, ``C_j`` the sum of those before ``j``, in ``data.paths`` order). The sequence
    has low discrepancy (Weyl 1916; Kuipers & Niederreiter, "Uniform Distribution of Sequences", ch. 2), so every
    window of N consecutive indices holds ``w_j * N + O(log N)`` samples of source ``j``, and it needs no state:
    any rank or worker evaluates any index without communication. (Megatron's greedy blending index is as exact
    but sequential, and for simple weights periodic: at 0.5/0.5 it alternates, so with one sample per rank and
    step every DP rank would read only one source.)
    """

    weights: tuple[float, ...]
    """Normalised (sum 1), one per source."""

    @cached_property
    def _upper(self) -> np.ndarray:
        """uint64 upper ends of the shares of sources 0..n-2 (the last source takes the rest)."""
        cum = np.cumsum(self.weights)[:-1]
        return np.array([min(int(c * 2.0 ** 64), 2 ** 64 - 1) for c in cum], dtype=np.uint64)

    def source_of(self, g: np.ndarray) -> np.ndarray:
        """Source index (int64) of each global sample index in ``g`` (non-negative ints)."""
        u = (np.asarray(g).astype(np.uint64) + np.uint64(1)) * np.uint64(_WEYL_STEP)  # wraps mod 2**64
        return np.searchsorted(self._upper, u, side="right")

    def counts(self, start: int, stop: int) -> np.ndarray:
        """Samples of each source among the global indices ``[start, stop)``, int64 ``[n_sources]``."""
        out = np.zeros(len(self.weights), dtype=np.int64)
        for lo in range(start, stop, _COUNT_CHUNK):
            g = np.arange(lo, min(stop, lo + _COUNT_CHUNK), dtype=np.uint64)
            out += np.bincount(self.source_of(g), minlength=len(self.weights))
        return out


@dataclass(frozen=True)
class MixturePlan:
    """The sources of a mixture, the blend, and how this rank's samples map to global indices (pure, picklable).

    Rank-local sample ``l`` (``batch * micro_batch_size + row``, counted from ``origin``) is global index
    ``origin + (l // L * dp_size + dp_rank) * L + l % L`` with ``L = global_batch_size / dp_size``: each optimizer
    step's global batch is ``[origin + s * GBS, origin + (s + 1) * GBS)``, DP rank ``r`` taking its ``r``-th
    contiguous share, so the sources of every step's global batch do not depend on the DP size.
    Logical worker ``w`` of the rank builds the rank's batches ``b`` with ``b % W == w``, drawing each source's
    samples in order from that source's slot ``dp_rank * W + w`` (:meth:`ShardPlan.slot_samples`, the single-source
    order of a micro-batch size of 1); a source moves to its next epoch when that worker's slot of it is used up.
    """

    sources: tuple[ShardPlan, ...]
    names: tuple[str, ...]
    blend: Blend
    dp_rank: int
    dp_size: int
    workers: int
    micro_batch_size: int
    rank_step_samples: int
    """L = train.global_batch_size / dp_size: this rank's samples per optimizer step."""

    @property
    def global_batch_size(self) -> int:
        return self.rank_step_samples * self.dp_size

    def global_index(self, local: np.ndarray, origin: int) -> np.ndarray:
        L = self.rank_step_samples
        return origin + (local // L * self.dp_size + self.dp_rank) * L + local % L

    def completed_steps_end(self, batches: int, origin: int) -> int:
        """Global index just past the optimizer steps this rank has fully drawn after ``batches`` batches."""
        return origin + batches * self.micro_batch_size // self.rank_step_samples * self.global_batch_size

    def _slot_positions(self, worker: int, first_batch: int, origin: int,
                        origin_samples: tuple[int, ...]) -> np.ndarray:
        """Samples of each source that logical worker ``worker`` has taken from its slots before its batch
        ``first_batch``: its even share of each source's global position at ``origin`` (exact at ``origin`` 0),
        plus what its batches since ``origin`` drew."""
        slots = self.dp_size * self.workers
        taken = np.array([pos // (p.per_slot * slots) * p.per_slot + pos % (p.per_slot * slots) // slots
                          for p, pos in zip(self.sources, origin_samples)], dtype=np.int64)
        B, W, rows = self.micro_batch_size, self.workers, np.arange(self.micro_batch_size)
        per_call = max(1, _COUNT_CHUNK // B)
        for lo in range(worker, first_batch, W * per_call):
            local = (np.arange(lo, min(first_batch, lo + W * per_call), W)[:, None] * B + rows).ravel()
            taken += np.bincount(self.blend.source_of(self.global_index(local, origin)), minlength=len(taken))
        return taken

    def endless_batches(self, first_batch: int, origin: int, origin_samples: tuple[int, ...],
                        worker: int) -> Iterator[Batch]:
        """Logical worker ``worker``'s batches ``b >= first_batch`` (``b % W == worker``), without end."""
        B, W = self.micro_batch_size, self.workers
        b = first_batch + (worker - first_batch) % W
        taken = self._slot_positions(worker, b, origin, origin_samples)
        streams = [self._source_samples(j, worker, int(n)) for j, n in enumerate(taken)]
        while True:
            sources_B = self.blend.source_of(self.global_index(np.arange(b * B, (b + 1) * B), origin))
            yield self.sources[0].collate([next(streams[j]) for j in sources_B])
            b += W

    def _source_samples(self, j: int, worker: int, start: int) -> Iterator[np.ndarray]:
        """Source ``j``'s samples in this worker's slot order from its ``start``-th on, epoch after epoch (the
        unshuffled valid split is read once: reading past its end is an error, never a silent repeat)."""
        plan = self.sources[j]
        epoch, skip = divmod(start, plan.per_slot)
        while True:
            if epoch > 0 and not plan.shuffled:
                raise DataError(f"validation reads more than the {plan.per_slot} samples of the valid split of "
                                f"'{plan.data_dir}' (mixture source '{self.names[j]}'): lower train.eval_batches (or "
                                "eval --batches) or hold out more data (preprocess --valid-fraction)")
            yield from plan.slot_samples(epoch, worker, skip)
            epoch, skip = epoch + 1, 0
