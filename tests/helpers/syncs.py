"""Count the calls that make the host wait for the device (a "host sync"), with their call sites, on any device.

    with count_syncs() as syncs:
        loss = model(batch); loss.backward()
    assert syncs.count <= 3, syncs.report()      # report() names every call site

On CUDA these calls block until the device has caught up; on CPU nothing waits, so instead of timing anything
this patches the Python entry points that would sync and records each call: ``Tensor.item / tolist / cpu /
__bool__ / __int__ / __float__ / __index__ / nonzero``, ``torch.nonzero``, ``torch.masked_select``,
``torch.unique``, ``repeat_interleave`` of tensor repeats without ``output_size`` (its output size is read
back), ``.to("cpu")`` (a device given as an object, e.g. ``x.device``, is taken for a host-to-device copy:
on a CPU run the two cannot be told apart), and ``torch.tensor`` / ``torch.as_tensor`` of tensors. Calls made while
another counted call is running (e.g. ``tolist`` inside ``__bool__``) count once. Host-to-device copies and
collectives are not counted (a collective's wait is the communication itself).

Only Python-level calls are seen: C++ code that syncs internally is not counted, nor is indexing with a boolean
mask (``Tensor.__getitem__`` cannot be patched: assigning it turns tensors into Python sequences for the rest of
the process); ``torch.cuda.set_sync_debug_mode("error")`` covers both on CUDA. Reusable by any test, e.g. for a
whole training step.
"""
from __future__ import annotations

import contextlib
import threading
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

_TENSOR_METHODS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero")
_TORCH_FUNCTIONS = ("nonzero", "masked_select", "unique")


@dataclass
class SyncLog:
    calls: list[tuple[str, str]] = field(default_factory=list)
    """``(what, call site "file:line in function")`` per counted call, in call order."""

    @property
    def count(self) -> int:
        return len(self.calls)

    def sites(self) -> Counter:
        return Counter(self.calls)

    def report(self) -> str:
        lines = [f"{self.count} host sync(s):"]
        lines += [f"  {n} x {what} at {site}" for (what, site), n in self.sites().most_common()]
        return "\n".join(lines)


def _call_site() -> str:
    """The innermost frame outside this helper and torch's own Python code."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename != __file__ and "/torch/" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return "<unknown>"


class _Patcher:
    def __init__(self, log: SyncLog, host_tensors: Iterable[torch.Tensor] = ()):
        self.log, self.depth, self.saved = log, threading.local(), []
        self.host_ids = {id(t) for t in host_tensors}

    def wrap(self, owner, name: str, should_count=lambda *a, **k: True) -> None:
        original = getattr(owner, name)
        patcher = self

        def counted(*args, **kwargs):
            depth = getattr(patcher.depth, "n", 0)
            on_host = bool(args) and id(args[0]) in patcher.host_ids
            if depth == 0 and not on_host and should_count(*args, **kwargs):
                patcher.log.calls.append((f"{getattr(owner, '__name__', owner)}.{name}", _call_site()))
            patcher.depth.n = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                patcher.depth.n = depth

        self.saved.append((owner, name, original))
        setattr(owner, name, counted)

    def restore(self) -> None:
        for owner, name, original in reversed(self.saved):
            setattr(owner, name, original)


def _has_tensor(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    return isinstance(obj, (list, tuple)) and any(_has_tensor(o) for o in obj)


def _to_cpu(self, *args, **kwargs) -> bool:
    target = kwargs.get("device", args[0] if args else None)
    return isinstance(target, str) and torch.device(target).type == "cpu"


def _repeat_reads_size(first, repeats=None, *args, **kwargs) -> bool:
    """repeat_interleave reads its output size back unless it is given or the repeats are a Python int."""
    if kwargs.get("output_size") is not None or (len(args) >= 2 and args[1] is not None):
        return False
    repeats = kwargs.get("repeats", repeats)
    return isinstance(repeats, torch.Tensor) or repeats is None  # None: the repeat_interleave(repeats) form


@contextlib.contextmanager
def count_syncs(host_tensors: Iterable[torch.Tensor] = ()) -> Iterator[SyncLog]:
    """Record every host-sync call made inside the block (see the module docstring). ``host_tensors``: tensors that
    live on the host on every device (e.g. torch.optim's per-parameter ``step`` counters, which stay on the CPU
    unless the optimizer is fused/capturable); calls on exactly these are not counted, so a CPU run can tell them
    from device tensors."""
    log = SyncLog()
    patcher = _Patcher(log, host_tensors)
    try:
        for name in _TENSOR_METHODS:
            patcher.wrap(torch.Tensor, name)
        for name in _TORCH_FUNCTIONS:
            patcher.wrap(torch, name)
        patcher.wrap(torch.Tensor, "to", _to_cpu)
        patcher.wrap(torch.Tensor, "repeat_interleave", _repeat_reads_size)
        patcher.wrap(torch, "repeat_interleave", _repeat_reads_size)
        patcher.wrap(torch, "tensor", lambda data, *a, **k: _has_tensor(data))
        patcher.wrap(torch, "as_tensor", lambda data, *a, **k: _has_tensor(data))
        yield log
    finally:
        patcher.restore()
