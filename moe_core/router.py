"""Softmax top-k router with load-balancing losses, aux-loss-free expert bias and an optional capacity factor.

Shape legend: ``T`` tokens, ``D`` hidden, ``E`` experts, ``K`` experts per token (``k`` may change per call: M-MoE).

Numerics: all router math is fp32 whatever the input dtype (autocast is disabled inside), because softmax over
experts and the renormalised weights are sensitive to bf16 rounding and decide which experts a token reaches.

- scores ``s_TE``: ``softmax(x W^T)`` (``moe.score_function: softmax``) or ``sigmoid(x W^T)`` (``sigmoid``,
  DeepSeek-V3); ``p_TE`` = the scores normalised to sum to 1 per token (= ``s_TE`` for softmax) is what the aux
  losses balance. Selection = top-k of ``s_TE + expert_bias_E`` (the bias only changes which experts are chosen,
  DeepSeek-V3 style), inside the token's ``moe.group_topk`` best of ``moe.num_groups`` expert groups (a group
  scored by the sum of its two highest biased scores) when ``num_groups > 1``. Gates are computed from ``s_TE``
  and multiplied by ``moe.routed_scaling_factor`` after normalisation.
- gate weights (``MoEConfig.renormalise_gates``, from ``moe.norm_topk_prob``, Hugging Face's name, and
  ``moe.top1_gate``): renormalised = the chosen scores divided by their sum, at every k; at k = 1 that is exactly
  1.0, whose gradient w.r.t. the router is zero, so the value 1.0 is computed as ``p / stop_gradient(p)`` (a
  straight-through gate: the router learns through ``log p``, and the output scale is the same at every k, so a
  top-2 model evaluated at k = 1 does not lose its scale). Raw = the chosen scores themselves (``norm_topk_prob``
  false, the Matryoshka default: a further expert adds its term; or a top-1 model with ``top1_gate:
  probability``, the Switch Transformer's gate, arXiv 2101.03961). Measured in docs/benchmarks.md ("Matryoshka
  fidelity").
- aux loss (Switch/megatron-core): ``coeff * E * sum_e f_e * P_e`` with ``f_e`` the fraction of the routed slots
  that chose e (before dropping) and ``P_e`` the mean over this micro-batch's tokens of ``p_te``; equals ``coeff``
  when balanced. ``moe.aux_loss_scope`` says whose slots ``f_e`` counts: ``micro_batch`` = this micro-batch's T*K;
  ``global_batch`` (arXiv 2501.11873, as Qwen3-MoE trains) = the step's global batch: the counts are summed over
  the data-parallel ranks by ``count_reducer`` (installed by parallel/, collective-only) and accumulated over the
  step's micro-batches, so micro-batch m of a step uses micro-batches 1..m of every DP rank and the last one the
  whole global batch (megatron-core's ``global_aux_loss`` does the same). :meth:`TopKRouter.start_step` resets it.
- ``moe.aux_loss_scope: sequence`` (DeepSeek-V3 eq. 17-20): the same product per sequence, with ``f_e`` the
  sequence's share of slots times ``E`` (``E / (K S)`` times its count) and ``P_e`` the sequence's mean of
  ``p``; averaged over the micro-batch's sequences (:func:`sequence_aux_loss`).
- z-loss (ST-MoE): ``coeff * mean_t logsumexp(logits_t)^2``.
- sequence parallelism (``TopKRouter.shard``, a :class:`SequenceShard` installed by parallel/): the router sees one
  of ``count`` equal pieces of the micro-batch's tokens. Slot counts (per sequence for ``sequence``) are summed over
  the pieces first, and every mean over tokens divides by the whole micro-batch's tokens, so each piece's aux and
  z losses are its share: the pieces' losses and gradients add up to the whole micro-batch's. The capacity
  factor's drop choice is made over the whole micro-batch's scores (gathered), as without the split.
- no tokens (an empty micro-batch or pipeline chunk): aux and z losses are exactly 0 with zero gradient.
- capacity factor: each expert keeps at most ``ceil(capacity_factor * T * K / E)`` slots, the ones with the highest
  router score (megatron-core's default drop policy); dropped slots get id -1 and weight 0 (the remaining
  weights are not renormalised again). ``None`` = dropless.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_core.config import MoEConfig
from moe_core.recompute import first_pass_value


@dataclass
class RouterOutput:
    topk_idx_TK: torch.Tensor
    """int64 expert ids; -1 marks a slot dropped by the capacity factor."""
    topk_weight_TK: torch.Tensor
    """fp32 gate weights (renormalised over the selected experts per moe.norm_topk_prob); 0 where dropped."""
    aux_loss: torch.Tensor
    """Scalar load-balancing loss, already multiplied by moe.aux_loss_coeff."""
    z_loss: torch.Tensor
    """Scalar router z-loss, already multiplied by moe.z_loss_coeff."""
    tokens_per_expert_E: torch.Tensor
    """int64 routed slots per expert before capacity dropping (metrics, expert-bias update)."""


CountReducer = Callable[[torch.Tensor], torch.Tensor]
"""Sums a count vector over the ranks that share a global batch (collective-only); identity on one device."""


@dataclass(frozen=True)
class SequenceShard:
    """Which piece of the micro-batch the router sees under sequence parallelism: the micro-batch's ``B * seq_len``
    tokens, flattened batch-major, split into ``count`` equal contiguous pieces, this one number ``index``.
    ``reduce`` sums a tensor over the devices holding the pieces, ``gather`` concatenates their pieces of a tensor
    along dim 0 in piece order (both collective-only, no gradient)."""

    index: int
    count: int
    seq_len: int
    reduce: CountReducer
    gather: CountReducer

    def pad(self, x_T: torch.Tensor) -> torch.Tensor:
        """``x_T`` [t, ...] of this piece placed in zeros of the whole micro-batch's [t * count, ...]."""
        rows = x_T.shape[0]
        return F.pad(x_T, (0, 0) * (x_T.dim() - 1) + (rows * self.index, rows * (self.count - 1 - self.index)))


def switch_aux_loss(probs_TE: torch.Tensor, frac_routed_E: torch.Tensor,
                    num_tokens: Optional[int] = None) -> torch.Tensor:
    """Uncoefficiented Switch load-balancing loss ``E * sum_e f_e * mean_t p_te`` for slot fractions ``f_e``
    (detached counts); the mean divides by ``num_tokens`` (default: the rows of ``probs_TE``; more when they are
    one sequence-parallel piece); 0 when there are no tokens."""
    num_experts = probs_TE.shape[1]
    num_tokens = probs_TE.shape[0] if num_tokens is None else num_tokens
    mean_prob_E = probs_TE.sum(0) / max(num_tokens, 1)  # sum over no rows is 0 (mean would be NaN)
    return num_experts * (frac_routed_E.to(probs_TE.dtype) * mean_prob_E).sum()


def group_limited_mask(select_TE: torch.Tensor, num_groups: int, group_topk: int) -> torch.Tensor:
    """bool ``[T, E]``: the experts of each token's ``group_topk`` best groups (``E / num_groups`` contiguous
    experts each), a group scored by the sum of its two highest selection scores (DeepSeek-V3; one score for
    groups of one expert)."""
    num_tokens, num_experts = select_TE.shape
    per_group = num_experts // num_groups
    grouped_TGe = select_TE.view(num_tokens, num_groups, per_group)
    group_score_TG = grouped_TGe.topk(min(2, per_group), dim=-1).values.sum(-1)
    chosen_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(
        1, torch.topk(group_score_TG, group_topk, dim=-1).indices, True)
    return chosen_TG.repeat_interleave(per_group, dim=1)


def sequence_aux_loss(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, seq_len: int,
                      shard: Optional[SequenceShard] = None) -> torch.Tensor:
    """Uncoefficiented sequence-wise balance loss (DeepSeek-V3 eq. 17-20), averaged over the ``T / seq_len``
    sequences: ``sum_e f_e P_e`` with ``f_e = E / (K * S) * (tokens of the sequence choosing e)`` (detached) and
    ``P_e`` the sequence's mean of the normalised scores ``probs_TE``. 1 when balanced; 0 when there are no
    tokens. With ``shard`` the rows are one sequence-parallel piece: the counts are summed over the pieces and
    the result is this piece's share. Raises ValueError when ``T`` is not a multiple of ``seq_len``."""
    num_tokens, num_experts = probs_TE.shape
    if num_tokens == 0:
        return probs_TE.sum()
    chosen_TE = torch.zeros_like(probs_TE).scatter_(1, topk_idx_TK, 1.0)
    if shard is not None:  # this piece's rows in place among the micro-batch's (zeros elsewhere)
        chosen_TE, probs_TE, num_tokens = shard.pad(chosen_TE), shard.pad(probs_TE), num_tokens * shard.count
    if num_tokens % seq_len:
        raise ValueError(f"sequence-wise aux loss: {num_tokens} tokens are not whole sequences of {seq_len}")
    k = topk_idx_TK.shape[1]
    counts_BE = chosen_TE.view(-1, seq_len, num_experts).sum(1)
    if shard is not None:
        counts_BE = shard.reduce(counts_BE)
    frac_BE = counts_BE * (num_experts / (k * seq_len))
    return (frac_BE * probs_TE.view(-1, seq_len, num_experts).mean(1)).sum(-1).mean()


def gate_weights(topk_prob_TK: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """fp32 ``[T, K]`` gate weights from the selected router scores (module docstring): renormalised over the
    chosen experts when ``cfg.renormalise_gates`` (at k = 1 the value 1.0 with the gradient of ``log p``), else
    the raw scores."""
    if not cfg.renormalise_gates:
        return topk_prob_TK
    if topk_prob_TK.shape[1] == 1:
        return topk_prob_TK / topk_prob_TK.detach()  # value 1.0, gradient of log p: the router keeps learning
    return topk_prob_TK / topk_prob_TK.sum(-1, keepdim=True)


def _no_reduction(counts: torch.Tensor) -> torch.Tensor:
    return counts


def z_loss(logits_TE: torch.Tensor, num_tokens: Optional[int] = None) -> torch.Tensor:
    """Uncoefficiented router z-loss ``mean_t logsumexp(logits_t)^2``, the mean over ``num_tokens`` (default: the
    rows); 0 when there are no tokens."""
    num_tokens = logits_TE.shape[0] if num_tokens is None else num_tokens
    return torch.logsumexp(logits_TE, dim=-1).square().sum() / max(num_tokens, 1)


def capacity_keep_mask(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, capacity: int) -> torch.Tensor:
    """bool ``[T, K]``: which routed slots survive when each expert keeps its ``capacity`` most probable tokens."""
    if capacity >= probs_TE.shape[0]:  # no expert can receive more tokens than there are
        return torch.ones_like(topk_idx_TK, dtype=torch.bool)
    routed_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(1, topk_idx_TK, True)
    ranked_TE = torch.where(routed_TE, probs_TE, torch.full_like(probs_TE, -1.0))
    keep_rows_CE = torch.topk(ranked_TE, capacity, dim=0).indices
    keep_TE = torch.zeros_like(routed_TE).scatter_(0, keep_rows_CE, True) & routed_TE
    return keep_TE.gather(1, topk_idx_TK)


class TopKRouter(nn.Module):
    """``forward(x_TD, k) -> RouterOutput``. Parameter ``weight`` [E, D] (like HF Qwen3-MoE ``mlp.gate.weight``),
    buffer ``expert_bias`` [E] fp32 (all zeros and unused unless ``moe.expert_bias``)."""

    def __init__(self, hidden: int, num_experts: int, cfg: MoEConfig):
        super().__init__()
        self.hidden, self.num_experts, self.cfg = hidden, num_experts, cfg
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.count_reducer: CountReducer = _no_reduction
        self.shard: Optional[SequenceShard] = None
        """Sequence parallelism: the piece of each micro-batch this router sees (module docstring); None = all."""
        self._step_slots_E1: Optional[torch.Tensor] = None
        """global_batch scope: [E + 1] routed slots per expert and in total, this step's micro-batches so far."""
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)
        self.expert_bias.zero_()

    def _apply(self, fn, recurse=True):
        # .to(bf16)/.half() would round the expert bias, and its small updates (rate ~1e-3) would then vanish in
        # bf16; keep the exact fp32 values and only follow device moves (megatron-core keeps it fp32 as well).
        bias_fp32 = self.expert_bias
        super()._apply(fn, recurse)
        if bias_fp32.is_meta:  # materialising a meta-built model (to_empty): no values to keep yet
            self.expert_bias = self.expert_bias.float()
        else:
            self.expert_bias = bias_fp32.to(device=self.expert_bias.device, dtype=torch.float32)
        return self

    def start_step(self) -> None:
        """A new optimizer step begins: the global-batch slot counts start from zero."""
        self._step_slots_E1 = None

    def balance_fractions(self, tokens_per_expert_E: torch.Tensor, num_tokens: int, k: int) -> torch.Tensor:
        """``f_e`` of the aux loss (module docstring): this micro-batch's slot fractions, or under
        ``global_batch`` in training those of the step so far over every DP rank (collective through
        ``count_reducer``)."""
        slots_E1 = torch.cat([tokens_per_expert_E, tokens_per_expert_E.new_full((1,), num_tokens * k)]).float()
        if self.shard is not None:
            slots_E1 = self.shard.reduce(slots_E1)
        if self.cfg.aux_loss_scope == "global_batch" and self.training:
            slots_E1 = first_pass_value(functools.partial(self._accumulate_step_slots, slots_E1))
        return slots_E1[:-1] / slots_E1[-1].clamp_min(1)

    def _accumulate_step_slots(self, slots_E1: torch.Tensor) -> torch.Tensor:
        """This micro-batch's ``[E + 1]`` slot counts summed over DP (``count_reducer``) plus the step's earlier
        ones; recorded as the step's counts so far. A recomputed forward replays the first pass's result
        (``moe_core.recompute.first_pass_value``): nothing is counted or all-reduced twice."""
        slots_E1 = self.count_reducer(slots_E1)
        if self._step_slots_E1 is not None:
            slots_E1 = slots_E1 + self._step_slots_E1
        self._step_slots_E1 = slots_E1
        return slots_E1

    def capacity(self, num_tokens: int, k: int) -> int | None:
        """Slots each expert may keep, or None when dropless."""
        if self.cfg.capacity_factor is None:
            return None
        return math.ceil(self.cfg.capacity_factor * num_tokens * k / self.num_experts)

    def select(self, scores_TE: torch.Tensor, k: int) -> torch.Tensor:
        """int64 ``[T, k]`` chosen experts: top-k of the (biased) scores, inside each token's ``group_topk`` best
        groups when ``moe.num_groups > 1``. No gradient flows through the choice."""
        select_TE = (scores_TE + self.expert_bias if self.cfg.expert_bias else scores_TE).detach()
        if self.cfg.num_groups > 1:
            select_TE = select_TE.masked_fill(~group_limited_mask(select_TE, self.cfg.num_groups,
                                                                  self.cfg.group_topk), float("-inf"))
        return torch.topk(select_TE, k, dim=-1).indices

    def aux_loss(self, probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                 seq_len: Optional[int]) -> torch.Tensor:
        """The load-balancing loss of ``moe.aux_loss_scope``, times ``moe.aux_loss_coeff``."""
        num_tokens, k = topk_idx_TK.shape
        if self.cfg.aux_loss_scope == "sequence":
            seq_len = self.shard.seq_len if self.shard is not None else seq_len or num_tokens
            loss = sequence_aux_loss(probs_TE, topk_idx_TK, seq_len, self.shard)
        else:
            loss = switch_aux_loss(probs_TE, self.balance_fractions(tokens_per_expert_E, num_tokens, k),
                                   self.micro_batch_tokens(num_tokens))
        return self.cfg.aux_loss_coeff * loss

    def keep_mask(self, scores_TE: torch.Tensor, topk_idx_TK: torch.Tensor, capacity: int) -> torch.Tensor:
        """:func:`capacity_keep_mask` of this router's tokens, chosen among the whole micro-batch's (under sequence
        parallelism the pieces' scores and choices are gathered first: collective)."""
        if self.shard is None:
            return capacity_keep_mask(scores_TE, topk_idx_TK, capacity)
        keep_TK = capacity_keep_mask(self.shard.gather(scores_TE), self.shard.gather(topk_idx_TK), capacity)
        return keep_TK.narrow(0, self.shard.index * scores_TE.shape[0], scores_TE.shape[0])

    def micro_batch_tokens(self, num_tokens: int) -> int:
        """Tokens of the whole micro-batch when this router sees ``num_tokens`` of them."""
        return num_tokens * (self.shard.count if self.shard is not None else 1)

    def forward(self, x_TD: torch.Tensor, k: int, seq_len: Optional[int] = None) -> RouterOutput:
        """Route ``x_TD`` (rows = tokens; ``seq_len`` consecutive rows per sequence, for the sequence-wise loss;
        None = one sequence) to ``k`` experts each."""
        if x_TD.dim() != 2 or x_TD.shape[1] != self.hidden:
            raise ValueError(f"router expects x of shape [T, {self.hidden}], got {tuple(x_TD.shape)}")
        if not 1 <= k <= self.num_experts:
            raise ValueError(f"router k={k} must be in [1, num_experts={self.num_experts}]")
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
            if self.cfg.score_function == "sigmoid":
                scores_TE = torch.sigmoid(logits_TE)
                probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)  # what the aux losses balance
            else:
                scores_TE = probs_TE = torch.softmax(logits_TE, dim=-1)
            topk_idx_TK = self.select(scores_TE, k)
            topk_weight_TK = gate_weights(scores_TE.gather(1, topk_idx_TK), self.cfg) * self.cfg.routed_scaling_factor
            tokens_per_expert_E = torch.zeros(self.num_experts, dtype=torch.int64, device=x_TD.device).scatter_add_(
                0, topk_idx_TK.reshape(-1), torch.ones_like(topk_idx_TK.reshape(-1)))  # no host sync (bincount syncs)
            aux = self.aux_loss(probs_TE, topk_idx_TK, tokens_per_expert_E, seq_len)
            zl = self.cfg.z_loss_coeff * z_loss(logits_TE, self.micro_batch_tokens(x_TD.shape[0]))
            capacity = self.capacity(self.micro_batch_tokens(x_TD.shape[0]), k)
            if capacity is not None:
                keep_TK = self.keep_mask(scores_TE.detach(), topk_idx_TK, capacity)
                topk_idx_TK = torch.where(keep_TK, topk_idx_TK, torch.full_like(topk_idx_TK, -1))
                topk_weight_TK = topk_weight_TK * keep_TK
        return RouterOutput(topk_idx_TK, topk_weight_TK, aux, zl, tokens_per_expert_E)

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """Aux-loss-free balancing step (DeepSeek-V3): ``bias += rate * sign(mean_load - load)``.

        Pass counts summed over every rank that routes with this router (the trainer all-reduces them first),
        so all replicas apply the same update.
        """
        if not self.cfg.expert_bias:
            raise RuntimeError("update_expert_bias called but moe.expert_bias is false; enable it in the config")
        if tokens_per_expert_E.shape != (self.num_experts,):
            raise ValueError(f"tokens_per_expert must have shape ({self.num_experts},), "
                             f"got {tuple(tokens_per_expert_E.shape)}")
        load_E = tokens_per_expert_E.to(self.expert_bias.device, torch.float32)
        self.expert_bias += self.cfg.expert_bias_update_rate * torch.sign(load_E.mean() - load_E)
