"""Activation recomputation (``train.recompute``, ``train.recompute_modules``): which activations a forward pass
drops and the backward pass recomputes, and the one way a region is wrapped, torch's non-reentrant checkpoint
(``torch.utils.checkpoint.checkpoint(use_reentrant=False)``): the region keeps its inputs, the tensors autograd
would save inside it are dropped, and backward re-runs the region (stopping as soon as what it needs is back).

Modes: ``none``; ``full`` = every transformer block is one region (it keeps the block's input, ``B*S*D``);
``selective`` = the named modules (megatron-core's vocabulary), each its own region:

=================  ===============================================================================================
``core_attn``      the attention core, softmax(q k^T) v (keeps q, k, v; drops the SDPA output and its statistics)
``mla_up_proj``    MLA's up-projections: q_b_proj (q_proj without q_lora), kv_b_proj, the latent norms, RoPE; with
                   ``core_attn`` one region from the latents to the attention output (q, k, v are not kept)
``norm``           the block's two RMSNorms (keeps the norm input; drops its fp32 intermediates)
``mlp``            the dense layers' SwiGLU FFN (keeps its input)
``shared_experts`` the MoE layer's shared expert and its gate (keeps its input)
``moe_act``        the routed experts' activation and down projection: keeps the gate/up GEMM outputs and the
                   MoNE keep-mask, drops the SwiGLU output and silu's intermediates (recompute: the activation and
                   the down GEMM, one third of the expert forward FLOPs). It lives inside the experts' compute
                   phase: nothing is dispatched twice. The Triton MoNE kernel already keeps only ``g, u`` and two
                   ints per row, so there it changes nothing.
``moe``            the whole MoE layer (router, dispatch, experts, combine, shared expert; keeps its input). With
                   EP the recompute runs the layer's all-to-alls again (the dispatch and the combine: two more
                   exchanges of the layer's routed rows per micro-batch in backward; LLEP also re-sends moved
                   expert weights); use ``moe_act`` to keep the exchanged rows instead.
=================  ===============================================================================================

Exactness: a recomputed region computes what its first pass did, bit for bit. Torch's checkpoint restores the RNG
state (no second draw), the Matryoshka k is the step's (``MoELayer.set_step``; a recomputing model refuses to
train without it), the MoNE keep-mask of ``moe_act`` is the first pass's tensor (computed outside the region), and
the one piece of cross-call state a region reads, the router's global-batch slot counts, is replayed from the first
pass by :func:`first_pass_value` (no second accumulation, no second all-reduce).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["MODES", "MODULES", "Recompute", "checkpointed", "checkpointed_replaying", "first_pass_value",
           "maybe_checkpointed"]

MODES = ("none", "selective", "full")
MODULES = ("core_attn", "moe_act", "shared_experts", "norm", "mla_up_proj", "moe", "mlp")
_INSIDE_MOE = ("moe_act", "shared_experts")
T = TypeVar("T")


@dataclass(frozen=True)
class Recompute:
    """A model's recompute setting: ``mode`` in :data:`MODES`, ``modules`` (selective only) from :data:`MODULES`."""

    mode: str = "none"
    modules: frozenset[str] = frozenset()

    @property
    def block(self) -> bool:
        """Every transformer block is one region (``full``)."""
        return self.mode == "full"

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def covers(self, module: str) -> bool:
        """``module`` (one of :data:`MODULES`) is its own region (``selective``)."""
        return self.mode == "selective" and module in self.modules

    def problem(self) -> Optional[str]:
        """What is wrong with this setting (one line naming the ``train.*`` key), or None."""
        if self.mode not in MODES:
            return f"train.recompute must be one of {list(MODES)}, got {self.mode!r}"
        unknown = sorted(self.modules - set(MODULES))
        if unknown:
            return f"train.recompute_modules: unknown module {unknown[0]!r}; choose from {list(MODULES)}"
        if self.mode == "selective" and not self.modules:
            return (f"train.recompute=selective needs train.recompute_modules (some of {list(MODULES)}), e.g. "
                    "train.recompute_modules=[core_attn,moe_act]")
        if self.mode != "selective" and self.modules:
            return (f"train.recompute_modules is only read with train.recompute=selective (got "
                    f"train.recompute={self.mode}); set train.recompute=selective or train.recompute_modules=[]")
        nested = [m for m in _INSIDE_MOE if m in self.modules]
        if "moe" in self.modules and nested:
            return (f"train.recompute_modules: 'moe' already recomputes the whole MoE layer, which contains "
                    f"{nested[0]!r}; list one of them")
        return None


class _ReplayLog:
    """Values one region's first pass computed with :func:`first_pass_value`, in call order."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.replaying = False
        self.position = 0


_regions: list[_ReplayLog] = []
"""The checkpointed regions running now, innermost last (a plain list, not thread-local: torch recomputes on the
autograd engine's thread)."""


@contextlib.contextmanager
def _in_region(log: _ReplayLog, replaying: bool) -> Iterator[None]:
    log.replaying, log.position = replaying, 0
    _regions.append(log)
    try:
        yield
    finally:
        _regions.pop()


def _region_contexts():
    """``context_fn`` of every region: the first pass records into a fresh log, the recomputation replays it."""
    log = _ReplayLog()
    return _in_region(log, False), _in_region(log, True)


@torch.compiler.disable
def first_pass_value(compute: Callable[[], T]) -> T:
    """``compute()``; while torch recomputes a checkpointed region, the value its first pass computed at this call
    instead (``compute`` is not run again). For state that is read and updated across calls (the router's
    global-batch counts): the recomputation sees what the first pass saw and updates nothing."""
    if not _regions:
        return compute()
    log = _regions[-1]
    if log.replaying:
        value = log.values[log.position]
        log.position += 1
        return value
    value = compute()
    log.values.append(value)
    return value


def checkpointed(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` as one recompute region (non-reentrant checkpoint, RNG state restored for the recompute); for
    regions that read no cross-call state, which ``torch.compile`` traces inside a compiled block."""
    return checkpoint(fn, *args, use_reentrant=False)


@torch.compiler.disable
def checkpointed_replaying(fn: Callable[..., T], *args: Any) -> T:
    """:func:`checkpointed` for a region whose forward may call :func:`first_pass_value` (a whole block or MoE
    layer: the router's global-batch counts). It runs eagerly under ``torch.compile``, whose checkpoint takes no
    custom context: ``full`` wraps the compiled block from outside (it stays compiled inside the region);
    ``moe`` runs the MoE layer eagerly in a compiled block."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_region_contexts)


def maybe_checkpointed(enabled: bool, fn: Callable[..., T], *args: Any, replaying: bool = False) -> T:
    """``fn(*args)``, as a region when ``enabled`` (:func:`checkpointed_replaying` when ``replaying``)."""
    if not enabled:
        return fn(*args)
    return (checkpointed_replaying if replaying else checkpointed)(fn, *args)
