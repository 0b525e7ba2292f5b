"""Permutation helpers: stable grouping by expert, dropped slots, weighted unpermute."""
import pytest
import torch

from moe_core.permute import group_by_device, make_permutation, permute_tokens, sort_by_expert, sum_tokens, \
    unpermute_tokens


def test_sort_by_expert_is_stable_and_puts_dropped_last():
    order, counts = sort_by_expert(torch.tensor([2, -1, 0, 2, 0, -1, 1]), num_experts=4)
    assert order.tolist() == [2, 4, 6, 0, 3, 1, 5]  # grouped by expert, then the dropped entries
    assert counts.tolist() == [2, 1, 2, 0]
    for bad in (4, -2):  # -2 is what a global id below this rank's first expert would become
        with pytest.raises(RuntimeError, match=r"expert id is outside \[0, 4\) and is not -1"):
            sort_by_expert(torch.tensor([0, bad]), num_experts=4)


def test_permute_unpermute_roundtrip_with_weights_and_drops():
    x_TD = torch.arange(8.0).reshape(4, 2)
    idx_TK = torch.tensor([[1, 0], [0, -1], [-1, -1], [1, 1]])
    weight_TK = torch.tensor([[0.25, 0.75], [1.0, 0.0], [0.0, 0.0], [0.5, 0.5]])
    perm = make_permutation(idx_TK, num_experts=2)
    assert perm.token_idx_N.tolist() == [0, 1, 0, 3, 3, 1, 2, 2]  # expert 0 rows, expert 1 rows, dead rows
    assert perm.tokens_per_expert_E.tolist() == [2, 3]
    x_ND = permute_tokens(x_TD, perm)
    y_ND = torch.cat([x_ND[:5] * 2, torch.full((3, 2), float("nan"))])  # "expert" = times 2; dead rows garbage
    y_TD = unpermute_tokens(y_ND, perm, weight_TK, num_tokens=4)
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
    weight_TK = torch.rand(5, 2, dtype=torch.float64).requires_grad_()  # dropped slots' weights get zero grads
    scale_N = torch.rand(10, 1, dtype=torch.float64)  # a stand-in "expert" so rows differ from their tokens

    def roundtrip(x, w):
        return unpermute_tokens(permute_tokens(x, perm) * scale_N, perm, w, num_tokens=5)

    assert torch.autograd.gradcheck(roundtrip, (x_TD, weight_TK))


def test_unpermute_rejects_mismatched_shapes():
    perm = make_permutation(torch.tensor([[0, 1], [1, 0]]), num_experts=2)
    with pytest.raises(ValueError, match="num_tokens=3"):
        unpermute_tokens(torch.zeros(4, 2), perm, torch.ones(2, 2), num_tokens=3)
    with pytest.raises(ValueError, match="5 expert output rows"):
        unpermute_tokens(torch.zeros(5, 2), perm, torch.ones(2, 2), num_tokens=2)


def test_unpermute_takes_just_the_kept_rows_as_the_ep_dispatchers_do():
    idx_TK = torch.tensor([[1, -1], [0, 1]])
    perm = make_permutation(idx_TK, num_experts=2)
    y_ND = torch.randn(4, 3)
    weight_TK = torch.rand(2, 2)
    full = unpermute_tokens(y_ND, perm, weight_TK, num_tokens=2)
    torch.testing.assert_close(unpermute_tokens(y_ND[:3], perm, weight_TK, num_tokens=2), full)


def test_everything_dropped_gives_zeros_and_zero_grads():
    perm = make_permutation(torch.full((3, 2), -1), num_experts=2)
    x_TD = torch.randn(3, 4, requires_grad=True)
    x_ND = permute_tokens(x_TD, perm)
    assert x_ND.shape == (6, 4) and perm.tokens_per_expert_E.tolist() == [0, 0]  # six dead rows
    y_TD = unpermute_tokens(x_ND * float("inf"), perm, torch.ones(3, 2), num_tokens=3)
    y_TD.sum().backward()
    assert torch.equal(y_TD, torch.zeros(3, 4)) and torch.equal(x_TD.grad, torch.zeros(3, 4))


def test_group_by_device_sends_one_row_per_token_and_device_with_its_slots():
    """Hand-computed: 2 devices of 2 experts; token 0 has both slots on device 0 (one row), token 1 one slot on each
    (two rows), token 2 a dropped slot, token 3 nothing kept (no row), token 4 the same expert twice (one row)."""
    idx_TK = torch.tensor([[1, 0], [3, 1], [-1, 2], [-1, -1], [2, 2]])
    w_TK = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8], [0.9, 1.0]], requires_grad=True)
    routing = group_by_device(idx_TK, w_TK, experts_per_device=2, num_devices=2)
    assert routing.perm.tokens_per_expert_E.tolist() == [2, 3]  # rows per device
    rows = 5
    assert routing.perm.token_idx_N[:rows].tolist() == [0, 1, 1, 2, 4]  # device 0's rows, then device 1's
    assert routing.local_expert_NK[:rows].tolist() == [[1, 0], [-1, 1], [1, -1], [-1, 0], [0, 0]]
    assert (routing.local_expert_NK[rows:] == -1).all() and (routing.weight_NK[rows:] == 0).all()
    torch.testing.assert_close(routing.weight_NK[:rows], torch.tensor([[0.1, 0.2], [0.0, 0.4], [0.3, 0.0],
                                                                       [0.0, 0.6], [0.9, 1.0]]))
    assert routing.slots_per_expert_E.tolist() == [1, 2, 3, 1]
    assert routing.perm.row_TK.tolist() == [[0, -1], [2, 1], [-1, 3], [-1, -1], [4, -1]]  # each pair's first slot
    routing.weight_NK.sum().backward()  # each kept slot's weight travels in exactly one row
    assert w_TK.grad.tolist() == [[1.0, 1.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]]


def test_sum_tokens_adds_each_tokens_rows():
    perm = make_permutation(torch.tensor([[0, 1], [-1, 1], [-1, -1]]), num_experts=2)
    y_ND = torch.tensor([[1.0], [2.0], [4.0], [float("nan")], [float("nan")], [float("nan")]])
    out = sum_tokens(y_ND[:3], perm, num_tokens=3)  # rows: token 0 (expert 0), tokens 0 and 1 (expert 1)
    assert out.tolist() == [[3.0], [4.0], [0.0]]
