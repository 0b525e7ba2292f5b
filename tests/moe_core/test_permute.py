"""Permutation helpers: stable grouping by expert, dropped slots, weighted unpermute."""
import pytest
import torch

from moe_core.permute import make_permutation, permute_tokens, sort_by_expert, unpermute_tokens


def test_sort_by_expert_is_stable_and_skips_dropped():
    order, counts = sort_by_expert(torch.tensor([2, -1, 0, 2, 0, -1, 1]), num_experts=4)
    assert order.tolist() == [2, 4, 6, 0, 3]
    assert counts.tolist() == [2, 1, 2, 0]
    for bad in (4, -2):  # -2 is what a global id below this rank's first expert would become
        with pytest.raises(ValueError, match=f"expert id {bad} is outside"):
            sort_by_expert(torch.tensor([0, bad]), num_experts=4)


def test_permute_unpermute_roundtrip_with_weights_and_drops():
    x_TD = torch.arange(8.0).reshape(4, 2)
    idx_TK = torch.tensor([[1, 0], [0, -1], [-1, -1], [1, 1]])
    weight_TK = torch.tensor([[0.25, 0.75], [1.0, 0.0], [0.0, 0.0], [0.5, 0.5]])
    perm = make_permutation(idx_TK, num_experts=2)
    assert perm.token_idx_N.tolist() == [0, 1, 0, 3, 3]  # expert 0 rows, then expert 1 rows
    assert perm.tokens_per_expert_E.tolist() == [2, 3]
    x_ND = permute_tokens(x_TD, perm)
    y_TD = unpermute_tokens(x_ND * 2, perm, weight_TK, num_tokens=4)  # "expert" = times 2
    expected = x_TD * 2 * torch.tensor([[1.0], [1.0], [0.0], [1.0]])  # token 2 fully dropped -> 0
    torch.testing.assert_close(y_TD, expected)


def test_unpermute_returns_input_dtype_rounded_once_from_fp32():
    torch.manual_seed(0)
    perm = make_permutation(torch.tensor([[0, 0, 0, 0]]), num_experts=1)
    y_ND = torch.randn(4, 16, dtype=torch.bfloat16)
    weight_TK = torch.rand(1, 4)
    out = unpermute_tokens(y_ND, perm, weight_TK, num_tokens=1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, (y_ND.float() * weight_TK.T).sum(0, keepdim=True).to(torch.bfloat16))


def test_permute_and_unpermute_gradients_gradcheck():
    idx_TK = torch.tensor([[1, 0], [0, -1], [-1, -1], [1, 1], [2, 0]])
    perm = make_permutation(idx_TK, num_experts=3)
    assert perm.row_TK.tolist() == [[3, 0], [1, -1], [-1, -1], [4, 5], [6, 2]]
    x_TD = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    weight_TK = torch.rand(5, 2, dtype=torch.float64).masked_fill(idx_TK < 0, 0.0).requires_grad_()
    scale_N = torch.rand(7, 1, dtype=torch.float64)  # a stand-in "expert" so rows differ from their tokens

    def roundtrip(x, w):
        return unpermute_tokens(permute_tokens(x, perm) * scale_N, perm, w, num_tokens=5)

    assert torch.autograd.gradcheck(roundtrip, (x_TD, weight_TK))


def test_unpermute_rejects_mismatched_shapes():
    perm = make_permutation(torch.tensor([[0, 1], [1, 0]]), num_experts=2)
    with pytest.raises(ValueError, match="num_tokens=3"):
        unpermute_tokens(torch.zeros(4, 2), perm, torch.ones(2, 2), num_tokens=3)
    with pytest.raises(ValueError, match="3 expert output rows"):
        unpermute_tokens(torch.zeros(3, 2), perm, torch.ones(2, 2), num_tokens=2)


def test_everything_dropped_gives_zeros_and_zero_grads():
    perm = make_permutation(torch.full((3, 2), -1), num_experts=2)
    x_TD = torch.randn(3, 4, requires_grad=True)
    x_ND = permute_tokens(x_TD, perm)
    assert x_ND.shape == (0, 4)
    y_TD = unpermute_tokens(x_ND * 2, perm, torch.zeros(3, 2), num_tokens=3)
    y_TD.sum().backward()
    assert torch.equal(y_TD, torch.zeros(3, 4)) and torch.equal(x_TD.grad, torch.zeros(3, 4))
