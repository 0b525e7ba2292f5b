"""Training/validation batches for the trainer, with an exactly resumable position.

    loader = build_loader(cfg, "train", dp_rank, dp_size)
    batch = next(loader)           # tokens_BS, labels_BS (int64, labels = next token), loss_mask_BS (float32)
    state = loader.state_dict()    # small dict of ints/strings: save it per DP rank in the checkpoint
    loader.load_state_dict(state)  # the next batch is the one an uninterrupted run would have produced

Sources (``data.source``):
- ``shards``: webdataset tar shards written by ``launcher/data/preprocess.py`` (its docstring defines the format),
  streamed with webdataset's tar reader.
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

Validation batches are read in order (a fresh loader repeats the same batches), in-process (no workers), from
``data.valid_path`` (its ``valid`` shards if it has any, else its training shards) or else from the ``valid``
shards of ``data.path`` (whole held-out documents, ``preprocess --valid-fraction``).
Corrupt, truncated or missing shards raise :class:`DataError` naming the shard and what to do.
"""
from __future__ import annotations

import hashlib
import random
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from launcher.config import Config, ConfigError
from launcher.data.preprocess import SAMPLE_EXT, DataError, read_index

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

    def worker_batches(self, epoch: int, worker: int, skip_batches: int) -> Iterator[Batch]:
        """The batches of logical worker ``worker`` in ``epoch``, after dropping the first ``skip_batches``."""
        slot = self.dp_rank * self.workers + worker
        raw = (item for piece in self.segments(epoch, slot) for item in self._read_piece(*piece))
        if self.shuffled and self.shuffle_buffer > 1:
            rng = random.Random(_seed(self.seed, SPLIT_CODES[self.split], epoch, slot, self.dp_size, self.workers))
            raw = _shuffle(raw, self.shuffle_buffer, rng)
        for _ in range(skip_batches * self.micro_batch_size):
            next(raw)
        for _ in range(self.per_slot // self.micro_batch_size - skip_batches):
            yield self._collate([self._decode(*next(raw)) for _ in range(self.micro_batch_size)])

    def _read_piece(self, shard: int, first: int, count: int) -> Iterator[tuple[str, str, bytes]]:
        """Stream ``count`` raw samples of one shard from sample ``first`` on (webdataset tar reader)."""
        from webdataset.tariterators import tarfile_samples

        name = self.shard_names[shard]
        path = Path(self.data_dir) / name
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

    def _collate(self, samples: list[np.ndarray]) -> Batch:
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


class _ShardStream(torch.utils.data.IterableDataset):
    """Endless batches of one DP rank from ``(epoch, batch_in_epoch)`` on; one instance per DataLoader worker."""

    def __init__(self, plan: ShardPlan, epoch: int, batch_in_epoch: int):
        self.plan, self.epoch, self.batch_in_epoch = plan, epoch, batch_in_epoch

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        W, physical = self.plan.workers, (info.id if info is not None else 0)
        # The DataLoader asks physical worker 0 first, but the next batch (j) belongs to logical worker j % W.
        j = self.batch_in_epoch
        worker = (j + physical) % W
        skip = max(0, (j - worker + W - 1) // W)  # batches b < j with b % W == worker
        epoch = self.epoch
        while True:
            yield from self.plan.worker_batches(epoch, worker, skip)
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
            if self._it is None:
                self._it = self._start()
            try:
                batch = next(self._it)
            except BaseException:  # a bad shard: stop the workers now, before the error reaches the trainer
                self.close()
                raise
            self.batch_in_epoch += 1
            if self.batch_in_epoch == self.plan.batches_per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.batches_seen += 1
        return batch

    def _start(self) -> Iterator[Batch]:
        stream = _ShardStream(self.plan, self.epoch, self.batch_in_epoch)
        if self.num_workers == 0:
            return iter(stream)
        return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                                timeout=_WORKER_TIMEOUT_S))

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
        source = "synthetic" if self.synthetic is not None else "shards"
        if state.get("source") != source:
            raise DataError(f"the checkpoint's data state is for data.source={state.get('source')}, this run uses "
                            f"data.source={source}; use the same source to resume")
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


def _shard_plan(cfg: Config, split: str, dp_rank: int, dp_size: int) -> tuple[ShardPlan, str]:
    data_dir, shard_split, index = _shard_dir_and_split(cfg, split)
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
                     shard_sizes=tuple(s["num_samples"] for s in shards), split=split, seed=cfg.train.seed,
                     dp_rank=dp_rank, dp_size=dp_size, workers=workers, micro_batch_size=cfg.train.micro_batch_size,
                     seq_length=index["seq_length"], shuffle_buffer=cfg.data.shuffle_buffer if split == "train" else 0,
                     eos_id=tok["eos_id"], token_vocab=tok["vocab_size"], dtype=index["dtype"])
    if plan.per_slot == 0:
        raise DataError(f"'{data_dir}' {shard_split} split has {sum(plan.shard_sizes)} samples, fewer than "
                        f"dp_size * workers * micro_batch_size = {dp_size}*{workers}*{plan.micro_batch_size}: "
                        "use fewer data.num_workers or more data")
    digest = hashlib.sha256("".join([tok["id"], shard_split] + [s["sha256"] for s in shards]).encode())
    return plan, digest.hexdigest()[:16]


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
    if cfg.data.path is None:
        raise ConfigError("data.path is required when data.source=shards (run `moetron preprocess` to make shards)")
    plan, fingerprint = _shard_plan(cfg, split, dp_rank, dp_size)
    return Loader(plan, None, cfg.data.num_workers if split == "train" else 0, fingerprint)
