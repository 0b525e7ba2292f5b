"""Writing a checkpoint's bytes, inline or in the background (``checkpoint.async_save``).

megatron-core's ``dist_checkpointing.save(..., async_sharded_save=True)`` splits a save into three phases: planning
(collective; done inside that call), writing this rank's ``__<rank>_<i>.distcp`` files (local: no collective), and
finalizing (collective: the ranks' write results are gathered, rank 0 writes ``.metadata`` and ``metadata.json``;
a failed write raises on every rank). :class:`WriteJob` runs the middle phase, inline or on a thread, records the
size and CRC-32 of each file it wrote (``checkpoint_manifest.py``) and runs the last phase when asked;
``checkpoint.save`` wraps it with the manifest and the commit.

A background write reads a snapshot: before :class:`WriteJob` returns, every tensor the plan writes is copied to
host memory (the training stall of an async save; the copy holds this rank's share of the weights and optimizer
state until the write ends), so training may update the weights meanwhile. Byte entries (RNG, data position,
common state) are serialized during planning already. torchrun's workers must not exit while a thread writes:
``checkpoint.Saving.finish`` (every rank) waits for it.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from launcher.train import checkpoint_manifest as manifest


def _snapshot(buckets: list) -> list:
    """``buckets`` (megatron-core's ``(path, storage key, (byte items, tensor items))``) with every tensor copied to
    host memory."""
    return [(path, key, (byte_items, [(item, t.detach().to("cpu", copy=True)) for item, t in tensor_items]))
            for path, key, (byte_items, tensor_items) in buckets]


class WriteJob:
    """This rank's part of one save: write its files (now, or on a thread with ``background``), then
    :meth:`finalize` (collective). ``request`` is megatron-core's ``AsyncRequest`` for ``directory``."""

    def __init__(self, request: Any, directory: Path, background: bool):
        self.directory = directory
        self._fn, self._kwargs, self._finalize = request.async_fn, request.async_fn_kwargs, request.finalize_fns
        args = list(request.async_fn_args)  # (rank, write buckets, results queue), or () when nothing to write
        self.files = [Path(bucket[0]).name for bucket in args[1]] if args else []
        if args:
            args[1] = _snapshot(args[1]) if background else \
                request.preload_fn() if request.preload_fn is not None else args[1]
        self._args = args
        self.records: dict[str, dict] = {}
        """Size and CRC-32 of each file this rank wrote (filled once the write ends)."""
        self.error: Optional[BaseException] = None
        self._done = threading.Event()
        if background:
            threading.Thread(target=self._write, name="moetron-checkpoint-write", daemon=True).start()
        else:
            self._write()

    def _write(self) -> None:
        try:
            if self._fn is not None:
                self._fn(*self._args, **self._kwargs)
            self.records = manifest.records(self.directory, self.files)
        except BaseException as e:  # noqa: BLE001 - re-raised by finalize() on the training thread
            self.error = e
        finally:
            self._args = []  # frees the snapshot
            self._done.set()

    def written(self) -> bool:
        """Whether this rank's writes have ended (local; no collective)."""
        return self._done.is_set()

    def finalize(self) -> None:
        """Wait for this rank's writes, then finalize with every rank (collective): afterwards every rank's files,
        ``.metadata`` and ``metadata.json`` are complete. A failed write raises on every rank (megatron-core's
        finalize); a failure of this rank's own (recording its files) stays in :attr:`error` for the caller to
        share with the other ranks."""
        self._done.wait()
        if dist.is_initialized():
            dist.barrier()
        for fn in self._finalize:
            fn()


def all_written(job: WriteJob, device: torch.device) -> bool:
    """Whether every rank's writes for ``job`` have ended (collective: a MIN all-reduce of one int)."""
    done = torch.tensor([int(job.written())], dtype=torch.int32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
    return bool(done.item())
