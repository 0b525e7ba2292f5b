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

The MoE aux and z losses are not token losses: each stays its micro-batch's mean, scaled by 1/micro-batches
(``parallel/pipeline.py`` sets ``AuxLossAutoScaler``) and averaged over DP by the gradient reduction.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.distributed as dist

from parallel.groups import ParallelGroups

__all__ = ["gradient_scale", "label_tokens"]


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
