"""Reading ``data.source: shards`` (written by :mod:`launcher.data.writer`, format :mod:`launcher.data.format`):
which samples each rank and worker reads, streaming them from the tar shards (webdataset's tar reader), checking
and decoding them into batches.

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

Integrity: missing or wrong-size shards fail when the loader is built (:func:`check_shard_files`); each shard's
content is checked against the sha256 in ``index.json`` when a process first opens it (once per process: the
trainer, or each DataLoader worker), before any of its samples is used, so a corrupt shard of the right size never
trains silently. Every such fault raises :class:`DataError` (one line naming the shard and what to do), also when a
DataLoader worker found it.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from launcher.data.batch import SPLIT_CODES, Batch, derive_seed
from launcher.data.format import SAMPLE_EXT, DataError, file_sha256


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
        return np.random.default_rng(derive_seed(self.seed, SPLIT_CODES[self.split], epoch)).permutation(n)

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
            rng = random.Random(derive_seed(self.seed, SPLIT_CODES[self.split], epoch, slot, self.dp_size,
                                            self.workers))
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


def check_shard_files(data_dir: str, shards: list[dict]) -> None:
    """Missing or truncated shards fail here, before training starts (a cheap size check, no hashing)."""
    for shard in shards:
        path = Path(data_dir) / shard["name"]
        if not path.is_file():
            raise DataError(f"shard '{path}' listed in index.json is missing; {_FIX}")
        if path.stat().st_size != shard["bytes"]:
            raise DataError(f"shard '{path}' has {path.stat().st_size} bytes, index.json says {shard['bytes']}: "
                            f"truncated or modified; {_FIX}")
