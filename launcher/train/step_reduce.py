"""A training step's numbers in ONE all-reduce over every rank and ONE device-to-host transfer, read back by name.

:class:`PackedSum` is the mechanism (named float64 tensors packed into one buffer); :class:`StepReduction` is what
the trainer packs: the loss as a (loss sum, label tokens) pair (:func:`pack_token_loss`, divided once by
:func:`token_mean`; the objective is ``launcher.train.token_loss``'s), with MTP one such pair per depth, the
squared gradient norm, whether any rank
asked to stop (signals) and, per MoE layer, the statistics of every micro-batch (``moe_core.layer.MoELayerStats``),
summed on the device as the step's micro-batches run (no host sync) and reduced into one :class:`LayerStepStats`
per layer.

Everything is summed over the world: the loss pair lives on the last stage (identical over TP, distinct over DP;
the loss is the summed loss over the summed count, one division), the norm on every rank, layer sums on their
stage (identical over TP, disjoint over DP; disjoint over TP too under sequence parallelism, where each TP rank
routes its own tokens and its aux/z losses are its share), per-step constants (k, MoNE kept fraction) on their
stage (identical over TP and DP); each is divided by how often it was counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from moe_core.layer import MoELayer
from parallel.groups import ParallelGroups

__all__ = ["LayerStepStats", "PackedSum", "StepNumbers", "StepReduction", "pack_token_loss", "token_mean"]


class PackedSum:
    """Named float64 tensors summed over every rank in one all-reduce, then read on the host in one transfer.

    ``add`` in any order (the buffer follows it), then ``all_reduce`` once; after it ``device(name)`` is the summed
    tensor (a view, on the device) and ``host(name)`` its values as a flat list of floats (read with the first
    ``host`` call, the only device-to-host transfer)."""

    def __init__(self) -> None:
        self._parts: dict[str, torch.Tensor] = {}
        self._slices: dict[str, tuple[int, int, torch.Size]] = {}
        self._flat: Optional[torch.Tensor] = None
        self._host: Optional[list[float]] = None

    def add(self, name: str, value: torch.Tensor) -> None:
        if name in self._parts or self._flat is not None:
            raise ValueError(f"PackedSum.add({name!r}): names are unique and added before all_reduce")
        self._parts[name] = value.to(torch.float64)

    def all_reduce(self, distributed: bool) -> None:
        """Sum over the whole world (every rank takes part in one step); ``distributed=False``: one process."""
        offset = 0
        for name, part in self._parts.items():
            self._slices[name] = (offset, part.numel(), part.shape)
            offset += part.numel()
        self._flat = torch.cat([part.reshape(-1) for part in self._parts.values()])
        if distributed:
            dist.all_reduce(self._flat, group=dist.group.WORLD)

    def device(self, name: str) -> torch.Tensor:
        start, size, shape = self._slices[name]
        return self._flat[start:start + size].view(shape)

    def host(self, name: str) -> list[float]:
        if self._host is None:
            self._host = self._flat.tolist()  # the step's one device-to-host transfer
        start, size, _ = self._slices[name]
        return self._host[start:start + size]


def pack_token_loss(packed: PackedSum, loss_sums: list[torch.Tensor], label_tokens: float,
                    device: torch.device) -> None:
    """Add this rank's slots ``loss_sum`` (of its micro-batch loss sums, float64) and ``label_tokens`` to
    ``packed`` (``launcher.train.token_loss``): on the last stage ``label_tokens`` counts the same micro-batches,
    elsewhere (``loss_sums`` empty) it is 0. TP peers add identical pairs; the factor cancels in :func:`token_mean`."""
    total = (torch.stack(loss_sums).double().sum() if loss_sums
             else torch.zeros((), dtype=torch.float64, device=device))
    packed.add("loss_sum", total.reshape(1))
    packed.add("label_tokens", torch.full((1,), label_tokens, dtype=torch.float64, device=device))  # a fill


def token_mean(packed: PackedSum) -> float:
    """The token-weighted mean loss (nats/token) of an all-reduced ``packed`` (:func:`pack_token_loss`): the one
    division."""
    return packed.host("loss_sum")[0] / max(packed.host("label_tokens")[0], 1.0)


@dataclass(frozen=True)
class LayerStepStats:
    """One MoE layer over a whole optimizer step (every micro-batch of every DP rank), on the host."""

    tokens_per_expert_E: torch.Tensor
    """float64 [E] routing slots per expert (before capacity dropping), summed."""
    dropped_slots: float
    """Routing slots dropped by the capacity factor, summed."""
    aux_loss: float
    """Load-balancing loss (times its coefficient), mean over micro-batches."""
    z_loss: float
    """Router z-loss (times its coefficient), mean over micro-batches."""
    k: float
    """Experts per token the step routed with."""
    mone_kept_fraction: Optional[float]
    """Fraction of expert neurons used per routed token; None without MoNE."""


@dataclass(frozen=True)
class StepNumbers:
    loss: float
    """Token-weighted mean loss over the step's global batch (every micro-batch of every DP rank), nats/token."""
    grad_norm: float
    """Global gradient norm (NaN when not finite)."""
    stop: bool
    """Whether any rank asked to stop."""
    layers: dict[int, LayerStepStats]
    """Per MoE layer index (every layer of the model, whichever stage holds it)."""
    tokens_per_expert_dev: dict[int, torch.Tensor]
    """Per MoE layer, the step's summed tokens per expert on the device (the expert-bias update; no host trip)."""
    mtp_loss: Optional[float] = None
    """With MTP: ``mtp_loss_coeff`` times the mean over depths of each depth's token-weighted mean loss
    (``train/mtp_loss``); None without."""


class StepReduction:
    """Collects one step's MoE statistics on the device; :meth:`reduce` makes the step's numbers.

    ``moe_layers``: every MoE layer index of the model, in order; ``num_experts``: E; ``micro_batches``: the
    step's micro-batches over all DP ranks (aux/z loss divisor); ``mone``: whether MoNE is on; ``mtp_depths``
    and ``mtp_loss_coeff``: ``model.mtp_num_layers`` and ``model.mtp_loss_coeff``; ``sequence_parallel``: the TP
    ranks route disjoint tokens (``parallel.sequence_parallel``)."""

    def __init__(self, groups: ParallelGroups, device: torch.device, moe_layers: list[int], num_experts: int,
                 micro_batches: int, mone: bool, mtp_depths: int = 0, mtp_loss_coeff: float = 0.0,
                 sequence_parallel: bool = False):
        self.groups, self.device, self.moe_layers, self.num_experts = groups, device, moe_layers, num_experts
        self.micro_batches, self.mone = micro_batches, mone
        self.mtp_depths, self.mtp_loss_coeff = mtp_depths, mtp_loss_coeff
        self.layer_copies = 1 if sequence_parallel else groups.tp_size
        """How many ranks counted each routed token (the TP peers, unless they hold disjoint token shards)."""
        self._sums: dict[int, torch.Tensor] = {}
        """Per MoE layer of this stage, summed over the step's micro-batches so far: tokens per expert [E], then
        dropped routing slots, aux loss, z loss."""

    def add_micro_batch(self, moe_layers: Mapping[int, MoELayer]) -> None:
        """Add the ``last_stats`` of this stage's MoE layers (after a training forward)."""
        for idx, layer in moe_layers.items():
            st = layer.last_stats
            parts = [st.tokens_per_expert_E, *(v.reshape(1) for v in (st.dropped_slots, st.aux_loss, st.z_loss))]
            row = torch.cat([part.detach().to(torch.float64) for part in parts])
            self._sums[idx] = self._sums.get(idx, 0) + row

    def _pack(self, loss_sums: list[torch.Tensor], label_tokens: float, norm_sq: torch.Tensor,
              stop_requested: bool, local_layers: Mapping[int, MoELayer], mtp_sums: list[torch.Tensor],
              mtp_tokens: list[float]) -> PackedSum:
        packed, E = PackedSum(), self.num_experts

        def full(value: float) -> torch.Tensor:  # a fill on the device, no host-to-device copy
            return torch.full((1,), value, dtype=torch.float64, device=self.device)

        pack_token_loss(packed, loss_sums, label_tokens, self.device)
        if self.mtp_depths:  # per depth: loss sums [K] and label tokens [K] (zeros off the last stage)
            K = self.mtp_depths
            packed.add("mtp_sum", torch.stack(mtp_sums).double().sum(0) if mtp_sums
                       else torch.zeros(K, dtype=torch.float64, device=self.device))
            packed.add("mtp_tokens", torch.cat([full(v) for v in (mtp_tokens or [0.0] * K)]))
        packed.add("norm_sq", norm_sq.to(self.device).reshape(1))
        packed.add("stop", full(float(stop_requested)))
        for idx in self.moe_layers:  # layers of other stages count zero here
            packed.add(f"layer{idx}", self._sums.get(idx, torch.zeros(E + 3, dtype=torch.float64,
                                                                      device=self.device)))
        for name, field in (("k", "k"), ("kept", "mone_kept_fraction")):
            for idx in self.moe_layers:
                value = float(getattr(local_layers[idx].last_stats, field)) if idx in local_layers else 0.0
                packed.add(f"{name}{idx}", full(value))
        self._sums = {}
        return packed

    def reduce(self, loss_sums: list[torch.Tensor], label_tokens: float, norm_sq: torch.Tensor,
               stop_requested: bool, local_layers: Mapping[int, MoELayer],
               mtp_sums: Optional[list[torch.Tensor]] = None, mtp_tokens: Optional[list[float]] = None) -> StepNumbers:
        """The step's numbers from this rank's micro-batch ``loss_sums`` (0-dim, last stage; empty elsewhere) and
        their ``label_tokens`` (``token_loss.label_tokens``; 0 off the last stage), squared gradient norm (device),
        stop request and MoE layers (``model.moe_layers()``); with MTP each micro-batch's per-depth loss sums
        (``mtp_sums``, [K] each) and the depths' label tokens (``token_loss.mtp_label_tokens``), both on the last
        stage only. Collective over the world."""
        g, E = self.groups, self.num_experts
        packed = self._pack(loss_sums, label_tokens, norm_sq, stop_requested, local_layers, mtp_sums or [],
                            mtp_tokens or [])
        packed.all_reduce(g.distributed)
        layers, counts_dev = {}, {}
        for idx in self.moe_layers:
            counts_dev[idx] = packed.device(f"layer{idx}")[:E] / self.layer_copies
            row = [v / self.layer_copies for v in packed.host(f"layer{idx}")]
            layers[idx] = LayerStepStats(
                tokens_per_expert_E=torch.tensor(row[:E], dtype=torch.float64), dropped_slots=row[E],
                aux_loss=row[E + 1] / self.micro_batches, z_loss=row[E + 2] / self.micro_batches,
                k=packed.host(f"k{idx}")[0] / (g.tp_size * g.dp_size),
                mone_kept_fraction=packed.host(f"kept{idx}")[0] / (g.tp_size * g.dp_size) if self.mone else None)
        norm_sq_v = packed.host("norm_sq")[0] / g.world_size
        mtp_loss = None
        if self.mtp_depths:  # TP peers add identical pairs: the factor cancels in each division
            means = [s / max(n, 1.0) for s, n in zip(packed.host("mtp_sum"), packed.host("mtp_tokens"))]
            mtp_loss = self.mtp_loss_coeff * sum(means) / len(means)
        return StepNumbers(loss=token_mean(packed),
                           grad_norm=math.sqrt(norm_sq_v) if math.isfinite(norm_sq_v) else float("nan"),
                           stop=packed.host("stop")[0] > 0, layers=layers, tokens_per_expert_dev=counts_dev,
                           mtp_loss=mtp_loss)
