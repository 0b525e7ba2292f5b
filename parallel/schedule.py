"""Pipeline schedules from megatron-core (``megatron.core.pipeline_parallel.schedules.get_forward_backward_func``):
no pipelining at PP = 1, 1F1B at PP > 1, interleaved 1F1B with ``parallel.virtual_pp`` > 1 model chunks per rank.

megatron-core's schedules were picked over ``torch.distributed.pipelining`` because they take every process group
explicitly (``pg_collection``, ``p2p_communicator``), run a model chunk through a plain forward-step function (our
token-weighted loss and the MTP ``(loss, extra)`` output pass through unchanged) and are what Megatron-LM trains
MoE models with (docs/architecture.md). The schedule runs on CPU/gloo with the ``parallel/cpu_compat.py`` patches.

Activations cross stages in the compute dtype (``pipeline_dtype``), in megatron-core's ``[S, B, D]`` order: a
chunk's hidden output ``[B, S, D]`` is transposed for the wire and back on arrival, a sequence-parallel token shard
``[T, D]`` (``parallel.model.activation_shape``) travels as ``[T, 1, D]`` (data movement only).

Loss semantics (``launcher/train/token_loss.py``): the last chunk's output per micro-batch, a loss sum (or
``(loss sum, extra)``), becomes ``loss * loss_scale (+ extra)`` before its backward (megatron-core's per-token-loss
path, ``calculate_per_token_loss``, leaves it unscaled); the MoE aux-loss scale (``AuxLossAutoScaler``) is
1/micro-batches while the schedule runs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Union

import torch
from torch import nn

from moe_core.aux_loss import AuxLossAutoScaler
from parallel import cpu_compat
from parallel.comm import check_group
from parallel.groups import ParallelGroups

# forward_fn(chunk, micro_batch, input_BSD_or_None) -> hidden [B,S,D] or, on the last chunk, a loss scalar or
# (loss scalar, extra scaled objective scalar)
ForwardFn = Callable[[nn.Module, dict, Optional[torch.Tensor]],
                     Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]


def _schedule_config(groups: ParallelGroups, virtual_pp: int, hidden_size: int, dtype: torch.dtype):
    """megatron-core ``ModelParallelConfig`` plus the two ``TransformerConfig`` fields its schedules read."""
    from megatron.core.model_parallel_config import ModelParallelConfig

    @dataclass
    class ScheduleConfig(ModelParallelConfig):
        hidden_size: int = 0
        calculate_per_token_loss: bool = True  # the loss function's output is used as it is (token_loss.py)

    # batch_p2p_comm=False: megatron-core's unbatched p2p (Megatron-LM's choice for interleaving) keeps the two
    # directions apart at pp = 2, where a rank's previous and next stage are the same peer: batched, gloo matched
    # an activation with a gradient receive of the same shape (wrong values, no error)
    return ScheduleConfig(pipeline_model_parallel_size=groups.pp_size, pipeline_dtype=dtype, batch_p2p_comm=False,
                          virtual_pipeline_model_parallel_size=virtual_pp if virtual_pp > 1 else None,
                          hidden_size=hidden_size, params_dtype=dtype)


class _Chunk(nn.Module):
    """One model chunk as megatron-core's schedule sees it (``config``, ``model_type``, ``set_input_tensor``)."""

    def __init__(self, chunk: nn.Module, config):
        from megatron.core.enums import ModelType

        super().__init__()
        self.chunk, self.config, self.model_type = chunk, config, ModelType.encoder_or_decoder
        self.input_SBD: Optional[torch.Tensor] = None

    def set_input_tensor(self, tensors: list) -> None:
        self.input_SBD = tensors[0]


class PipelineSchedule:
    """Runs one step's micro-batches through this rank's model chunks with megatron-core's schedule for
    ``groups.pp_size`` x ``virtual_pp``. Collective over the pipeline group."""

    def __init__(self, groups: ParallelGroups, virtual_pp: int, hidden_shape: tuple[int, ...], dtype: torch.dtype):
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
        from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
        from megatron.core.process_groups_config import ProcessGroupCollection

        cpu_compat.apply()
        self.groups, self.hidden_shape, self.dtype = groups, hidden_shape, dtype
        self.config = _schedule_config(groups, virtual_pp, hidden_shape[-1], dtype)
        self.pg_collection = ProcessGroupCollection(tp=check_group(groups.tp_group, "tp_group"),
                                                    cp=check_group(groups.cp_group, "cp_group"))
        self.p2p = None
        if groups.pp_size > 1:
            pp_group = check_group(groups.pp_group, "pp_group")
            self.pg_collection.pp = pp_group
            self.p2p = P2PCommunicator(pp_group=pp_group, config=self.config)
        self.run_schedule = get_forward_backward_func(groups.pp_size, virtual_pp if virtual_pp > 1 else None)

    def __call__(self, chunks: list[nn.Module], micro_batches: list[dict], forward_fn: ForwardFn,
                 loss_scale: Union[float, torch.Tensor] = 1.0, forward_only: bool = False,
                 no_sync: Callable[[], ContextManager] = contextlib.nullcontext) -> list[torch.Tensor]:
        """Forward (and backward) every micro-batch through ``chunks`` (this rank's, in virtual-stage order);
        returns the detached per-micro-batch losses on the rank of the last chunk, [] elsewhere. Gradients
        accumulate; every backward but each chunk's last runs inside ``no_sync()``."""
        self.config.no_sync_func = no_sync
        wrapped = [_Chunk(chunk, self.config) for chunk in chunks]
        n = len(micro_batches)
        sequence_first = len(self.hidden_shape) == 3  # [B, S, D]; else a token shard [T, D]
        B, S = self.hidden_shape[:2] if sequence_first else (1, self.hidden_shape[0])

        def to_wire(h: torch.Tensor) -> torch.Tensor:
            return (h.transpose(0, 1) if sequence_first else h.unsqueeze(1)).contiguous()

        def from_wire(x_SBD: torch.Tensor) -> torch.Tensor:
            return x_SBD.transpose(0, 1) if sequence_first else x_SBD.squeeze(1)

        def forward_step(data_iterator, model: _Chunk):
            mb = next(data_iterator)
            x = None if model.input_SBD is None else from_wire(model.input_SBD)
            out = forward_fn(model.chunk, mb, x)
            if not model.chunk.post_process:
                return to_wire(out.to(self.dtype)), None
            loss, extra = out if isinstance(out, tuple) else (out, None)

            def loss_func(loss_out):
                objective = loss_out * loss_scale if extra is None else loss_out * loss_scale + extra
                return objective, torch.zeros((), dtype=torch.int), loss_out.detach()

            return loss, loss_func

        previous = AuxLossAutoScaler.loss_scale()
        AuxLossAutoScaler.set_loss_scale(1.0 / n)
        try:
            kwargs = dict(p2p_communicator=self.p2p) if self.p2p is not None else {}
            losses = self.run_schedule(
                forward_step_func=forward_step, data_iterator=[iter(micro_batches) for _ in wrapped],
                model=wrapped, num_microbatches=n, seq_length=S, micro_batch_size=B, forward_only=forward_only,
                pg_collection=self.pg_collection, **kwargs)
        finally:  # the scale is process-global: leave it as found
            AuxLossAutoScaler.set_loss_scale(previous)
        return list(losses)
