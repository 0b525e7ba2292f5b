"""The token-dispatcher protocol: how an MoE layer's routing slots reach their experts and come back.

Shape legend: ``T`` tokens given to the layer, ``K`` experts per token, ``N`` routing slots this device sends,
``M`` slots it receives (= computes), ``D`` hidden, ``E`` experts, ``L`` experts held here.

A dispatcher splits one layer call into named phases, modelled on megatron-core's ``MoETokenDispatcher``. Each is
local-only (this device's memory, no communication) or collective-only (communication, plus the host bookkeeping
of split sizes the communication itself needs); :func:`dispatch_compute_combine` runs them in this order:

====================  ==========  ===========================================================  ================
phase                 kind        does                                                         profiler phase
====================  ==========  ===========================================================  ================
dispatch_preprocess   local       group the slots by expert (or device), rows ``x_ND``         ``permute``
token_dispatch        collective  rows to the devices holding their experts, ``x_MD``          ``dispatch``
dispatch_postprocess  local       received rows grouped by held expert; rows per expert        ``permute``
compute_experts       local       the experts on their rows (default: ``experts(x, counts)``)  ``experts``
combine_preprocess    local       expert outputs back to one row per row received              ``unpermute``
token_combine         collective  outputs back to the devices the rows came from, ``y_ND``     ``combine``
combine_postprocess   local       the sum per token (router-weighted here or before)          ``unpermute``
gather_output         collective  the layer's output rows from every device that split them    ``combine``
====================  ==========  ===========================================================  ================

A local-only dispatcher (:class:`moe_core.layer.LocalDispatcher`) makes its collective phases the identity. The
router weights are applied once: in ``combine_postprocess`` when each routing slot travels as its own row (the
local dispatcher), or in ``combine_preprocess`` when a device receives a token once with several of its slots
(the deduplicated EP dispatcher, parallel/dispatch.py: it sums the token's weighted outputs of its experts there,
and ``combine_postprocess`` adds up the token's rows).
Everything one call needs between its phases travels in that call's :class:`DispatchState` (a dispatcher subclasses
it for its own bookkeeping), never on the dispatcher: activation recomputation and pipeline micro-batches in flight
each get their own state. A new transport (an all-gather dispatcher for small EP, DeepEP) is a new
:class:`TokenDispatcher` subclass: the MoE layer only calls the driver.

Shared experts: the driver runs the layer's ``shared_experts`` callable (profiler phase ``shared_experts``) right
after ``token_dispatch`` returns and before ``dispatch_postprocess``, and adds its output to the routed output after
``gather_output``. A transport whose ``token_dispatch`` only launches the exchange (asynchronous all-to-all, DeepEP)
and waits for it in ``dispatch_postprocess`` therefore overlaps the shared-expert computation with the dispatch
all-to-all. The shared expert is tensor-parallel on the layer's (TP-replicated) input; it takes no part in the
dispatcher's phases and its backward runs wherever autograd schedules it. Under ``train.compile`` it runs inside
the dispatcher's region, so with a dispatcher that is not ``traceable`` it runs eagerly too.

Autograd: phases are ordinary differentiable functions; a collective phase's backward is the reverse
communication (``parallel/comm.py``), so the backward of a call crosses the same phases in reverse order.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from moe_core.experts import SwiGLUExperts
from moe_core.permute import Permutation
from moe_core.profiling import phase

__all__ = ["DispatchState", "SharedExperts", "TokenDispatcher", "dispatch_compute_combine"]

SharedExperts = Callable[[torch.Tensor], torch.Tensor]
"""The layer's shared-expert output ``[T, D]`` of its input ``x_TD`` (same dtype), computed whole on this device
(tensor-parallel inside)."""


@dataclass
class DispatchState:
    """What one dispatcher call carries from phase to phase (set by ``dispatch_preprocess``)."""

    experts: SwiGLUExperts
    """The experts held by this device (``experts.first_expert`` .. ``+ num_local_experts - 1``)."""
    perm: Permutation
    """This device's rows to send, grouped by expert (one per routing slot) or by destination device (one per
    (token, device) pair); the rows it later combines."""
    topk_weight_TK: torch.Tensor
    """fp32 router weights of this device's routing slots (0 where dropped): the combine's weights."""
    tokens_per_expert: Optional[torch.Tensor] = None
    """int64 rows per held expert of the expert input, on the rows' device; set by ``dispatch_postprocess``."""


class TokenDispatcher(abc.ABC):
    """Moves routed token rows to their experts and the outputs back, in the phases of the module docstring.

    ``traceable``: False when a phase needs host ints (all-to-all split sizes) or collectives; the driver then runs
    the whole call eagerly under ``train.compile`` (one graph break, parallel/compile.py), so split sizes never
    become graph guards that recompile per routing.
    """

    traceable: bool = True

    @abc.abstractmethod
    def dispatch_preprocess(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                            experts: SwiGLUExperts) -> tuple[torch.Tensor, DispatchState]:
        """Local-only: the rows to send ``x_ND`` (grouped by expert) and the call's state. ``topk_idx_TK`` holds
        global expert ids (``-1`` = dropped slot), ``topk_weight_TK`` their fp32 weights."""

    @abc.abstractmethod
    def token_dispatch(self, x_ND: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Collective-only: the rows this device computes, ``x_MD``, in the order they arrive."""

    @abc.abstractmethod
    def dispatch_postprocess(self, x_MD: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Local-only: the received rows grouped by held expert; sets ``state.tokens_per_expert``."""

    def compute_experts(self, x_MD: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Local-only: expert outputs of the grouped rows (same row order). Default: the held experts."""
        return state.experts(x_MD, state.tokens_per_expert)

    @abc.abstractmethod
    def combine_preprocess(self, y_MD: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Local-only: inverse of ``dispatch_postprocess``'s reordering (one output per row, in the order the rows
        arrived; a row that carried several slots gets their router-weighted sum)."""

    @abc.abstractmethod
    def token_combine(self, y_MD: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Collective-only: inverse of ``token_dispatch`` (each output back on the device that sent its row)."""

    @abc.abstractmethod
    def combine_postprocess(self, y_ND: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Local-only: ``y_t = sum_k w_tk * y_row(t, k)`` in this device's token order (fp32 accumulation; the
        weights applied here or, per received row, in ``combine_preprocess``)."""

    def gather_output(self, y_tD: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Collective-only: the layer's output from the token rows this device combined. Default: the identity
        (a dispatcher that splits the layer's tokens over devices, e.g. over TP, gathers them here)."""
        return y_tD


def _run_phases(dispatcher: TokenDispatcher, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor,
                topk_weight_TK: torch.Tensor, experts: SwiGLUExperts,
                shared_experts: Optional[SharedExperts]) -> torch.Tensor:
    with phase("permute"):
        x_ND, state = dispatcher.dispatch_preprocess(x_TD, topk_idx_TK, topk_weight_TK, experts)
    with phase("dispatch"):
        x_MD = dispatcher.token_dispatch(x_ND, state)
    shared_TD = None
    if shared_experts is not None:  # while an asynchronous dispatch is in flight (module docstring)
        with phase("shared_experts"):
            shared_TD = shared_experts(x_TD)
    with phase("permute"):
        x_MD = dispatcher.dispatch_postprocess(x_MD, state)
    with phase("experts"):
        y_MD = dispatcher.compute_experts(x_MD, state)
    with phase("unpermute"):
        y_MD = dispatcher.combine_preprocess(y_MD, state)
    with phase("combine"):
        y_ND = dispatcher.token_combine(y_MD, state)
    with phase("unpermute"):
        y_tD = dispatcher.combine_postprocess(y_ND, state)
    with phase("combine"):
        y_TD = dispatcher.gather_output(y_tD, state)
    return y_TD if shared_TD is None else y_TD + shared_TD


_run_phases_eagerly = torch.compiler.disable(_run_phases)


def dispatch_compute_combine(dispatcher: TokenDispatcher, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor,
                             topk_weight_TK: torch.Tensor, experts: SwiGLUExperts,
                             shared_experts: Optional[SharedExperts] = None) -> torch.Tensor:
    """``y_TD`` with ``y_t = sum_k w_tk * Expert_{idx_tk}(x_t)`` (slots with idx -1 contribute 0), plus
    ``shared_experts(x_TD)`` when given (run between ``token_dispatch`` and ``dispatch_postprocess``: module
    docstring): every phase of ``dispatcher`` in order, each marked as its profiler phase (``moe_core.profiling``;
    the only place these phases are marked). ``x_TD`` [T, D] in the experts' dtype, ``topk_idx_TK`` int64 global
    expert ids, ``topk_weight_TK`` fp32. A dispatcher that is not ``traceable`` runs eagerly under
    ``torch.compile``."""
    run = _run_phases if dispatcher.traceable else _run_phases_eagerly
    return run(dispatcher, x_TD, topk_idx_TK, topk_weight_TK, experts, shared_experts)
