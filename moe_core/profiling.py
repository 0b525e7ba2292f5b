"""Named phases of a training step for the torch profiler: ranges called ``moetron.<phase>``.

``launcher/bench/step.py`` attributes profiled time to them (forward ops by their enclosing range, backward ops by
the forward op that recorded them). A range is recorded only while a profiler runs and never inside a region that
``torch.compile`` traces, so it costs nothing in training and adds no graph break.
"""
from __future__ import annotations

import contextlib

import torch
from torch.autograd import profiler

PHASES = ("attention", "router", "permute", "dispatch", "shared_experts", "experts", "combine", "unpermute",
          "optimizer")
"""Every phase name used with :func:`phase` (the bench reports them in this order, then "other"). The MoE layer's
are marked by the dispatcher driver (``moe_core.dispatcher``): ``permute`` / ``unpermute`` its local row movement,
``dispatch`` / ``combine`` its communication (empty on one device), ``experts`` the routed experts'
computation, ``shared_experts`` the shared expert's (``moe.shared_expert_ffn_hidden_size``)."""


def phase(name: str) -> contextlib.AbstractContextManager:
    """``with phase("experts"): ...`` marks a profiler range ``moetron.experts`` (a no-op unless profiling)."""
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; one of {PHASES}")
    if torch.compiler.is_compiling() or not profiler._is_profiler_enabled:
        return contextlib.nullcontext()
    return torch.profiler.record_function(f"moetron.{name}")
