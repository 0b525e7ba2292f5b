"""The experts' grouped FP8 GEMM on CPU: the sync-free 16-row padding, and the emulation against real FP8 GEMMs
(CPU ``torch._scaled_mm``) of operands quantised with torchao's scale/cast functions (``tensor_to_scale``,
``to_fp8_saturated``), forward and backward, along the axes torchao's CUDA op uses."""
import pytest
import torch
from torchao.float8.config import ScalingGranularity
from torchao.float8.float8_utils import tensor_to_scale, to_fp8_saturated

from parallel.fp8.grouped import PaddedGroups, fp8_grouped_mm

E4M3 = torch.float8_e4m3fn
BF16 = dict(rtol=2 ** -7, atol=1e-5)  # the GEMM output is rounded to bf16 after fp32 sums in another order


def test_padded_layout_hand_computed():
    counts_E = torch.tensor([5, 0, 17, 3])  # 25 live rows, then 5 dead rows
    groups = PaddedGroups.build(counts_E, 30)
    assert groups.offs_E.dtype == torch.int32 and groups.offs_E.tolist() == [16, 16, 48, 64]
    assert groups.num_padded_rows == 30 + 16 * 4
    assert groups.dest_N.tolist() == ([0, 1, 2, 3, 4] + list(range(16, 33)) + [48, 49, 50]  # groups at 0, 16, 48
                                      + list(range(64, 69)))                                 # dead rows: the tail
    x_ND = torch.randn(30, 16)
    x_PD = groups.pad(x_ND)
    torch.testing.assert_close(groups.unpad(x_PD), x_ND, rtol=0, atol=0)
    pad_rows = torch.ones(x_PD.shape[0], dtype=torch.bool)
    pad_rows[groups.dest_N] = False
    assert x_PD[pad_rows].abs().sum() == 0  # pad rows are zero: nothing enters a product or a weight gradient


@pytest.mark.parametrize("counts", [[0, 0, 0], [16, 32, 0], [1, 15, 17]])
def test_padded_layout_aligns_every_group(counts):
    counts_E = torch.tensor(counts)
    groups = PaddedGroups.build(counts_E, sum(counts) + 2)
    ends = groups.offs_E.tolist()
    starts = [0] + ends[:-1]
    assert all(s % 16 == 0 and e - s == -(-c // 16) * 16 for s, e, c in zip(starts, ends, counts))
    for e, (start, count) in enumerate(zip(starts, counts)):  # each group's rows keep their order at its start
        first = sum(counts[:e])
        assert groups.dest_N[first:first + count].tolist() == list(range(start, start + count))
    assert len(set(groups.dest_N.tolist())) == len(groups.dest_N) and max(groups.dest_N) < groups.num_padded_rows


def _rowwise(t, dim):
    scale = tensor_to_scale(t, E4M3, scaling_granularity=ScalingGranularity.AXISWISE, axiswise_dim=dim,
                            round_scales_to_power_of_2=True)
    return to_fp8_saturated(t.float() * scale, E4M3), scale


def _spread(*shape):
    """Random values whose magnitudes span 10^-2..10^2 along every axis: a scale taken along the wrong axis then
    saturates or flushes some of them, so only the right axes reproduce the reference."""
    t = torch.randn(*shape)
    for dim, n in enumerate(shape):
        t = t * (10 ** torch.empty(n).uniform_(-2, 2)).reshape([n if d == dim else 1 for d in range(len(shape))])
    return t


def _case():
    torch.manual_seed(0)
    counts_E = torch.tensor([20, 0, 9, 35])
    groups = PaddedGroups.build(counts_E, 64)
    x_PI = groups.pad(_spread(64, 32)).requires_grad_()
    w_EOI = _spread(4, 48, 32).requires_grad_()
    return groups, x_PI, w_EOI


def test_emulated_gemm_equals_scaled_mm_of_torchao_quantised_operands():
    groups, x_PI, w_EOI = _case()
    y_PO = fp8_grouped_mm(x_PI, w_EOI, groups.offs_E)
    g_PO = _spread(*y_PO.shape).bfloat16().float()  # the op's output, hence its gradient, is bf16
    dx_PI, dw_EOI = torch.autograd.grad(y_PO, (x_PI, w_EOI), g_PO)

    x, g, offs = x_PI.detach(), g_PO, groups.offs_E
    xq, x_s = _rowwise(x, -1)                                                              # forward: x per row
    w_fwd_q, w_fwd_s = _rowwise(w_EOI.detach(), -1)                                        # w_EIO per out column
    gq, g_s = _rowwise(g, -1)                                                              # dgrad: g per row
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end == start:
            assert dw_EOI[e].abs().sum() == 0  # an empty expert gets no weight gradient
            continue
        rows = slice(start, end)
        y_ref = torch._scaled_mm(xq[rows], w_fwd_q[e].t(), scale_a=x_s[rows].reciprocal(),
                                 scale_b=w_fwd_s[e].t().reciprocal(), out_dtype=torch.float32)
        torch.testing.assert_close(y_PO[rows].float(), y_ref.bfloat16().float(), **BF16)
        w_dg_q, w_dg_s = _rowwise(w_EOI.detach()[e], 0)                                   # dgrad: w per input col
        dx_ref = torch._scaled_mm(gq[rows], w_dg_q.t().contiguous().t(), scale_a=g_s[rows].reciprocal(),
                                  scale_b=w_dg_s.reciprocal(), out_dtype=torch.float32)
        torch.testing.assert_close(dx_PI[rows].float(), dx_ref.bfloat16().float(), **BF16)
        g_wq, g_ws = _rowwise(g[rows], 0)                                                  # wgrad: per group, col
        x_wq, x_ws = _rowwise(x[rows], 0)
        dw_ref = torch._scaled_mm(g_wq.t().contiguous(), x_wq.t().contiguous().t(), scale_a=g_ws.t().reciprocal(),
                                  scale_b=x_ws.reciprocal(), out_dtype=torch.float32)
        torch.testing.assert_close(dw_EOI[e].float(), dw_ref.bfloat16().float(), **BF16)
        start = end
