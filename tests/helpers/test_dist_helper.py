import pytest
import torch

from tests.helpers.dist import run_distributed


def _allreduce(rank, world_size, scale):
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1) * scale])
    dist.all_reduce(t)
    return t


def _fail(rank, world_size):
    if rank == 1:
        raise RuntimeError("boom on rank 1")
    return rank


def test_run_distributed_collects_results_by_rank():
    out = run_distributed(_allreduce, 3, 2.0)
    assert [float(t) for t in out] == [12.0, 12.0, 12.0]


def test_run_distributed_reports_rank_failure():
    with pytest.raises(AssertionError, match="boom on rank 1"):
        run_distributed(_fail, 2, timeout=60)
