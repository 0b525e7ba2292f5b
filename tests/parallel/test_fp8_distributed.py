"""torchao FP8 inside megatron-core TP linears on 2 gloo ranks vs. a single-process reference (TP=1 torchao
Float8Linear per shard)."""
import pytest
import torch
import torch.nn.functional as F

from parallel.config import FP8Config
from parallel.fp8.torchao_backend import convert_module
from tests.helpers.dist import run_distributed

D, FFN, S, B = 32, 64, 8, 2


def _data():
    g = torch.Generator().manual_seed(0)
    x_SBD, grad_SBD = torch.randn(S, B, D, generator=g), torch.randn(S, B, D, generator=g)
    w_col_FD, w_row_DF = torch.randn(FFN, D, generator=g) * 0.1, torch.randn(D, FFN, generator=g) * 0.1
    return x_SBD, grad_SBD, w_col_FD, w_row_DF


def _tp_mlp(rank, world_size, sequence_parallel, recipe):
    """Column-parallel up projection -> silu -> row-parallel down projection, both converted to FP8."""
    import torch.distributed as dist
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from parallel import cpu_compat

    cpu_compat.apply()  # megatron's sequence-parallel gather allocates on torch.cuda.current_device()
    x_SBD, grad_SBD, w_col_FD, w_row_DF = _data()
    group = dist.new_group(list(range(world_size)))
    mp = ModelParallelConfig(tensor_model_parallel_size=world_size, use_cpu_initialization=True,
                             perform_initialization=False, params_dtype=torch.float32,
                             sequence_parallel=sequence_parallel)
    col = ColumnParallelLinear(D, FFN, config=mp, init_method=lambda w: None, bias=False, gather_output=False,
                               tp_group=group)
    row = RowParallelLinear(FFN, D, config=mp, init_method=lambda w: None, bias=False, input_is_parallel=True,
                            skip_bias_add=True, tp_group=group)
    with torch.no_grad():
        col.weight.copy_(w_col_FD.chunk(world_size, 0)[rank])
        row.weight.copy_(w_row_DF.chunk(world_size, 1)[rank])
    fp8_cfg = FP8Config(recipe=recipe)
    for m in (col, row):
        assert convert_module(m, fp8_cfg) is m
    if sequence_parallel:
        x_SBD, grad_SBD = x_SBD.chunk(world_size, 0)[rank], grad_SBD.chunk(world_size, 0)[rank]
    x_SBD = x_SBD.clone().requires_grad_()
    y_SBD = row(F.silu(col(x_SBD)[0]))[0]
    y_SBD.backward(grad_SBD)
    return y_SBD.detach(), x_SBD.grad, col.weight.grad, row.weight.grad


def _reference(world_size, recipe):
    """The same math in one process: per-shard FP8 linears (each shard has its own scales, as on its rank)."""
    x_SBD, grad_SBD, w_col_FD, w_row_DF = _data()
    x_SBD = x_SBD.clone().requires_grad_()
    fp8_cfg = FP8Config(recipe=recipe)
    cols = [torch.nn.Linear(D, FFN // world_size, bias=False) for _ in range(world_size)]
    rows = [torch.nn.Linear(FFN // world_size, D, bias=False) for _ in range(world_size)]
    with torch.no_grad():
        for r in range(world_size):
            cols[r].weight.copy_(w_col_FD.chunk(world_size, 0)[r])
            rows[r].weight.copy_(w_row_DF.chunk(world_size, 1)[r])
    cols, rows = [convert_module(c, fp8_cfg) for c in cols], [convert_module(r, fp8_cfg) for r in rows]
    assert all(type(m).__name__ == "Float8Linear" for m in cols + rows)
    y_SBD = sum(rows[r](F.silu(cols[r](x_SBD))) for r in range(world_size))
    y_SBD.backward(grad_SBD)
    y_fp32 = F.linear(F.silu(F.linear(x_SBD.detach(), w_col_FD)), w_row_DF)
    return y_SBD.detach(), x_SBD.grad, [c.weight.grad for c in cols], [r.weight.grad for r in rows], y_fp32


@pytest.mark.parametrize("sequence_parallel, recipe", [(False, "tensorwise"), (False, "rowwise"),
                                                       (True, "tensorwise")])
def test_tp_fp8_matches_single_process(sequence_parallel, recipe):
    world = 2
    results = run_distributed(_tp_mlp, world, sequence_parallel, recipe)
    y_ref, dx_ref, dw_col_ref, dw_row_ref, y_fp32 = _reference(world, recipe)
    tol = dict(rtol=1e-5, atol=1e-5)
    if sequence_parallel:  # each rank holds its slice of the sequence (and of the input gradient)
        torch.testing.assert_close(torch.cat([r[0] for r in results]), y_ref, **tol)
        torch.testing.assert_close(torch.cat([r[1] for r in results]), dx_ref, **tol)
    else:
        for y, dx, _, _ in results:
            torch.testing.assert_close(y, y_ref, **tol)
            torch.testing.assert_close(dx, dx_ref, **tol)
    for rank, (_, _, dw_col, dw_row) in enumerate(results):
        torch.testing.assert_close(dw_col, dw_col_ref[rank], **tol)
        torch.testing.assert_close(dw_row, dw_row_ref[rank], **tol)
    assert 0 < float((y_ref - y_fp32).norm() / y_fp32.norm()) < 0.08  # FP8 really ran, and is close to fp32
