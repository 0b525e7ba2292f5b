"""The micro-batch iterators the trainer holds (:class:`Loader`, :class:`MixtureLoader`), their DataLoader worker
processes and their exactly resumable position; built from the config by :func:`launcher.data.build.build_loader`.

Resume: the state is ``(epoch, batch_in_epoch)``. With the same seed, dp_size, num_workers and micro batch size
the next batch is exactly the uninterrupted run's: each worker replays its range from the epoch start through
the same shuffle buffer and drops what was already consumed (reading tar bytes, decoding nothing), so resuming
costs at most one epoch-slice of reading per worker. With a different layout the global position in the epoch
(``batch_in_epoch * micro_batch_size * dp_size`` samples) is kept and re-derived for the new layout: from the
next epoch on the order is exact for the new layout, but the rest of the interrupted epoch may repeat or skip up
to one epoch's worth of samples. A state from different data (another tokenizer or shard set) starts the new data
from its beginning, with a warning.

A mixture's state is its rank's batch count (:class:`MixtureLoader`; see :mod:`launcher.data.mixture`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from launcher.data.batch import Batch
from launcher.data.format import DataError
from launcher.data.mixture import MixturePlan
from launcher.data.reader import ShardPlan
from launcher.data.synthetic import SyntheticSource

_WORKER_TIMEOUT_S = 600  # a DataLoader worker silent this long is an error, never a silent hang


@dataclass(frozen=True)
class _StreamError:
    """A DataError met while streaming, passed on as an item: a worker's exception would reach the trainer wrapped
    in the worker's traceback text; this reaches it as the original one line."""

    message: str


class _ShardStream(torch.utils.data.IterableDataset):
    """Endless batches of one DP rank from its batch ``first_batch`` on; one instance per DataLoader worker.
    ``batches(worker)`` is logical worker ``worker``'s endless stream (its batches b >= first_batch with
    b % workers == worker). A :class:`DataError` ends the stream with one :class:`_StreamError` item."""

    def __init__(self, batches: Callable[[int], Iterator[Batch]], first_batch: int, workers: int):
        self.batches, self.first_batch, self.workers = batches, first_batch, workers

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        # The DataLoader asks physical worker 0 first, but the next batch (j) belongs to logical worker j % W.
        try:
            yield from self.batches((self.first_batch + physical) % self.workers)
        except DataError as e:
            yield _StreamError(str(e))


class Loader:
    """Iterator over micro-batches with ``state_dict``/``load_state_dict`` (see the module docstring)."""

    def __init__(self, plan: Optional[ShardPlan], synthetic: Optional[SyntheticSource], num_workers: int,
                 fingerprint: str):
        self.plan, self.synthetic, self.num_workers, self.fingerprint = plan, synthetic, num_workers, fingerprint
        self.epoch, self.batch_in_epoch, self.batches_seen = 0, 0, 0
        self._it: Optional[Iterator[Batch]] = None

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> Batch:
        if self.synthetic is not None:
            batch = self.synthetic.batch(self.batches_seen)
        else:
            batch = self._next_streamed()
            self.batch_in_epoch += 1
            if self.batch_in_epoch == self.plan.batches_per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.batches_seen += 1
        return batch

    def _next_streamed(self) -> Batch:
        if self._it is None:
            stream = self._stream()
            self._it = iter(stream) if self.num_workers == 0 else iter(torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=self.num_workers, timeout=_WORKER_TIMEOUT_S))
        try:
            batch = next(self._it)
            if isinstance(batch, _StreamError):
                raise DataError(batch.message)
        except BaseException:  # a bad shard: stop the workers now, before the error reaches the trainer
            self.close()
            raise
        return batch

    def _stream(self) -> _ShardStream:
        return _ShardStream(partial(self.plan.endless_batches, self.epoch, self.batch_in_epoch), self.batch_in_epoch,
                            self.plan.workers)

    def source_tokens(self) -> dict[str, int]:
        """Tokens drawn per mixture source so far ({} for a single source; see :class:`MixtureLoader`)."""
        return {}

    def close(self) -> None:
        """Stop the worker processes now (garbage collection would too, but only once every reference to the
        iterator is gone, and an exception traceback can keep one alive for a long time)."""
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)  # DataLoader's own clean shutdown (private in torch)
        if shutdown is not None:
            shutdown()

    def state_dict(self) -> dict:
        state = {"source": "synthetic" if self.synthetic is not None else "shards", "fingerprint": self.fingerprint,
                 "batches_seen": self.batches_seen, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}
        if self.plan is not None:
            p = self.plan
            state.update(seed=p.seed, dp_size=p.dp_size, workers=p.workers, micro_batch_size=p.micro_batch_size,
                         epoch_samples_consumed=self.batch_in_epoch * p.micro_batch_size * p.dp_size)
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("batches_seen") == 0:  # nothing consumed (e.g. a checkpoint converted from Hugging Face)
            return
        if not _continues(state, "synthetic" if self.synthetic is not None else "shards"):
            return
        self.close()
        if state["fingerprint"] != self.fingerprint:
            warnings.warn(f"data changed since the checkpoint (fingerprint {state['fingerprint']} -> "
                          f"{self.fingerprint}): reading the new data from its beginning")
            self.epoch, self.batch_in_epoch, self.batches_seen = 0, 0, 0
            return
        self.batches_seen, self.epoch, self.batch_in_epoch = state["batches_seen"], state["epoch"], \
            state["batch_in_epoch"]
        if self.plan is not None and self._layout_key(state) != self._layout_key(self.state_dict()):
            p = self.plan
            self.batch_in_epoch = state["epoch_samples_consumed"] // (p.micro_batch_size * p.dp_size)
            if self.batch_in_epoch >= p.batches_per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            warnings.warn("data layout (seed, dp_size, num_workers or micro batch size) changed since the "
                          "checkpoint: the position in the current epoch is approximate, exact from the next epoch")

    @staticmethod
    def _layout_key(state: dict) -> tuple:
        return tuple(state[k] for k in ("seed", "dp_size", "workers", "micro_batch_size"))


def _continues(state: dict, source: str) -> bool:
    """Whether a checkpoint's data state is of this run's kind of source. Between one directory and a mixture the run
    goes on with the new data from its beginning, with a warning (as for changed data); synthetic <-> shards is an
    error."""
    what = {"synthetic": "data.source=synthetic", "shards": "data.path", "mixture": "data.paths (a mixture)"}
    saved = state.get("source")
    if saved == source:
        return True
    if {saved, source} <= {"shards", "mixture"}:
        warnings.warn(f"data changed since the checkpoint ({what[saved]} -> {what[source]}): reading the new data "
                      "from its beginning")
        return False
    raise DataError(f"the checkpoint's data state is for {what.get(saved, saved)}, this run reads {what[source]}; "
                    "use the same data settings to resume")


class MixtureLoader(Loader):
    """Micro-batches of a weighted mixture of shard directories (``data.paths``, see the module docstring), with
    ``state_dict``/``load_state_dict`` and the tokens drawn per source."""

    def __init__(self, mixture: MixturePlan, num_workers: int, fingerprint: str):
        super().__init__(None, None, num_workers, fingerprint)
        self.mixture = mixture
        self.batches = 0
        """Batches of this rank since ``origin``."""
        self.origin, self.origin_samples = 0, (0,) * len(mixture.sources)
        """Global sample index where the current layout began, and each source's global position there."""
        self._drawn = (0, np.zeros(len(mixture.sources), dtype=np.int64))
        """(global index g, samples of each source among [0, g)): :meth:`source_tokens` counts on from here."""

    def __next__(self) -> Batch:
        batch = self._next_streamed()
        self.batches += 1
        self.batches_seen += 1
        return batch

    def _stream(self) -> _ShardStream:
        m = self.mixture
        return _ShardStream(partial(m.endless_batches, self.batches, self.origin, self.origin_samples), self.batches,
                            m.workers)

    def _drawn_now(self) -> tuple[int, np.ndarray]:
        """Samples of each source drawn by all DP ranks in the optimizer steps this rank has completed."""
        stop = self.mixture.completed_steps_end(self.batches, self.origin)
        start, counts = self._drawn
        if stop > start:
            self._drawn = (stop, counts + self.mixture.blend.counts(start, stop))
        return self._drawn

    def source_tokens(self) -> dict[str, int]:
        """Tokens drawn from each source (by name) by all DP ranks together in the optimizer steps completed so
        far, counted as samples x seq_length like the tokens per step; the same on every rank without
        communication (the blend is a pure function of the global index), cumulative over resumes."""
        seq = self.mixture.sources[0].seq_length
        return {name: int(n) * seq for name, n in zip(self.mixture.names, self._drawn_now()[1])}

    def state_dict(self) -> dict:
        m = self.mixture
        drawn_end, drawn = self._drawn_now()
        return {"source": "mixture", "fingerprint": self.fingerprint, "batches_seen": self.batches_seen,
                "batches": self.batches, "origin": self.origin, "origin_samples": list(self.origin_samples),
                "global_samples": drawn_end, "samples_by_source": [int(n) for n in drawn],
                "seed": m.sources[0].seed, "dp_size": m.dp_size, "workers": m.workers,
                "micro_batch_size": m.micro_batch_size, "global_batch_size": m.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Same layout (seed, dp_size, workers, micro and global batch size): exact. Another layout: the mixture
        goes on from the global sample index of the last completed step (the sources of every later global index
        are exactly the uninterrupted run's); each source's position is its global count there, spread evenly
        over the new layout's slots (approximate within the sources' current epochs, exact from their next)."""
        if state.get("batches_seen") == 0:
            return
        if not _continues(state, "mixture"):
            return
        self.close()
        if state["fingerprint"] != self.fingerprint:
            warnings.warn(f"data mixture changed since the checkpoint (sources or weights; fingerprint "
                          f"{state['fingerprint']} -> {self.fingerprint}): reading the new mixture from its beginning")
            return
        self.batches_seen = state["batches_seen"]
        self._drawn = (state["global_samples"], np.asarray(state["samples_by_source"], dtype=np.int64))
        m = self.mixture
        if self._layout_key(state) == (m.sources[0].seed, m.dp_size, m.workers, m.micro_batch_size,
                                       m.global_batch_size):
            self.batches, self.origin = state["batches"], state["origin"]
            self.origin_samples = tuple(state["origin_samples"])
        else:
            self.batches, self.origin = 0, state["global_samples"]
            self.origin_samples = tuple(state["samples_by_source"])
            warnings.warn("data layout (seed, dp_size, num_workers, micro or global batch size) changed since the "
                          "checkpoint: the mixture goes on exactly, each source's position in its current epoch is "
                          "approximate, exact from its next epoch")

    @staticmethod
    def _layout_key(state: dict) -> tuple:
        return tuple(state[k] for k in ("seed", "dp_size", "workers", "micro_batch_size", "global_batch_size"))
