"""Writing preprocessed samples: packing the token stream into samples and samples into webdataset shards, in the
format of :mod:`launcher.data.format`."""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np

from launcher.data.format import SAMPLE_EXT


class ShardSink:
    """Writes samples, in order, into ``{split}-NNNNNN.tar`` shards of ``samples_per_shard`` samples each.

    The tars are plain USTAR webdataset shards (member ``KEY.tokens.npy``), written with Python's tarfile and
    fixed metadata (mtime 0, no owner) so the same input gives byte-identical shards (``import webdataset``
    would pull in torch here)."""

    def __init__(self, out_dir: Path, split: str, samples_per_shard: int, dtype: np.dtype):
        self.out_dir, self.split, self.per_shard, self.dtype = out_dir, split, samples_per_shard, dtype
        self.shards: list[dict] = []
        self.num_samples = 0
        self._tar: Optional[tarfile.TarFile] = None
        self._current: Optional[dict] = None

    def write(self, sample: np.ndarray) -> None:
        if self._tar is None:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self._current = {"name": name, "num_samples": 0, "num_tokens": 0}
            self._tar = tarfile.open(self.out_dir / (name + ".tmp"), "w", format=tarfile.USTAR_FORMAT)
        payload = io.BytesIO()
        np.lib.format.write_array(payload, sample.astype(self.dtype), allow_pickle=False)
        info = tarfile.TarInfo(f"{self.num_samples:09d}.{SAMPLE_EXT}")
        info.size, info.mode = payload.tell(), 0o444
        payload.seek(0)
        self._tar.addfile(info, payload)
        self._current["num_samples"] += 1
        self._current["num_tokens"] += len(sample) - 1  # label positions
        self.num_samples += 1
        if self._current["num_samples"] == self.per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self._tar.close()
        tmp = self.out_dir / (self._current["name"] + ".tmp")
        data = tmp.read_bytes()
        self._current.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        tmp.replace(self.out_dir / self._current["name"])
        self.shards.append(self._current)
        self._tar, self._current = None, None

    def close(self) -> None:
        if self._tar is not None:
            self._finish_shard()


class Packer:
    """Cuts a document stream into samples of ``seq_length + 1`` tokens overlapping by one (see module doc)."""

    def __init__(self, seq_length: int, sink: ShardSink):
        self.seq_length, self.sink = seq_length, sink
        self.buffer = np.zeros(0, dtype=np.uint32)
        self.stream_tokens = 0
        self.documents = 0

    def add(self, doc_ids: np.ndarray) -> None:
        self.documents += 1
        self.stream_tokens += len(doc_ids)
        self.buffer = np.concatenate([self.buffer, doc_ids])
        S = self.seq_length
        n_full = (len(self.buffer) - 1) // S
        for i in range(n_full):
            self.sink.write(self.buffer[i * S: i * S + S + 1])
        self.buffer = self.buffer[n_full * S:]

    def finish(self) -> None:
        if len(self.buffer) >= 2:  # a last, shorter sample: padded and loss-masked by the loader
            self.sink.write(self.buffer)
        self.sink.close()


def is_valid_document(doc_index: int, valid_fraction: float) -> bool:
    """Whole documents, spread evenly: document i is held out when floor((i+1)f) > floor(i f)."""
    return int((doc_index + 1) * valid_fraction) > int(doc_index * valid_fraction)
