"""Grouped SwiGLU experts vs the dense per-expert reference (outputs and gradients)."""
import pytest
import torch

from moe_core.config import MoNEConfig
from moe_core.experts import SwiGLUExperts, swiglu_reference
from kernels.grouped_gemm import grouped_linear, grouped_matmul, grouped_mm_usable, grouped_weight_grad, loop_linear

SPLITS = [3, 0, 5, 2]  # includes an expert that received no tokens
COUNTS = torch.tensor(SPLITS)  # as the API takes them: int64 on the token device


def _experts(dtype=torch.float32, **mone) -> SwiGLUExperts:
    torch.manual_seed(0)
    return SwiGLUExperts(len(COUNTS), 8, 16, MoNEConfig(**mone)).to(dtype)


def _grads(fn, x, weights, grad_out):
    x = x.detach().clone().requires_grad_()
    weights = [w.detach().clone().requires_grad_() for w in weights]
    y = fn(x, COUNTS, *weights)
    y.backward(grad_out)
    return y, x.grad, [w.grad for w in weights]


def _compare(fn, dtype, atol, rtol):
    experts = _experts(dtype)
    x = torch.randn(sum(SPLITS), 8, dtype=dtype)
    weights = [experts.w_gate_EFD, experts.w_up_EFD, experts.w_down_EDF]
    grad_out = torch.randn(sum(SPLITS), 8, dtype=dtype)
    y, dx, dws = _grads(fn, x, weights, grad_out)
    y_ref, dx_ref, dws_ref = _grads(swiglu_reference, x.double(), [w.double() for w in weights], grad_out.double())
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(dx.double(), dx_ref, atol=atol, rtol=rtol)
    for dw, dw_ref in zip(dws, dws_ref):
        torch.testing.assert_close(dw.double(), dw_ref, atol=atol, rtol=rtol)
    assert dws[2][1].abs().sum() == 0  # the expert without tokens gets no gradient


def test_grouped_gemm_path_matches_reference_fp32():
    experts = _experts()
    assert grouped_mm_usable(torch.zeros(1, 8), experts.w_gate_EFD)  # fp32 CPU really takes torch._grouped_mm
    _compare(experts.functional, torch.float32, atol=1e-6, rtol=1e-5)


def test_grouped_gemm_path_matches_reference_bf16():
    _compare(_experts(torch.bfloat16).functional, torch.bfloat16, atol=2e-3, rtol=2e-2)


def test_loop_fallback_matches_reference_fp64():
    experts = _experts(torch.float64)
    assert not grouped_mm_usable(torch.zeros(1, 8, dtype=torch.float64), experts.w_gate_EFD)
    _compare(experts.functional, torch.float64, atol=1e-12, rtol=1e-10)


def test_forward_uses_own_weights_and_expanded_grads_work():
    experts = _experts()
    x = torch.randn(sum(SPLITS), 8, requires_grad=True)
    experts(x, COUNTS).sum().backward()  # y.sum() gives a stride-0 gradient, which torch._grouped_mm rejects
    x_ref = x.detach().clone().requires_grad_()
    swiglu_reference(x_ref, COUNTS, experts.w_gate_EFD, experts.w_up_EFD, experts.w_down_EDF).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("mone", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_rows_at_all_backpropagates_zero_gradients(mone, dtype):
    """A rank whose local experts receive no token in a micro-batch: y.sum()'s stride-0 [0, D] gradient used to
    fail in torch._grouped_mm's backward ("Invalid strides/sizes")."""
    torch.manual_seed(0)
    experts = SwiGLUExperts(3, 8, 16, MoNEConfig(enabled=mone, backend="torch")).to(dtype)
    x = torch.randn(0, 8, dtype=dtype, requires_grad=True)
    y = experts(x, torch.zeros(3, dtype=torch.int64))
    assert y.shape == (0, 8)
    y.sum().backward()
    for w in experts.parameters():
        assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("width", [8, 6])  # 32-byte rows take torch._grouped_mm, 24-byte rows the loop
def test_grouped_linear_matches_per_row_matmul(width):
    torch.manual_seed(1)
    x, w = torch.randn(10, width), torch.randn(4, 12, width)
    assert grouped_mm_usable(x, w) == (width == 8)
    expert_of_row = torch.repeat_interleave(torch.arange(4), torch.tensor(COUNTS))
    expected = torch.einsum("noi,ni->no", w[expert_of_row], x)
    torch.testing.assert_close(grouped_linear(x, w, COUNTS), expected)
    torch.testing.assert_close(loop_linear(x, w, COUNTS), expected)
    torch.testing.assert_close(grouped_matmul(x, w.transpose(1, 2), COUNTS), expected)  # the kernels' raw GEMMs
    dy = torch.randn(10, 12)
    dw = torch.stack([dy[expert_of_row == e].T @ x[expert_of_row == e] for e in range(4)])
    torch.testing.assert_close(grouped_weight_grad(dy, x, COUNTS), dw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # grouped GEMM, loop fallback
def test_dead_rows_past_the_counts_are_ignored(dtype):
    """Rows past sum(tokens_per_expert_E) (capacity-dropped slots) reach no live output and no weight gradient,
    even when they hold NaN; the counts are never read on the host on the grouped-GEMM path."""
    experts = _experts(dtype)
    x = torch.randn(sum(SPLITS), 8, dtype=dtype)
    x_dead = torch.cat([x, torch.full((3, 8), float("nan"), dtype=dtype)])
    weights = [experts.w_gate_EFD, experts.w_up_EFD, experts.w_down_EDF]
    grad_out = torch.randn(sum(SPLITS) + 3, 8, dtype=dtype)
    y, dx, dws = _grads(experts.functional, x_dead, weights, grad_out)
    y_ref, dx_ref, dws_ref = _grads(experts.functional, x, weights, grad_out[:sum(SPLITS)])
    torch.testing.assert_close(y[:sum(SPLITS)], y_ref)
    torch.testing.assert_close(dx[:sum(SPLITS)], dx_ref)
    for dw, dw_ref in zip(dws, dws_ref):
        torch.testing.assert_close(dw, dw_ref)


def test_bad_group_sizes_are_reported():
    experts = _experts()
    with pytest.raises(ValueError, match=r"int64 tensor of shape \(4,\) .* got torch.int64 \(3,\)"):
        experts(torch.randn(10, 8), torch.tensor([3, 5, 2]))
    with pytest.raises(ValueError, match=r"got torch.int32 \(4,\)"):
        experts(torch.randn(10, 8), COUNTS.int())
    with pytest.raises(TypeError, match="got list"):
        experts(torch.randn(10, 8), SPLITS)
    with pytest.raises(ValueError, match="positive sizes"):
        SwiGLUExperts(0, 8, 16, MoNEConfig())
