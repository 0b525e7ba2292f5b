"""Attach auxiliary losses to an activation so their gradient flows without being added to the main loss.

``y = AuxLossAutoScaler.apply(y, aux_loss)`` returns ``y`` unchanged; in backward it returns ``grad_y`` for ``y``
and ``scale`` for ``aux_loss`` (i.e. d(total)/d(aux) = scale), so the aux loss' parameter gradients are injected
wherever ``y``'s backward runs. Pipeline schedules therefore never carry the aux loss between stages.

``scale`` is process-wide: the pipeline schedule calls ``AuxLossAutoScaler.set_loss_scale(1 / num_microbatches)``
(times any loss scaler factor), so each micro-batch's aux loss (a mean over its own tokens, not a token loss) is
averaged over the step's micro-batches, whatever scale the main loss gets. Default 1.0.
Forward reads it into ``ctx`` (under ``torch.compile`` a guard on its value, which changes only with the number of
micro-batches). Mirrors megatron-core's ``MoEAuxLossAutoScaler``.
"""
from __future__ import annotations

import torch


class _Scale:
    """The process-wide d(total)/d(aux_loss) (a plain object: torch.compile cannot read a Function's class data)."""

    value: float = 1.0


class AuxLossAutoScaler(torch.autograd.Function):

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.loss_scale = _Scale.value
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.ones_like(aux_loss) * ctx.loss_scale

    @staticmethod
    def set_loss_scale(scale: float | torch.Tensor) -> None:
        """Set the gradient d(total)/d(aux_loss) used by every later forward's backward (e.g.
        1 / num_microbatches)."""
        _Scale.value = float(scale)

    @staticmethod
    def loss_scale() -> float:
        return _Scale.value
