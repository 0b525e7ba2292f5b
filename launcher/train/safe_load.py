"""Restricted unpickling for every checkpoint load: a crafted checkpoint cannot run code.

megatron-core ``dist_checkpointing`` (torch_dist format) reads a checkpoint through torch DCP, which unpickles two
things without restriction:

- ``.metadata``: ``pickle.load`` in ``FileSystemReader.read_metadata``
  (torch/distributed/checkpoint/filesystem.py:926-936, torch 2.13), reached from megatron-core's
  ``_get_filesystem_reader`` / ``TorchDistLoadShardedStrategy.load`` (megatron/core/dist_checkpointing/strategies/
  torch.py:915-921, 994, 1012, 1029);
- every byte entry (megatron ``ShardedObject``: our per-rank RNG and data-loader state and megatron's
  ``common_state``): ``torch.load(value, weights_only=False)`` in ``DefaultLoadPlanner.load_bytes``
  (torch/distributed/checkpoint/default_planner.py:382-392), inherited by megatron's ``MCoreLoadPlanner``
  (strategies/torch.py:493).

:func:`restricted_unpickling` swaps both for allowlisted versions while a load runs: ``.metadata`` goes through
:class:`MetadataUnpickler` (``pickle.Unpickler`` whose ``find_class`` admits only torch DCP's metadata dataclasses,
``torch.Size``, dtypes and layouts), byte entries through ``torch.load(weights_only=True)`` plus the numpy globals
of ``np.random.get_state()``. Anything else raises :class:`UnsafeCheckpointError` before it is constructed.
"""
from __future__ import annotations

import contextlib
import io
import logging
import pickle
import re
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import default_planner, filesystem, metadata, planner

_METADATA_MODULES = {m.__name__: m for m in (metadata, planner)}
"""Modules whose classes (dataclasses and enums describing tensors, chunks and write items) ``.metadata`` holds."""
_METADATA_NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                   (filesystem.__name__, "_StorageInfo")}
_NP_CORE = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core
_OBJECT_GLOBALS = [_NP_CORE.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
"""What ``torch.load(weights_only=True)`` needs beyond tensors and builtins: numpy's RNG state array."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file references a Python global outside the allowlist. The message starts with
    :data:`NOT_ALLOWED` (torch DCP re-raises some load errors as text only)."""

    def __init__(self, what: str):
        super().__init__(f"{NOT_ALLOWED}{what}")


NOT_ALLOWED = "outside the checkpoint allowlist: "


class MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` for torch DCP ``.metadata``: only its own metadata classes, sizes, dtypes, layouts."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = ((module, name) in _METADATA_NAMES
                   or (module in _METADATA_MODULES and isinstance(getattr(_METADATA_MODULES[module], name, None), type))
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise UnsafeCheckpointError(f"{module}.{name}")
        return super().find_class(module, name)


def _read_metadata(self, *args: Any, **kwargs: Any) -> metadata.Metadata:
    """``FileSystemReader.read_metadata`` (filesystem.py:926) with :class:`MetadataUnpickler`."""
    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as metadata_file:
        loaded = MetadataUnpickler(metadata_file).load()
    if not isinstance(loaded, metadata.Metadata):
        raise UnsafeCheckpointError(f"{type(loaded).__name__} instead of torch DCP Metadata")
    if getattr(loaded, "storage_meta", None) is None:
        loaded.storage_meta = metadata.StorageMeta()
    loaded.storage_meta.load_id = self.load_id
    return loaded


def load_object(value: io.BytesIO) -> Any:
    """One checkpoint byte entry with ``torch.load(weights_only=True)``; a disallowed global raises
    :class:`UnsafeCheckpointError` naming it."""
    try:
        with torch.serialization.safe_globals(_OBJECT_GLOBALS):
            return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(_first_global(str(e))) from None


def _first_global(message: str) -> str:
    """The global torch's weights_only unpickler refused (``GLOBAL module.name``), from its message."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    return found.group(1) if found else "unsupported-pickle-content"


def _load_bytes(self, read_item, value: io.BytesIO) -> None:
    """``DefaultLoadPlanner.load_bytes`` (default_planner.py:382) with :func:`load_object`."""
    obj = load_object(value)
    if self.flatten_state_dict:
        default_planner.set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


class _DropMetadataFallbackWarnings(logging.Filter):
    """torch DCP logs each failed metadata read with its traceback on the root logger
    (state_dict_loader.py:237) before raising; the raised error is what we report, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Global metadata is not found", "Rank local metadata is not found"))


_FILTER = _DropMetadataFallbackWarnings()
_lock = threading.Lock()
_depth = 0
_originals: dict[str, Any] = {}


@contextlib.contextmanager
def restricted_unpickling() -> Iterator[None]:
    """Route torch DCP's ``.metadata`` and byte-entry unpickling through the allowlists while the block runs
    (re-entrant; the originals are restored when the outermost block exits)."""
    global _depth
    with _lock:
        if _depth == 0:
            _originals.update(read=filesystem.FileSystemReader.read_metadata,
                              load=default_planner.DefaultLoadPlanner.load_bytes)
            filesystem.FileSystemReader.read_metadata = _read_metadata
            default_planner.DefaultLoadPlanner.load_bytes = _load_bytes
            logging.getLogger().addFilter(_FILTER)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                filesystem.FileSystemReader.read_metadata = _originals["read"]
                default_planner.DefaultLoadPlanner.load_bytes = _originals["load"]
                logging.getLogger().removeFilter(_FILTER)
