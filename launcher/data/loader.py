"""Training/validation batches for the trainer, with an exactly resumable position.

    loader = build_loader(cfg, "train", dp_rank, dp_size)
    batch = next(loader)           # tokens_BS, labels_BS (int64, labels = next token), loss_mask_BS (float32)
    state = loader.state_dict()    # small dict of ints/strings: save it per DP rank in the checkpoint
    loader.load_state_dict(state)  # the next batch is the one an uninterrupted run would have produced

Sources (``data.source``):
- ``shards``: webdataset tar shards written by ``launcher/data/preprocess.py`` (its docstring defines the format),
  streamed with webdataset's tar reader.
- ``shards`` with ``data.paths``: a weighted mixture of such directories (:class:`MixtureLoader`, below).
- ``synthetic``: a fixed random Markov chain over ``model.vocab_size`` (each token has 4 possible successors with
  probabilities ``MARKOV_PROBS``), so a tiny model's loss falls towards the chain's entropy
  (:func:`markov_entropy_nats`). Batch ``b`` of a rank is a pure function of ``(seed, split, dp_rank, b)``,
  generated in the calling process (``data.num_workers`` is not used).

Sample order for shards (all a pure function of seed, epoch, dp_rank, dp_size and num_workers):
1. Epoch ``e`` permutes the split's shards with an RNG keyed on ``(seed, split, e)`` (identity for ``valid``),
   giving one global sample order, the same on every rank.
2. The order is cut into ``dp_size * W`` contiguous, equal ranges of ``per_slot`` samples (``W`` =
   ``max(1, num_workers)``); range ``slot = dp_rank * W + w`` is read by worker ``w`` of that rank, so ranks and
   workers see disjoint samples. ``per_slot`` is a multiple of ``micro_batch_size``; the at most
   ``dp_size * W * micro_batch_size - 1`` samples left over are skipped this epoch (another set each epoch).
   Every rank gets the same number of batches per epoch, so DP ranks never wait on each other at epoch ends.
3. Each worker streams only the shards overlapping its range and mixes them through a shuffle buffer of
   ``data.shuffle_buffer`` samples (RNG keyed on ``(seed, split, e, slot, dp_size, W)``; none for ``valid``).
4. Worker ``w`` emits whole micro-batches; the rank's batch ``j`` of an epoch comes from worker ``j % W``
   (PyTorch's DataLoader takes workers round-robin).

Resume: the state is ``(epoch, batch_in_epoch)``. With the same seed, dp_size, num_workers and micro batch size
the next batch is exactly the uninterrupted run's: each worker replays its range from the epoch start through
the same shuffle buffer and drops what was already consumed (reading tar bytes, decoding nothing), so resuming
costs at most one epoch-slice of reading per worker. With a different layout the global position in the epoch
(``batch_in_epoch * micro_batch_size * dp_size`` samples) is kept and re-derived for the new layout: from the
next epoch on the order is exact for the new layout, but the rest of the interrupted epoch may repeat or skip up
to one epoch's worth of samples. A state from different data (another tokenizer or shard set) starts the new data
from its beginning, with a warning.

Mixtures (``data.paths: [{path, weight}, ...]``, Megatron's ``--data-path 0.7 a 0.3 b``): global sample ``g`` of the
run (step ``s`` holds ``[s * GBS, (s + 1) * GBS)``, DP rank ``r`` its ``r``-th contiguous share) comes from the
source :class:`Blend` assigns to ``g``: a fixed low-discrepancy rule of the normalised weights, so the sources of
every step do not depend on the layout and every N consecutive samples hold ``w * N + O(log N)`` of each source
(10k samples: within 3 samples of ``w * 10k``). Each source keeps its own position: it is read in the single-source
order above (micro-batch size 1), worker ``w`` of rank ``r`` drawing from its slot ``r * W + w`` of the source and
moving that slot to the source's next epoch when it is used up. The state is the rank's batch count (every
position is a function of it), so resume is exact; at another layout the mixture continues at the global index
of the last completed step and each source from its global count there (its current epoch approximately); a
changed mixture (sources or weights) starts from its beginning, with a warning. Each source has its own shuffle
seed (derived from ``train.seed`` and its position); all sources must share one tokenizer. Tokens drawn per
source (:meth:`MixtureLoader.source_tokens`, all DP ranks, cumulative) go to TensorBoard as
``train_data/tokens/<source>``.

Validation batches are read in order (a fresh loader repeats the same batches), in-process (no workers), from
``data.valid_path`` (its ``valid`` shards if it has any, else its training shards) or else from the ``valid``
shards of ``data.path`` (whole held-out documents, ``preprocess --valid-fraction``), or for a mixture from the
``valid`` shards of every source, mixed by the same rule (each source needs them; reading past one is an error).

Integrity: missing or wrong-size shards fail when the loader is built; each shard's content is checked against
the sha256 in ``index.json`` when a process first opens it (once per process: the trainer, or each DataLoader
worker), before any of its samples is used, so a corrupt shard of the right size never trains silently. Every
such fault raises :class:`DataError` (one line naming the shard and what to do), also when a DataLoader worker
found it.
"""
from __future__ import annotations

import hashlib
import itertools
import random
import warnings
from dataclasses import dataclass, replace
from functools import cached_property, partial
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from launcher.config import Config, ConfigError
from launcher.data.preprocess import SAMPLE_EXT, DataError, file_sha256, read_index

SPLIT_CODES = {"train": 0, "valid": 1}
MARKOV_PROBS = (0.55, 0.25, 0.12, 0.08)
_WORKER_TIMEOUT_S = 600  # a DataLoader worker silent this long is an error, never a silent hang
Batch = dict[str, torch.Tensor]


def _seed(*key: int) -> int:
    """One 64-bit seed from a tuple of non-negative ints (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0])


# ---------------------------------------------------------------- synthetic source

def markov_entropy_nats() -> float:
    """Per-token entropy of the synthetic chain: the lowest loss a model can reach on it."""
    p = np.asarray(MARKOV_PROBS)
    return float(-(p * np.log(p)).sum())


class SyntheticSource:
    """Deterministic Markov-chain batches; the same chain on every rank, a different stream per rank/split."""

    def __init__(self, vocab_size: int, seq_length: int, micro_batch_size: int, seed: int, split: str,
                 dp_rank: int):
        chain_rng = np.random.default_rng(_seed(seed, 0x3A7C))
        self.successors_VK = chain_rng.integers(0, vocab_size, size=(vocab_size, len(MARKOV_PROBS)))
        self.cum_probs_K = np.cumsum(MARKOV_PROBS)
        self.shape = (micro_batch_size, seq_length + 1)
        self.vocab_size = vocab_size
        self.key = (seed, SPLIT_CODES[split], dp_rank)

    def batch(self, index: int) -> Batch:
        rng = np.random.default_rng(_seed(*self.key, index))
        B, S1 = self.shape
        choice_BS = np.minimum(np.searchsorted(self.cum_probs_K, rng.random((B, S1 - 1))), len(MARKOV_PROBS) - 1)
        seq_BS = np.empty((B, S1), dtype=np.int64)
        seq_BS[:, 0] = rng.integers(0, self.vocab_size, size=B)
        for t in range(1, S1):
            seq_BS[:, t] = self.successors_VK[seq_BS[:, t - 1], choice_BS[:, t - 1]]
        seq = torch.from_numpy(seq_BS)
        return {"tokens": seq[:, :-1].contiguous(), "labels": seq[:, 1:].contiguous(),
                "loss_mask": torch.ones(B, S1 - 1, dtype=torch.float32)}


# ---------------------------------------------------------------- shard plan (pure, picklable)

@dataclass(frozen=True)
class ShardPlan:
    """Which samples each (epoch, rank, worker) reads, and how they are decoded into batches."""

    data_dir: str
    shard_names: tuple[str, ...]
    shard_sizes: tuple[int, ...]
    shard_sha256: tuple[str, ...]
    split: str  # the split asked for: "train" is shuffled, "valid" read in order
    seed: int
    dp_rank: int
    dp_size: int
    workers: int  # W = max(1, num_workers)
    micro_batch_size: int
    seq_length: int
    shuffle_buffer: int
    eos_id: int
    token_vocab: int
    dtype: str

    @cached_property
    def per_slot(self) -> int:
        return sum(self.shard_sizes) // (self.dp_size * self.workers * self.micro_batch_size) * self.micro_batch_size

    @cached_property
    def batches_per_epoch(self) -> int:
        """Micro-batches one DP rank gets per epoch (all workers together)."""
        return self.workers * self.per_slot // self.micro_batch_size

    @property
    def shuffled(self) -> bool:
        return self.split == "train"

    def shard_order(self, epoch: int) -> np.ndarray:
        n = len(self.shard_names)
        if not self.shuffled:
            return np.arange(n)
        return np.random.default_rng(_seed(self.seed, SPLIT_CODES[self.split], epoch)).permutation(n)

    def segments(self, epoch: int, slot: int) -> list[tuple[int, int, int]]:
        """(shard index, first sample in shard, count) pieces of the slot's range of the epoch order."""
        lo, hi = slot * self.per_slot, (slot + 1) * self.per_slot
        pieces, start = [], 0
        for shard in self.shard_order(epoch):
            size = self.shard_sizes[shard]
            a, b = max(lo, start), min(hi, start + size)
            if a < b:
                pieces.append((int(shard), a - start, b - a))
            start += size
        return pieces

    def slot_samples(self, epoch: int, worker: int, skip: int) -> Iterator[np.ndarray]:
        """The decoded samples of logical worker ``worker``'s range of ``epoch`` in reading order (through the
        shuffle buffer), after dropping the first ``skip`` (read, never decoded)."""
        slot = self.dp_rank * self.workers + worker
        raw = (item for piece in self.segments(epoch, slot) for item in self._read_piece(*piece))
        if self.shuffled and self.shuffle_buffer > 1:
            rng = random.Random(_seed(self.seed, SPLIT_CODES[self.split], epoch, slot, self.dp_size, self.workers))
            raw = _shuffle(raw, self.shuffle_buffer, rng)
        return (self._decode(*item) for item in itertools.islice(raw, skip, None))

    def worker_batches(self, epoch: int, worker: int, skip_batches: int) -> Iterator[Batch]:
        """The batches of logical worker ``worker`` in ``epoch``, after dropping the first ``skip_batches``."""
        samples = self.slot_samples(epoch, worker, skip_batches * self.micro_batch_size)
        for _ in range(self.per_slot // self.micro_batch_size - skip_batches):
            yield self.collate([next(samples) for _ in range(self.micro_batch_size)])

    def endless_batches(self, epoch: int, batch_in_epoch: int, worker: int) -> Iterator[Batch]:
        """Logical worker ``worker``'s batches from the rank's batch ``batch_in_epoch`` of ``epoch`` on, epoch
        after epoch."""
        W, j = self.workers, batch_in_epoch
        skip = max(0, (j - worker + W - 1) // W)  # batches b < j with b % W == worker
        while True:
            yield from self.worker_batches(epoch, worker, skip)
            epoch, skip = epoch + 1, 0

    def _read_piece(self, shard: int, first: int, count: int) -> Iterator[tuple[str, str, bytes]]:
        """Stream ``count`` raw samples of one shard from sample ``first`` on (webdataset tar reader)."""
        from webdataset.tariterators import tarfile_samples

        name = self.shard_names[shard]
        path = Path(self.data_dir) / name
        _verify_once(path, self.shard_sha256[shard])
        base = sum(self.shard_sizes[:shard])  # global index of the shard's first sample
        seen = got = 0
        try:
            for i, sample in enumerate(tarfile_samples([{"url": str(path)}])):
                seen = i + 1
                if i < first:
                    continue
                if got == count:
                    break
                key = f"{base + i:09d}"
                if sample["__key__"] != key or SAMPLE_EXT not in sample:
                    raise DataError(f"shard '{path}' is corrupt: sample {i} is '{sample['__key__']}' with "
                                    f"{sorted(k for k in sample if not k.startswith('__'))}, expected '{key}' with "
                                    f"{SAMPLE_EXT}; {_FIX}")
                got += 1
                yield name, key, sample[SAMPLE_EXT]
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - tarfile/gopen raise many types; all mean an unreadable shard
            raise DataError(f"shard '{path}' is unreadable after {seen} samples "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {_FIX}") from None
        if got < count:
            raise DataError(f"shard '{path}' ended after {seen} samples but index.json lists "
                            f"{self.shard_sizes[shard]}: it is truncated or corrupt (tarfile stops quietly at a "
                            f"damaged header); {_FIX}")

    def _decode(self, name: str, key: str, raw: bytes) -> np.ndarray:
        """Parse the .npy bytes preprocess wrote (format 1.0, 1-D, known dtype) without numpy's slow generic
        header parser (ast.literal_eval), and reject anything that does not match exactly."""
        dtype = np.dtype(self.dtype)
        prefix = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': (".encode()
        header_len = int.from_bytes(raw[8:10], "little") if len(raw) >= 10 else -1
        header = raw[10:10 + header_len]
        try:
            n = int(header[len(prefix):header.index(b",", len(prefix))]) if header.startswith(prefix) else -1
        except ValueError:
            n = -1
        if raw[:8] != b"\x93NUMPY\x01\x00" or n < 2 or n > self.seq_length + 1 or \
                len(raw) != 10 + header_len + n * dtype.itemsize:
            raise DataError(f"shard '{name}' sample {key} is corrupt (not a 1-D {dtype.name} .npy of "
                            f"2..{self.seq_length + 1} tokens); {_FIX}")
        sample = np.frombuffer(raw, dtype=dtype, offset=10 + header_len)
        if int(sample.max()) >= self.token_vocab:
            raise DataError(f"shard '{name}' sample {key} is corrupt (token id {int(sample.max())} >= tokenizer "
                            f"vocab {self.token_vocab}); {_FIX}")
        return sample

    def collate(self, samples: list[np.ndarray]) -> Batch:
        """Pad the (rare) short last sample of a split with EOS and mask the padding out of the loss."""
        B, S = len(samples), self.seq_length
        tokens_BS = np.full((B, S), self.eos_id, dtype=np.int64)
        labels_BS = np.full((B, S), self.eos_id, dtype=np.int64)
        mask_BS = np.zeros((B, S), dtype=np.float32)
        for row, sample in enumerate(samples):
            n = len(sample) - 1
            tokens_BS[row, :n], labels_BS[row, :n], mask_BS[row, :n] = sample[:-1], sample[1:], 1.0
        return {"tokens": torch.from_numpy(tokens_BS), "labels": torch.from_numpy(labels_BS),
                "loss_mask": torch.from_numpy(mask_BS)}


_FIX = "re-run `moetron preprocess` or restore the file (check all shards with `moetron preprocess --verify DIR`)"
_VERIFIED: set[tuple[str, str]] = set()  # (path, sha256) of the shards this process has hashed


def _verify_once(path: Path, sha256: str) -> None:
    """Hash a shard the first time this process opens it; a mismatch is a DataError naming the shard."""
    if (str(path), sha256) in _VERIFIED:
        return
    try:
        actual = file_sha256(path)
    except OSError as e:
        raise DataError(f"shard '{path}' cannot be read ({e.strerror}); {_FIX}") from None
    if actual != sha256:
        raise DataError(f"shard '{path}' does not match its sha256 in index.json (corrupt or modified since "
                        f"preprocess); {_FIX}")
    _VERIFIED.add((str(path), sha256))


def _shuffle(items: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """Streaming shuffle: fill a buffer, then emit a random slot and refill it; drain in random order."""
    buf = []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        j = rng.randrange(buffer_size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


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


# ---------------------------------------------------------------- mixtures (data.paths)

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


# ---------------------------------------------------------------- the loader the trainer holds

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


# ---------------------------------------------------------------- construction from the config

def _shard_dir_and_split(cfg: Config, split: str) -> tuple[str, str, dict]:
    """Directory, split name inside it and its index for the requested split (see the module docstring)."""
    if split == "train" or cfg.data.valid_path is None:
        index = read_index(cfg.data.path)
        if not index["splits"][split]["shards"]:
            hint = ("re-run preprocess with --valid-fraction > 0 or set data.valid_path" if split == "valid"
                    else "the corpus produced no training samples")
            raise DataError(f"'{cfg.data.path}' has no {split} shards: {hint}")
        return cfg.data.path, split, index
    index = read_index(cfg.data.valid_path)
    has_valid = bool(index["splits"]["valid"]["shards"])
    return cfg.data.valid_path, "valid" if has_valid else "train", index


def _check_files(data_dir: str, shards: list[dict]) -> None:
    """Missing or truncated shards fail here, before training starts (a cheap size check, no hashing)."""
    for shard in shards:
        path = Path(data_dir) / shard["name"]
        if not path.is_file():
            raise DataError(f"shard '{path}' listed in index.json is missing; {_FIX}")
        if path.stat().st_size != shard["bytes"]:
            raise DataError(f"shard '{path}' has {path.stat().st_size} bytes, index.json says {shard['bytes']}: "
                            f"truncated or modified; {_FIX}")


def _shard_plan(cfg: Config, data_dir: str, shard_split: str, index: dict, split: str, dp_rank: int, dp_size: int,
                micro_batch_size: int) -> tuple[ShardPlan, str]:
    """The plan for one directory's ``shard_split`` and its fingerprint (tokenizer, split and shard hashes)."""
    tok = index["tokenizer"]
    if cfg.model.vocab_size < tok["vocab_size"]:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                          f"({tok['vocab_size']}) of '{data_dir}': set model.vocab_size >= {tok['vocab_size']}")
    if cfg.model.seq_length != index["seq_length"]:
        raise ConfigError(f"model.seq_length ({cfg.model.seq_length}) differs from the shards' seq_length "
                          f"({index['seq_length']}) in '{data_dir}': set model.seq_length={index['seq_length']} or "
                          f"re-run preprocess with --seq-length {cfg.model.seq_length}")
    shards = index["splits"][shard_split]["shards"]
    _check_files(data_dir, shards)
    workers = max(1, cfg.data.num_workers) if split == "train" else 1
    plan = ShardPlan(data_dir=str(data_dir), shard_names=tuple(s["name"] for s in shards),
                     shard_sizes=tuple(s["num_samples"] for s in shards),
                     shard_sha256=tuple(s["sha256"] for s in shards), split=split, seed=cfg.train.seed,
                     dp_rank=dp_rank, dp_size=dp_size, workers=workers, micro_batch_size=micro_batch_size,
                     seq_length=index["seq_length"], shuffle_buffer=cfg.data.shuffle_buffer if split == "train" else 0,
                     eos_id=tok["eos_id"], token_vocab=tok["vocab_size"], dtype=index["dtype"])
    if plan.per_slot == 0:
        raise DataError(f"'{data_dir}' {shard_split} split has {sum(plan.shard_sizes)} samples, fewer than "
                        f"dp_size * workers * micro_batch_size = {dp_size}*{workers}*{micro_batch_size}: "
                        "use fewer data.num_workers or more data")
    digest = hashlib.sha256("".join([tok["id"], shard_split] + [s["sha256"] for s in shards]).encode())
    return plan, digest.hexdigest()[:16]


def source_names(paths: list[str]) -> tuple[str, ...]:
    """Each mixture source's name in metrics: its directory's name, prefixed by its position where two share
    one."""
    names = [Path(p).name or str(p) for p in paths]
    return tuple(f"{i}_{n}" if names.count(n) > 1 else n for i, n in enumerate(names))


def _mixture_loader(cfg: Config, split: str, dp_rank: int, dp_size: int) -> MixtureLoader:
    """The mixture of ``data.paths`` for ``split``: their train splits, or (validation without data.valid_path)
    their valid splits, every source needing one, with the same weights."""
    sources, tokenizer = [], None
    rank_step_samples = cfg.train.global_batch_size // dp_size if split == "train" else cfg.train.micro_batch_size
    for i, entry in enumerate(cfg.data.paths):
        index = read_index(entry.path)
        if tokenizer is None:
            tokenizer = index["tokenizer"]["id"]
        elif index["tokenizer"]["id"] != tokenizer:
            raise DataError(f"data.paths[{i}].path '{entry.path}' was tokenized with another tokenizer (id "
                            f"{index['tokenizer']['id'][:12]}) than data.paths[0].path (id {tokenizer[:12]}): a "
                            "mixture needs one vocabulary; preprocess every source with the same --tokenizer")
        if not index["splits"][split]["shards"]:
            hint = ("re-run preprocess with --valid-fraction > 0 or set data.valid_path" if split == "valid"
                    else "the corpus produced no training samples")
            raise DataError(f"data.paths[{i}].path '{entry.path}' has no {split} shards: {hint}")
        plan, fingerprint = _shard_plan(cfg, entry.path, split, index, split, dp_rank, dp_size, 1)
        sources.append((replace(plan, seed=_seed(cfg.train.seed, i)), fingerprint))  # an own order per source
    total = sum(entry.weight for entry in cfg.data.paths)
    plans, fingerprints = zip(*sources)
    weights = tuple(entry.weight / total for entry in cfg.data.paths)
    mixture = MixturePlan(sources=plans, names=source_names([e.path for e in cfg.data.paths]), blend=Blend(weights),
                          dp_rank=dp_rank, dp_size=dp_size, workers=plans[0].workers,
                          micro_batch_size=cfg.train.micro_batch_size, rank_step_samples=rank_step_samples)
    digest = hashlib.sha256(repr((fingerprints, weights)).encode()).hexdigest()[:16]
    return MixtureLoader(mixture, cfg.data.num_workers if split == "train" else 0, digest)


def build_loader(cfg: Config, split: str, dp_rank: int, dp_size: int) -> Loader:
    """The micro-batch iterator of one DP rank for ``split`` ("train" or "valid")."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
    if cfg.data.source == "synthetic":
        synthetic = SyntheticSource(cfg.model.vocab_size, cfg.model.seq_length, cfg.train.micro_batch_size,
                                    cfg.train.seed, split, dp_rank)
        return Loader(None, synthetic, 0, f"synthetic-v{cfg.model.vocab_size}-s{cfg.train.seed}")
    if cfg.data.paths and (split == "train" or cfg.data.valid_path is None):
        return _mixture_loader(cfg, split, dp_rank, dp_size)
    data_dir, shard_split, index = _shard_dir_and_split(cfg, split)
    plan, fingerprint = _shard_plan(cfg, data_dir, shard_split, index, split, dp_rank, dp_size,
                                    cfg.train.micro_batch_size)
    return Loader(plan, None, cfg.data.num_workers if split == "train" else 0, fingerprint)
