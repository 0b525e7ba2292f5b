"""Process groups for TP, PP, DP, EP and expert-DP — the only caller of ``megatron.core.parallel_state``.

Layout (megatron-core order ``tp-cp-ep-dp-pp``, expert tensor parallel = 1):
  dense:   world = tp x dp x pp
  experts: world = ep x edp x pp; the EP group is carved out of the tp x dp ranks of one pipeline stage.
Modules never read these globals: the trainer builds one :class:`ParallelGroups` and passes it in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelGroups:
    tp_group: Optional[dist.ProcessGroup]
    pp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]
    ep_group: Optional[dist.ProcessGroup]
    edp_group: Optional[dist.ProcessGroup]
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    edp_size: int = 1
    edp_rank: int = 0
    world_size: int = 1
    rank: int = 0
    pp_ranks: tuple[int, ...] = (0,)
    """Global ranks of this rank's pipeline group, by stage."""
    amax_group: Optional[dist.ProcessGroup] = None
    """TP x DP ranks of one pipeline stage: FP8 amaxes are reduced here (same layers on every member)."""
    embedding_group: Optional[dist.ProcessGroup] = None
    """The first and the last stage of this rank's pipeline (megatron-core's embedding group; None on the other
    stages and at PP = 1): the gradients of the embedding copies MTP puts on the last stage are summed here."""
    cp_group: Optional[dist.ProcessGroup] = None
    """megatron-core's context-parallel group (always this rank alone: moetron has no CP); its pipeline schedules
    read its size (``parallel/schedule.py``)."""

    @classmethod
    def single(cls) -> "ParallelGroups":
        """One process, no collectives: every group is ``parallel.comm.SINGLE_PROCESS`` (never None, which
        torch.distributed would read as the world)."""
        from parallel.comm import SINGLE_PROCESS

        return cls(*(SINGLE_PROCESS,) * 5, cp_group=SINGLE_PROCESS)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str = "auto", timeout_minutes: int = 30) -> None:
    """Create the default process group from torchrun/srun environment variables (idempotent)."""
    import datetime

    if dist.is_initialized():
        return
    backend = default_backend() if backend == "auto" else backend
    if backend == "nccl":
        import os

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def initialize(tp: int, pp: int, ep: int) -> ParallelGroups:
    """Initialise megatron-core model parallelism on the existing default group and return the groups."""
    from megatron.core import parallel_state as ps

    from parallel import cpu_compat

    cpu_compat.apply()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep, expert_tensor_parallel_size=1)
    pp_group = ps.get_pipeline_model_parallel_group()
    return ParallelGroups(
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=pp_group,
        dp_group=ps.get_data_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(),
        edp_group=ps.get_expert_data_parallel_group(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        edp_size=ps.get_expert_data_parallel_world_size(),
        edp_rank=ps.get_expert_data_parallel_rank(),
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        pp_ranks=tuple(dist.get_process_group_ranks(pp_group)),
        amax_group=ps.get_amax_reduction_group(),
        embedding_group=ps.get_embedding_group(check_initialized=False) if pp > 1 else None,
        cp_group=ps.get_context_parallel_group(),
    )


def destroy() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def megatron_process_groups():
    """The megatron-core ``ProcessGroupCollection`` of the groups :func:`initialize` created, for the modules that
    take one explicitly (``DistributedDataParallel``, ``get_megatron_optimizer``)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()
