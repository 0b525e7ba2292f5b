"""Fused MoNE expert kernels (training and decode paths) vs the torch reference: outputs and gradients."""
import pytest
import torch

from kernels.mone import mone_swiglu, mone_swiglu_grouped, mone_swiglu_reference
from kernels.mone_decode import mone_decode, row_starts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _c(splits):
    """Per-expert row counts as the API takes them: int64 on the token device."""
    return torch.tensor(splits, dtype=torch.int64, device=DEVICE)


def _problem(splits, D, F, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    E = len(splits)
    x = torch.randn(sum(splits), D, generator=gen)
    w_gate = torch.randn(E, F, D, generator=gen) / D ** 0.5
    w_up = torch.randn(E, F, D, generator=gen) / D ** 0.5
    w_down = torch.randn(E, D, F, generator=gen) / F ** 0.5
    return [t.to(DEVICE, dtype) for t in (x, w_gate, w_up, w_down)]


def _grads(fn, tensors, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    y = fn(*leaves)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("splits,D,F,k,score", [
    ([3, 0, 5, 1], 16, 24, 7, "post_act"),    # ragged, an empty expert, k not a power of two
    ([6, 2], 32, 40, 13, "pre_act"),
    ([4], 24, 17, 17, "post_act"),            # keep everything: equals the dense expert
])
def test_training_path_matches_reference(splits, D, F, k, score):
    tensors = _problem(splits, D, F, seed=sum(splits) + F)
    dy = torch.randn(sum(splits), D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y, grads = _grads(lambda *t: mone_swiglu_grouped(t[0], _c(splits), *t[1:], k, score), tensors, dy)
    y_ref, grads_ref = _grads(lambda *t: mone_swiglu_reference(t[0], _c(splits), *t[1:], k, score), tensors, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for name, g, g_ref in zip(("x", "w_gate", "w_up", "w_down"), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad of {name}: {m}")


def test_gradients_reach_only_kept_neurons():
    x, w_gate, w_up, w_down = _problem([5], 16, 20, seed=7)
    w_up = w_up.requires_grad_(True)
    mone_swiglu(x[0:1], w_gate[0], w_up[0], w_down[0], 6).sum().backward()
    assert (w_up.grad[0].abs().sum(-1) > 0).sum() == 6  # one token: exactly its 6 kept rows of W_up get gradient


@pytest.mark.parametrize("splits,D,F,k,score", [
    ([1, 3, 0, 16], 32, 40, 13, "post_act"),  # ragged decode batch, up to DECODE_MAX_TOKENS tokens
    ([2, 1], 40, 24, 5, "pre_act"),           # D not a multiple of the hidden block
])
def test_decode_path_matches_reference(splits, D, F, k, score):
    x, w_gate, w_up, w_down = _problem(splits, D, F, seed=F + k)
    with torch.no_grad():
        y = mone_swiglu_grouped(x, _c(splits), w_gate, w_up, w_down, k, score)
    y_ref = mone_swiglu_reference(x, _c(splits), w_gate, w_up, w_down, k, score)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)


def test_decode_kernels_handle_more_tokens_than_one_tile():
    splits = [20, 3]  # > 16 rows for one expert: the kernels loop over token chunks
    x, w_gate, w_up, w_down = _problem(splits, 16, 24, seed=5)
    with torch.no_grad():
        y = mone_decode(x, row_starts(_c(splits)), w_gate, w_up, w_down, 9, "post_act")
    torch.testing.assert_close(y, mone_swiglu_reference(x, _c(splits), w_gate, w_up, w_down, 9), rtol=1e-4, atol=1e-5)


def test_decode_reads_the_current_weights_after_any_write():
    x, w_gate, w_up, w_down = _problem([2], 16, 24, seed=3)
    w_down = torch.nn.Parameter(w_down)
    for write in (lambda: w_down.mul_(-2.0),  # optimizer-style in-place update (bumps the version counter)
                  lambda: w_down.data.mul_(-0.5),  # through .data (EMA, user code): no version bump
                  lambda: w_down.data.copy_(torch.randn_like(w_down))):
        with torch.no_grad():
            mone_swiglu_grouped(x, _c([2]), w_gate, w_up, w_down, 8)
            write()
            y = mone_swiglu_grouped(x, _c([2]), w_gate, w_up, w_down, 8)
            y_ref = mone_swiglu_reference(x, _c([2]), w_gate, w_up, w_down, 8)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)


def test_bad_inputs_name_the_problem():
    x, w_gate, w_up, w_down = _problem([2, 2], 16, 24, seed=0)
    with pytest.raises(ValueError, match=r"tokens_per_expert_E must be an int64 tensor of shape \(2,\)"):
        mone_swiglu_grouped(x, _c([2, 2, 0]), w_gate, w_up, w_down, 8)
    with pytest.raises(TypeError, match="tokens_per_expert_E must be an int64 tensor .* got list"):
        mone_swiglu_grouped(x, [2, 2], w_gate, w_up, w_down, 8)
    with pytest.raises(ValueError, match="keep_k=25"):
        mone_swiglu_grouped(x, _c([2, 2]), w_gate, w_up, w_down, 25)
    with pytest.raises(ValueError, match="score must be"):
        mone_swiglu_grouped(x, _c([2, 2]), w_gate, w_up, w_down, 8, "abs")
    with pytest.raises(ValueError, match=r"w_down \[E, D, F\]"):
        mone_swiglu_grouped(x, _c([2, 2]), w_gate, w_up, w_down.transpose(1, 2), 8)


def test_matches_moe_core_torch_path():
    """Same contract as moe_core.mone.mone_swiglu_torch (what backend=torch runs), outputs and gradients."""
    from moe_core.mone import mone_swiglu_torch

    splits = [2, 5, 0]
    tensors = _problem(splits, 16, 24, seed=11)
    dy = torch.randn(sum(splits), 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    y, grads = _grads(lambda *t: mone_swiglu_grouped(t[0], _c(splits), *t[1:], 10, "post_act"), tensors, dy)
    y_ref, grads_ref = _grads(lambda *t: mone_swiglu_torch(t[0], _c(splits), *t[1:], 10, "post_act"), tensors, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_dead_rows_past_the_counts_change_nothing():
    """Capacity-dropped slots sit past sum(tokens_per_expert_E) as dead rows: live outputs and every weight gradient
    equal the problem without them (no host sync is needed to cut them off)."""
    splits = [3, 0, 2]
    x, w_gate, w_up, w_down = _problem(splits, 16, 24, seed=3)
    dead = torch.full((4, 16), float("nan"), device=DEVICE)
    dy = torch.randn(9, 16, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with_dead = [torch.cat([x, dead]), w_gate, w_up, w_down]
    y, grads = _grads(lambda *t: mone_swiglu_grouped(t[0], _c(splits), *t[1:], 10, "post_act"), with_dead, dy)
    y_ref, grads_ref = _grads(lambda *t: mone_swiglu_reference(t[0], _c(splits), *t[1:], 10, "post_act"),
                              [x, w_gate, w_up, w_down], dy[:5])
    torch.testing.assert_close(y[:5], y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0][:5], grads_ref[0], rtol=1e-4, atol=1e-5)
    for g, g_ref in zip(grads[1:], grads_ref[1:]):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_training_path_compiles_whole_and_matches_eager():
    """The fused kernels are torch custom ops: torch.compile(fullgraph=True) captures the MoNE experts without a
    graph break (grouped GEMMs need bf16 under compile) and gives eager's outputs and gradients."""
    splits = [3, 0, 5, 2]
    tensors = _problem(splits, 16, 24, seed=7, dtype=torch.bfloat16)
    dy = torch.randn(10, 16, generator=torch.Generator().manual_seed(8)).to(DEVICE, torch.bfloat16)
    counts = _c(splits)

    def run(x, *w):
        return mone_swiglu_grouped(x, counts, *w, 10, "post_act")

    torch._dynamo.reset()
    y, grads = _grads(run, tensors, dy)
    y_c, grads_c = _grads(torch.compile(run, backend="aot_eager", fullgraph=True), tensors, dy)
    torch.testing.assert_close(y_c, y)
    for g, g_c in zip(grads, grads_c):
        torch.testing.assert_close(g_c, g)
