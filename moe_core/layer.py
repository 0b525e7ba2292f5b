"""The MoE layer: route -> dispatch -> experts -> combine, with the token dispatcher passed in.

Shape legend: ``T`` tokens, ``K`` experts per token, ``N`` routing slots, ``D`` hidden, ``E`` experts.

The dispatcher implements :class:`moe_core.dispatcher.TokenDispatcher` (named phases, each local-only or
collective-only); the layer runs them through :func:`moe_core.dispatcher.dispatch_compute_combine`.
:class:`LocalDispatcher` is the single-device one; ``parallel/dispatch.py`` and ``parallel/llep/dispatcher.py``
provide the expert-parallel ones. Every forward leaves a :class:`MoELayerStats` in ``layer.last_stats``.

Shared expert (``moe.shared_expert_ffn_hidden_size`` > 0): ``y = routed(x) + shared(x)``, times
``sigmoid(shared_expert_gate(x))`` on the shared term with ``moe.shared_expert_gate`` (Qwen2-MoE; without it
DeepSeek-V3). ``shared_expert`` is a :class:`~moe_core.layers.SwiGLUMLP` built by the layer factory (TP-parallel
like the dense FFN; with ``moe.mone.shared_experts`` a :class:`~moe_core.mone.MoNESwiGLUMLP`, MoNE's neuron selection
inside it), ``shared_expert_gate`` a [1, D] :class:`~moe_core.layers.ReplicatedLinear` (whole on every TP
rank: its input and output are TP-replicated, so its gradient comes out whole too). The driver computes it between
the dispatch and the combine (``moe_core.dispatcher``), where an asynchronous transport overlaps it.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from moe_core.config import MoEConfig
from moe_core.aux_loss import AuxLossAutoScaler
from moe_core.dispatcher import DispatchState, SharedExperts, TokenDispatcher, dispatch_compute_combine
from moe_core.experts import SwiGLUExperts
from moe_core.layers import LayerFactory, ReplicatedLinear, SwiGLUMLP
from moe_core.matryoshka import KSchedule
from moe_core.mone import MoNESwiGLUMLP
from moe_core.permute import make_permutation, permute_tokens, unpermute_tokens
from moe_core.profiling import phase
from moe_core.recompute import Recompute, checkpointed
from moe_core.router import TopKRouter

__all__ = ["AuxLossAutoScaler", "LocalDispatcher", "MoELayer", "MoELayerStats"]


@dataclass(frozen=True)
class MoELayerStats:
    """Statistics of one MoE layer forward (detached; tensors stay on the routing device, nothing is read on the
    host)."""

    tokens_per_expert_E: torch.Tensor
    """int64 [E] routing slots per expert, counted before capacity dropping."""
    k: int
    """Experts each token was routed to (the Matryoshka draw, else ``moe.top_k``)."""
    dropped_slots: torch.Tensor
    """int64 scalar: routing slots dropped by the capacity factor."""
    mone_kept_fraction: float
    """Fraction of expert neurons each routed token used (1.0 without MoNE)."""
    aux_loss: torch.Tensor
    """fp32 scalar: the load-balancing loss, already times ``moe.aux_loss_coeff``."""
    z_loss: torch.Tensor
    """fp32 scalar: the router z-loss, already times ``moe.z_loss_coeff``."""


class LocalDispatcher(TokenDispatcher):
    """All experts on this device. Every phase is local-only (the collective ones are the identity) and none syncs
    with the host: the permutation keeps all ``T*K`` slots (dropped ones as dead rows) and the counts stay on the
    device."""

    def dispatch_preprocess(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                            experts: SwiGLUExperts) -> tuple[torch.Tensor, DispatchState]:
        """Local-only: group the slots by expert (ids relative to the held experts' first one)."""
        local_idx_TK = torch.where(topk_idx_TK >= 0, topk_idx_TK - experts.first_expert, topk_idx_TK)
        perm = make_permutation(local_idx_TK, experts.num_local_experts)
        return permute_tokens(x_TD, perm), DispatchState(experts, perm, topk_weight_TK)

    def token_dispatch(self, x_ND: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """No communication: every expert is here."""
        return x_ND

    def dispatch_postprocess(self, x_MD: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Local-only: the rows are already grouped by expert (dead rows last)."""
        state.tokens_per_expert = state.perm.tokens_per_expert_E
        return x_MD

    def combine_preprocess(self, y_MD: torch.Tensor, state: DispatchState) -> torch.Tensor:
        return y_MD

    def token_combine(self, y_MD: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """No communication."""
        return y_MD

    def combine_postprocess(self, y_ND: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Local-only: weighted combine back to token order."""
        return unpermute_tokens(y_ND, state.perm, state.topk_weight_TK, state.perm.row_TK.shape[0])


def _shared_expert(hidden: int, moe_cfg: MoEConfig, factory: LayerFactory) -> SwiGLUMLP:
    """The shared expert: a SwiGLU FFN, with MoNE neuron selection under ``moe.mone.shared_experts``."""
    if moe_cfg.mone.shared_experts:
        return MoNESwiGLUMLP(hidden, moe_cfg.shared_expert_ffn_hidden_size, factory, moe_cfg.mone)
    return SwiGLUMLP(hidden, moe_cfg.shared_expert_ffn_hidden_size, factory)


class MoELayer(nn.Module):
    """``forward(x[..., D]) -> y[..., D]``. Attributes: ``router``, ``experts`` (all E experts until the parallel
    code swaps in a local-expert instance), ``dispatcher`` (a :class:`TokenDispatcher`), ``shared_expert`` and
    ``shared_expert_gate`` (None when not configured; module docstring), ``last_stats`` (the :class:`MoELayerStats`
    of the last forward; None before the first). ``factory`` builds the shared expert's projections (default: plain
    ``nn.Linear``)."""

    def __init__(self, hidden: int, moe_cfg: MoEConfig, layer_idx: int, k_schedule: KSchedule,
                 dispatcher: Optional[TokenDispatcher] = None, factory: Optional[LayerFactory] = None):
        super().__init__()
        self.hidden, self.cfg, self.layer_idx, self.k_schedule = hidden, moe_cfg, layer_idx, k_schedule
        self.router = TopKRouter(hidden, moe_cfg.num_experts, moe_cfg)
        self.experts = SwiGLUExperts(moe_cfg.num_experts, hidden, moe_cfg.expert_ffn_hidden_size, moe_cfg.mone)
        shared_ffn = moe_cfg.shared_expert_ffn_hidden_size
        self.shared_expert = _shared_expert(hidden, moe_cfg, factory or LayerFactory()) if shared_ffn else None
        self.shared_expert_gate = ReplicatedLinear(hidden, 1) if shared_ffn and moe_cfg.shared_expert_gate else None
        self.dispatcher: TokenDispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        self.step: Optional[int] = None
        """Training step keying the Matryoshka k draw; None until :meth:`set_step` is called."""
        self._step_k: Optional[int] = None
        """The training k of ``step``, drawn by :meth:`set_step`, outside any compiled region: forward reads only
        this int (under ``torch.compile`` one graph per distinct k, never one per step)."""
        self._unset_step_calls = 0
        self.last_stats: Optional[MoELayerStats] = None
        self.recompute = Recompute()
        """Activation recompute (moe_core/recompute.py): ``shared_experts`` is read here; with any recompute mode a
        training forward needs :meth:`set_step` (a recomputed forward must route with the first pass's k)."""

    def set_step(self, step: int) -> None:
        """The current training step (keys the Matryoshka k draw): call it once per optimizer step, before the
        step's forward passes, so all its micro-batches, every rank and any recomputation route with one k (and the
        global-batch aux loss counts the step's micro-batches from here)."""
        self.step = step
        self.router.start_step()
        self._step_k = self.k_schedule.k_for(self.layer_idx, step, training=True)

    def current_k(self) -> int:
        """The k the next forward routes with (no side effects)."""
        step = self.step if self.step is not None else self._unset_step_calls
        return self.k_schedule.k_for(self.layer_idx, step, self.training)

    def _next_k(self) -> int:
        """:meth:`current_k`; a Matryoshka training loop that never called :meth:`set_step` gets a fresh draw per
        forward call instead of the step-0 k forever: call n uses step n's draw. That is one step per forward,
        which differs from a step with several micro-batches and breaks under activation recomputation (the
        recomputed forward would draw again), hence the one-time warning."""
        if self.training and self._step_k is not None:
            return self._step_k
        k = self.current_k()
        if self.step is None and self.training and self.cfg.matryoshka.enabled:
            if self._unset_step_calls == 0:
                warnings.warn("Matryoshka MoE training without MoELayer.set_step: every training forward call draws "
                              "a new k (call n uses step n's draw). Call model.set_step(step) once per optimizer step "
                              "so all micro-batches of a step and any activation recomputation route with the same k",
                              stacklevel=2)
            self._unset_step_calls += 1
        return k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden:
            raise ValueError(f"MoELayer expects inputs [..., {self.hidden}], got {tuple(x.shape)}")
        x_TD = x.reshape(-1, self.hidden)
        if self.training and self._step_k is None:  # without set_step every training forward is its own step
            if self.recompute.active:
                raise RuntimeError("training with activation recompute needs MoELayer.set_step(step) (model.set_step) "
                                   "once per optimizer step: a forward without it draws a new Matryoshka k and "
                                   "restarts the global-batch counts, so its recomputation would not repeat it")
            self.router.start_step()
        k = self._next_k()
        with phase("router"):
            routed = self.router(x_TD, k, seq_len=x.shape[-2] if x.dim() >= 3 else None)  # [B, S, D]: S per sequence
        y_TD = dispatch_compute_combine(self.dispatcher, x_TD, routed.topk_idx_TK, routed.topk_weight_TK,
                                        self.experts, self._shared_experts())
        if self.training:
            y_TD = AuxLossAutoScaler.apply(y_TD, routed.aux_loss + routed.z_loss)
        self.last_stats = MoELayerStats(
            tokens_per_expert_E=routed.tokens_per_expert_E.detach(), k=k,
            dropped_slots=(routed.topk_idx_TK < 0).sum().detach(), mone_kept_fraction=self.experts.kept_fraction,
            aux_loss=routed.aux_loss.detach(), z_loss=routed.z_loss.detach())
        return y_TD.reshape(x.shape)

    def _shared_experts(self) -> Optional[SharedExperts]:
        """The driver's shared-expert callable (None without one), one recompute region with ``shared_experts``."""
        if self.shared_expert is None:
            return None
        if self.recompute.covers("shared_experts"):
            return functools.partial(checkpointed, self._shared_output)
        return self._shared_output

    def _shared_output(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The shared expert's term of the output [T, D] (gated when ``shared_expert_gate`` is set)."""
        y_TD = self.shared_expert(x_TD)
        if self.shared_expert_gate is not None:
            y_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * y_TD
        return y_TD

    def update_expert_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Aux-loss-free balancing step; pass counts all-reduced over every rank routing with this layer."""
        self.router.update_expert_bias(tokens_per_expert_E)
