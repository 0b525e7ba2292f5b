"""The language-model loss of a training step or a validation pass: the token-weighted mean of the masked per-token
cross-entropy over the whole global batch (megatron-core's ``calculate_per_token_loss``)::

    L = sum over every micro-batch of every DP rank of sum_t(loss_mask_t * ce_t)  /  N,   N = sum of every loss_mask

so every label token weighs the same whatever the micro-batch size, the number of micro-batches or the DP/PP
layout (a mean of per-micro-batch means would weigh a micro-batch holding a short, padded sample like a full one).

Training: a micro-batch's last-stage output is its loss SUM (``Trainer._forward``); the pipeline multiplies it by
:func:`gradient_scale` = dp / N before backward and the data-parallel gradient reduction averages over the dp ranks
(``parallel/optim/grads.py``, ``parallel/optim/optimizer.py``), so the gradient is exactly dL/dθ. N is counted on
the host from the loss masks as the loader delivers them (CPU tensors, before they are copied to the device: no
device work, no host sync); with DP > 1 the ranks' counts are summed over DP by an all-reduce on the device that
the host never reads (the scale stays a device tensor).

Reporting: (loss sum, label tokens) are carried through micro-batches, stages and DP ranks as a pair of slots of
one :class:`~launcher.train.step_reduce.PackedSum` (the training step's single all-reduce and host read) and
divided once (``step_reduce.pack_token_loss``, ``step_reduce.token_mean``).

Multi-token prediction (``model.mtp_num_layers`` = K > 0, moe_core/mtp.py) adds, in training only, the same
convention per depth: ``L_k = sum of mask_k * ce_k / N_k`` with ``mask_k`` the loss mask shifted k positions
(positions whose target lies outside the sample count 0) and ``N_k`` its global sum (:func:`mtp_label_tokens`), and
the objective ``L + mtp_loss_coeff * mean_k L_k``. Each micro-batch's depth sums are multiplied by
:func:`mtp_gradient_scales` (``coeff / K * dp / N_k``) and added to the backward as they are (the pipeline's
``(loss, extra)`` output); ``train/mtp_loss`` reports ``coeff * mean_k L_k`` (the pairs ride in the step's one
all-reduce). Validation and ``train/loss`` stay the main loss.

The MoE aux and z losses are not token losses: each stays its micro-batch's mean, scaled by 1/micro-batches
(``parallel/schedule.py`` sets ``AuxLossAutoScaler``) and averaged over DP by the gradient reduction.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from moe_core.mtp import depth_targets
from parallel.groups import ParallelGroups

__all__ = ["gradient_scale", "label_tokens", "mtp_gradient_scales", "mtp_label_tokens", "mtp_loss_sums"]


def label_tokens(micro_batches: Sequence[dict]) -> float:
    """Label tokens of micro-batches as the loader yields them (CPU tensors): the ones of each ``loss_mask_BS``
    (float32 0/1), or every label of a batch without one. Counted with numpy on the host; a device tensor raises
    TypeError (counting it would be a host sync)."""
    return float(sum(mb["loss_mask"].numpy().sum(dtype="float64") if "loss_mask" in mb else mb["labels"].numel()
                     for mb in micro_batches))


def gradient_scale(local_tokens: float, groups: ParallelGroups,
                   device: torch.device) -> Union[float, torch.Tensor]:
    """The factor each micro-batch's loss sum is multiplied by before backward: dp / N, N the step's label tokens
    over the DP group (``local_tokens`` is this rank's share; at least 1 is assumed). DP = 1: a float. DP > 1: a
    0-dim fp32 tensor on ``device``, the counts summed over the DP group on the device without a host read
    (collective over the last stage's DP groups). Other stages hold no loss: 1.0, no communication."""
    if not groups.is_last_stage:
        return 1.0
    if groups.dp_size == 1:
        return 1.0 / max(local_tokens, 1.0)
    total = torch.full((), local_tokens, dtype=torch.float64, device=device)  # a fill: no host-to-device copy
    dist.all_reduce(total, group=groups.dp_group)
    return (groups.dp_size / total.clamp_min(1.0)).float()


def mtp_label_tokens(micro_batches: Sequence[dict], depths: int) -> list[float]:
    """Label tokens of each MTP depth k = 1..``depths`` in micro-batches as the loader yields them (CPU tensors):
    the ones of ``loss_mask_BS[:, k:]`` (or ``S - k`` per sample without a mask), i.e. the positions whose depth-k
    target lies inside the sample. Counted with numpy on the host, like :func:`label_tokens`."""
    out = []
    for k in range(1, depths + 1):
        out.append(float(sum(mb["loss_mask"][:, k:].numpy().sum(dtype="float64") if "loss_mask" in mb
                             else mb["labels"][:, k:].numel() for mb in micro_batches)))
    return out


def mtp_gradient_scales(local_tokens_K: Sequence[float], coeff: float, groups: ParallelGroups,
                        device: torch.device) -> torch.Tensor:
    """fp32 [K] on ``device``: the factor each micro-batch's depth-k loss sum is multiplied by, ``coeff / K * dp /
    N_k`` (N_k: depth k's label tokens over the DP group, at least 1; ``local_tokens_K`` is this rank's share). Made
    of device fills (no host-to-device copy); at DP > 1 the counts are summed over the DP group on the device
    without a host read (collective over the last stage's DP groups). Call it on the last stage only."""
    total = torch.stack([torch.full((), n, dtype=torch.float64, device=device) for n in local_tokens_K])
    if groups.dp_size > 1:
        dist.all_reduce(total, group=groups.dp_group)
    return (coeff / len(local_tokens_K) * groups.dp_size / total.clamp_min(1.0)).float()


def mtp_loss_sums(mtp_logits: Sequence[torch.Tensor], labels_BS: torch.Tensor, loss_mask_BS: Optional[torch.Tensor],
                  token_losses: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fp32 [K]: for each MTP depth k = 1..K (``mtp_logits[k - 1]``, [B, S, V] or its TP vocab shard) the sum of
    ``mask_k * ce_k`` over the micro-batch, with depth k's labels and mask (``moe_core.mtp.depth_targets``: shifted
    k positions, 0 past the sample) and ``token_losses(logits, labels) -> [B, S]`` fp32 per-token cross-entropy."""
    sums = []
    for depth, logits_k in enumerate(mtp_logits, start=1):
        labels_k, mask_k = depth_targets(labels_BS, loss_mask_BS, depth)
        sums.append((token_losses(logits_k, labels_k) * mask_k).sum())
    return torch.stack(sums)
