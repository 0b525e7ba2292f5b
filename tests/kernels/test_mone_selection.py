"""One MoNE selection everywhere (the definition in moe_core/mone.py): the torch path, the Triton training path,
the Triton decode path and the exported Hugging Face modeling code keep IDENTICAL neurons on tie-heavy bf16 inputs
(exact ties at the cut in most rows), with NaN ranked lowest, and dropped neurons holding inf give finite outputs
and exactly zero gradients on every path."""
import pytest
import torch

from kernels.mone import mone_swiglu_grouped
from kernels.select_swiglu import select_swiglu
from kernels.topk_select import topk_select_reference
from launcher.hf.modeling_moetron import mone_keep_count, mone_keep_mask
from moe_core.mone import keep_count, mone_swiglu_torch, select_neurons

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# few distinct values, so rows are full of exact ties; no two have |silu| within far more than an fp32 ulp
LEVELS = [-4.0, -2.5, -1.25, -1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0]


def _c(splits):
    """Per-expert row counts as the API takes them: int64 on the token device."""
    return torch.tensor(splits, dtype=torch.int64, device=DEVICE)


def _tie_heavy(N: int, F: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor(LEVELS)[torch.randint(len(LEVELS), (N, F), generator=gen)].to(torch.bfloat16)


def _definition(g_NF: torch.Tensor, k: int, score: str) -> torch.Tensor:
    """Independent statement of the rule: fp32 score from the rounded g, NaN lowest, stable sort (lower index)."""
    g = g_NF.float()
    return topk_select_reference(g if score == "pre_act" else g * torch.sigmoid(g), k, "mask")


def _triton_training_selection(g_NF: torch.Tensor, k: int, score: str) -> torch.Tensor:
    h_NF, _, _ = select_swiglu(g_NF.to(DEVICE), torch.ones_like(g_NF, device=DEVICE), k, score)
    return (h_NF != 0).cpu()  # h = silu(g) * 1 on kept neurons (never 0 for these g), exactly 0 elsewhere


@pytest.mark.parametrize("score", ["post_act", "pre_act"])
def test_every_path_selects_identical_neurons_on_ties_and_nan(score):
    N, F, k = 24, 256, 128
    g = _tie_heavy(N, F, seed=1)
    nan, inf = float("nan"), float("inf")
    g[0, :5] = torch.tensor([nan, inf, -inf, nan, 0.0])  # NaN (and silu(-inf) = NaN) rank below every number
    g[1, : F - k + 3] = nan  # only k - 3 numbers: the lowest-index NaNs fill the row
    want = _definition(g, k, score)
    s = g.float() * torch.sigmoid(g.float()) if score == "post_act" else g.float()
    s = torch.where(s.isnan(), -1.0, s.abs())
    thr = torch.where(want, s, float("inf")).min(-1, keepdim=True).values
    assert ((s == thr) & ~want).any(-1).float().mean() > 0.75  # the cut falls on an exact tie in most rows
    assert want[0, 1] and not want[0, 0] and not want[0, 3] and want[0, 2] == (score == "pre_act")
    assert want[1, : F - k + 3].sum() == 3 and want[1, :3].all()
    paths = {"torch": select_neurons(g, k, score), "hf": mone_keep_mask(g, k, score),
             "triton training": _triton_training_selection(g, k, score)}
    for name, got in paths.items():
        assert torch.equal(got.cpu(), want), name


def _one_hot_problem(F: int, tokens: list[int], g_rows: torch.Tensor):
    """x_n = e_n, W_up = 1, W_down = I: then g_n = g_rows[n] exactly (one product per entry), u = 1 and y_n = h_n,
    so y != 0 marks exactly the neurons a path kept (decode and training paths end to end)."""
    E, D = len(tokens), F
    x = torch.zeros(sum(tokens), D)
    w_gate = torch.zeros(E, F, D)
    row = 0
    for e, n in enumerate(tokens):
        for j in range(n):
            x[row, j] = 1.0
            w_gate[e, :, j] = g_rows[row].float()
            row += 1
    w_up, w_down = torch.ones(E, F, D), torch.eye(F).expand(E, F, F).contiguous()
    return [t.to(DEVICE, torch.bfloat16) for t in (x, w_gate, w_up, w_down)]


@pytest.mark.parametrize("score", ["post_act", "pre_act"])
def test_decode_and_training_kernels_keep_the_defined_neurons_end_to_end(score):
    F, k, tokens = 32, 16, [10, 6]
    g = _tie_heavy(sum(tokens), F, seed=2)
    g[:10, [0, 7]] = float("nan")  # a NaN neuron of expert 0 (all its tokens: 0 * NaN is NaN in the GEMM anyway)
    want = _definition(g, k, score)
    assert not want[:10, [0, 7]].any()  # NaN ranks lowest: dropped, so y stays finite (kept, y would be NaN)
    tensors = _one_hot_problem(F, tokens, g)
    with torch.no_grad():
        y_decode = mone_swiglu_grouped(tensors[0], _c(tokens), *tensors[1:], k, score)  # <= 16 tokens: decode
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    y_train = mone_swiglu_grouped(leaves[0], _c(tokens), *leaves[1:], k, score)  # needs grad: training path
    y_torch = mone_swiglu_torch(tensors[0], _c(tokens), *tensors[1:], k, score)
    for name, y in (("decode", y_decode), ("training", y_train.detach()), ("torch", y_torch)):
        assert torch.isfinite(y).all(), name
        assert torch.equal((y != 0).cpu(), want), name


def _inf_in_dropped_neuron():
    """One token, two neurons: neuron 0 has the larger score and is kept; neuron 1's up projection overflows to
    inf but it is dropped, so y and every gradient must stay finite (masking by multiplication gives inf * 0)."""
    w_gate = torch.tensor([[[1.0, 0.0], [0.0, 1e-3]]])
    w_up = torch.tensor([[[1.0, 0.0], [0.0, 3.4e38]]])
    w_down = torch.eye(2).unsqueeze(0)
    x = torch.tensor([[5.0, 10.0]])
    return [t.to(DEVICE) for t in (x, w_gate, w_up, w_down)]


@pytest.mark.parametrize("path", ["torch", "triton training", "triton decode"])
def test_inf_in_a_dropped_neuron_gives_finite_output_and_zero_gradient(path):
    tensors = _inf_in_dropped_neuron()
    fn = mone_swiglu_torch if path == "torch" else mone_swiglu_grouped
    want = torch.tensor([[5.0 * torch.sigmoid(torch.tensor(5.0)).item() * 5.0, 0.0]])  # silu(5) * u, 0
    if path == "triton decode":
        with torch.no_grad():
            torch.testing.assert_close(fn(tensors[0], _c([1]), *tensors[1:], 1, "post_act").cpu(), want)
        return
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    y = fn(leaves[0], _c([1]), *leaves[1:], 1, "post_act")
    torch.testing.assert_close(y.detach().cpu(), want)
    y.sum().backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
    w_gate, w_up, w_down = leaves[1:]
    assert w_gate.grad[0, 1].abs().sum() == 0 and w_up.grad[0, 1].abs().sum() == 0  # dropped neuron 1
    assert w_down.grad[0, :, 1].abs().sum() == 0


def test_keep_count_is_exact_round_half_up_everywhere():
    # 0.29 * 50 is 14.499999999999998 in binary floating point: a float round-half-up gives 14
    for ratio, ffn, want in ((0.29, 50, 15), (0.57, 50, 29), (0.5, 3, 2), (0.25, 10, 3), (0.01, 16, 1),
                             (1.0, 7, 7), (0.3, 10, 3)):
        assert keep_count(ratio, ffn) == want == mone_keep_count(ratio, ffn), (ratio, ffn)
