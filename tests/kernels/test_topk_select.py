"""Triton top-k selection vs the torch reference (interpreter on CPU, compiled on GPU)."""
import pytest
import torch

from kernels.topk_select import topk_select, topk_select_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("R,F,k", [(5, 24, 7), (3, 40, 1), (4, 33, 33), (6, 100, 50), (2, 17, 13)])
@pytest.mark.parametrize("output", ["mask", "indices"])
def test_matches_reference_random(R, F, k, output):
    score = torch.randn(R, F, generator=torch.Generator().manual_seed(R * F + k)).to(DEVICE)
    got = topk_select(score, k, output)
    want = topk_select_reference(score, k, output)
    assert torch.equal(got, want)
    if output == "mask":
        assert (got.sum(-1) == k).all()


def test_ties_broken_by_lower_index_and_nan_ranks_lowest():
    # row 0: the cut falls inside a run of equal magnitudes (signs differ); row 1: all equal; row 2: zeros, inf and
    # NaN (NaN ranks below 0); row 3: too few numbers, so NaNs fill the rest by lowest index
    nan, inf = float("nan"), float("inf")
    score = torch.tensor([[0.5, -2.0, 2.0, 1.0, -1.0, 1.0, 1.0, 0.0, -1.0, 3.0],
                          [4.0] * 10,
                          [0.0, -0.0, nan, 0.0, inf, 0.0, -0.0, nan, 0.0, 0.0],
                          [nan, nan, -inf, nan, 1.0, nan, 2.0, nan, nan, nan]])
    k = 5
    want = torch.tensor([[1, 2, 3, 4, 9], [0, 1, 2, 3, 4], [0, 1, 3, 4, 5], [0, 1, 2, 4, 6]])
    assert torch.equal(topk_select_reference(score, k, "indices"), want)
    assert torch.equal(topk_select(score.to(DEVICE), k, "indices").cpu(), want)


def test_low_precision_scores_match_reference():
    score = torch.randn(4, 48, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)  # many exact ties
    got = topk_select(score.to(DEVICE), 20, "mask").cpu()
    assert torch.equal(got, topk_select_reference(score, 20, "mask"))


def test_empty_rows_and_bad_k():
    assert topk_select(torch.randn(0, 16, device=DEVICE), 4).shape == (0, 16)
    with pytest.raises(ValueError, match="keep_k=17 must be in"):
        topk_select(torch.randn(2, 16, device=DEVICE), 17)
    with pytest.raises(ValueError, match="output must be"):
        topk_select(torch.randn(2, 16, device=DEVICE), 3, "values")
