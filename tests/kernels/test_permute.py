"""Fused permute/unpermute (kernels/permute.py): the torch references against the definition written as loops,
the Triton kernels (interpreter on CPU, compiled on GPU) against the references, gradients (gradcheck in fp64,
kernel vs reference), dead rows full of NaN that must never leak, no host syncs, and torch.compile."""
import pytest
import torch

from kernels import permute as P
from tests.helpers.syncs import count_syncs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")
# (T, K, D, MAX_TILE): small tiles make BLOCK_D < D, so the D loop runs several chunks with a ragged last one
SHAPES = [(12, 3, 37, 32), (8, 2, 40, 32), (5, 1, 33, P.MAX_TILE)]


def routing(T, K, E, drop, seed):
    """Maps of the moe_core permutation contract (row_TK, token_idx_N, slot_idx_N, live_N) for random top-K
    routing; ``drop``: some slots are dropped (-1), incl. every slot of one token. Kept rows come first, grouped by
    expert (stable), dropped slots last."""
    gen = torch.Generator().manual_seed(seed)
    idx_TK = torch.rand(T, E, generator=gen).topk(K, dim=1).indices
    if drop:
        idx_TK[torch.rand(T, K, generator=gen) < 0.3] = -1
        idx_TK[T // 2] = -1
    keys_N = torch.where(idx_TK < 0, E, idx_TK).reshape(-1)
    slot_idx_N = torch.sort(keys_N, stable=True).indices
    live_N = keys_N[slot_idx_N] < E
    row_X = torch.empty_like(slot_idx_N).scatter_(0, slot_idx_N, torch.where(live_N, torch.arange(T * K), -1))
    assert bool((~live_N[:-1] & live_N[1:]).any()) is False  # dead rows are a suffix
    return [t.to(DEVICE) for t in (row_X.view(T, K), slot_idx_N // K, slot_idx_N, live_N)]


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def poison(rows_ND, live_N):
    """Dead rows hold NaN and inf, as experts may leave there."""
    rows_ND = rows_ND.clone()
    rows_ND[~live_N] = NAN
    rows_ND[~live_N, :1] = float("inf")
    return rows_ND


def by_definition(x_TD, grad_ND, y_ND, w_TK, grad_TD, row_TK, token_idx_N, slot_idx_N):
    """The four operations as the contract states them, one row and one slot at a time, in fp64."""
    (T, K), N = row_TK.shape, token_idx_N.shape[0]
    x_ND = torch.stack([x_TD[token_idx_N[n]] for n in range(N)])
    gx_TD, y_TD, gw_TK = [torch.zeros(T, x_TD.shape[1], dtype=torch.float64) for _ in range(2)] + \
        [torch.zeros(T, K, dtype=torch.float64)]
    gy_ND = torch.zeros(N, y_ND.shape[1], dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            r = int(row_TK[t, k])
            if r >= 0:
                gx_TD[t] += grad_ND[r].double()
                y_TD[t] += w_TK[t, k].double() * y_ND[r].double()
                gw_TK[t, k] = (y_ND[r].double() * grad_TD[t].double()).sum()
                gy_ND[r] = w_TK[t, k].double() * grad_TD[t].double()
                assert int(slot_idx_N[r]) == t * K + k and int(token_idx_N[r]) == t
    return x_ND, gx_TD, y_TD, gy_ND, gw_TK


@pytest.mark.parametrize("use_triton", [False, True], ids=["reference", "triton"])
def test_every_operation_equals_its_definition(use_triton):
    T, K, D = 6, 2, 5
    row_TK, token_idx_N, slot_idx_N, live_N = routing(T, K, 4, drop=True, seed=1)
    x_TD, w_TK, grad_TD = rand(T, D, seed=2), rand(T, K, seed=3).abs(), rand(T, D, seed=4)
    grad_ND, y_ND = poison(rand(T * K, D, seed=5), live_N), poison(rand(T * K, D, seed=6), live_N)
    want = by_definition(x_TD.cpu(), grad_ND.cpu(), y_ND.cpu(), w_TK.cpu(), grad_TD.cpu(), row_TK.cpu(),
                         token_idx_N.cpu(), slot_idx_N.cpu())
    suffix = "triton" if use_triton else "reference"
    got = (getattr(P, f"permute_forward_{suffix}")(x_TD, token_idx_N),
           getattr(P, f"permute_backward_{suffix}")(grad_ND, row_TK),
           getattr(P, f"unpermute_forward_{suffix}")(y_ND, w_TK, row_TK),
           *getattr(P, f"unpermute_backward_{suffix}")(grad_TD, y_ND, w_TK, row_TK, token_idx_N, slot_idx_N))
    for name, g, w in zip(("x_ND", "grad_x_TD", "y_TD", "grad_y_ND", "grad_w_TK"), got, want):
        torch.testing.assert_close(g.cpu().double(), w.to(torch.float64), msg=lambda m: f"{name}: {m}")
    assert int((~live_N).sum()) > 0 and bool((got[3][~live_N] == 0).all()), "dead rows must get exactly 0"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("drop", [False, True], ids=["dropless", "dropped"])
@pytest.mark.parametrize("T,K,D,max_tile", SHAPES)
def test_kernels_match_reference(T, K, D, max_tile, drop, dtype, monkeypatch):
    monkeypatch.setattr(P, "MAX_TILE", max_tile)
    row_TK, token_idx_N, slot_idx_N, live_N = routing(T, K, 4, drop, seed=T + K + D)
    w_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x_TD, grad_TD, w_TK = rand(T, D, dtype=dtype, seed=1), rand(T, D, dtype=dtype, seed=2), rand(T, K, seed=3)
    grad_ND = poison(rand(T * K, D, dtype=dtype, seed=4), live_N)
    y_ND = poison(rand(T * K, D, dtype=dtype, seed=5), live_N)
    w_TK = torch.where(row_TK < 0, NAN, w_TK.to(w_dtype))  # the router writes 0 there; NaN proves it is unread

    # the gather is a bit-exact copy in every dtype
    assert torch.equal(P.permute_forward_triton(x_TD, token_idx_N), P.permute_forward_reference(x_TD, token_idx_N))
    pairs = {
        "grad_x_TD": (P.permute_backward_triton(grad_ND, row_TK), P.permute_backward_reference(grad_ND, row_TK)),
        "y_TD": (P.unpermute_forward_triton(y_ND, w_TK, row_TK), P.unpermute_forward_reference(y_ND, w_TK, row_TK)),
    }
    args = (grad_TD, y_ND, w_TK, row_TK, token_idx_N, slot_idx_N)
    (gy, gw), (gy_ref, gw_ref) = P.unpermute_backward_triton(*args), P.unpermute_backward_reference(*args)
    pairs.update(grad_y_ND=(gy, gy_ref), grad_w_TK=(gw, gw_ref))
    for name, (got, want) in pairs.items():
        assert got.dtype == want.dtype and bool(torch.isfinite(want).all()), f"{name}: the reference leaked NaN"
        # sums: fp32/fp64 to accumulation-order tolerance; bf16 within one ulp (interpreter rounds toward zero)
        torch.testing.assert_close(got, want, msg=lambda m: f"{name}: {m}")
    if dtype != torch.bfloat16:
        assert torch.equal(gy, gy_ref), "grad_y is one product rounded once: the same bits"
    assert bool((gy[~live_N] == 0).all()) and bool((gw[row_TK < 0] == 0).all())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (interpreter) on lanes the masks discard
@pytest.mark.parametrize("use_triton", [False, True], ids=["reference", "triton"])
def test_non_finite_values_never_reach_another_token_or_a_dropped_slot(use_triton):
    """A dropped slot is selected out, never multiplied by 0: the (clamped) row it would address may hold inf."""
    T, K, D = 8, 2, 6
    row_TK, token_idx_N, slot_idx_N, live_N = routing(T, K, 4, drop=True, seed=2)
    dropped_TK, suffix = row_TK < 0, "triton" if use_triton else "reference"
    w_TK = torch.where(dropped_TK, NAN, rand(T, K, seed=1))  # the router writes 0 there; NaN proves it is unread
    rows_ND = poison(rand(T * K, D, seed=3), live_N)
    rows_ND[0] = float("inf")  # a kept row that overflowed in its expert
    others = torch.arange(T, device=DEVICE) != token_idx_N[0]
    assert bool(dropped_TK[others].any())
    for name, out_TD in (("y_TD", getattr(P, f"unpermute_forward_{suffix}")(rows_ND, w_TK, row_TK)),
                         ("grad_x_TD", getattr(P, f"permute_backward_{suffix}")(rows_ND, row_TK))):
        assert bool(torch.isfinite(out_TD[others]).all()) and not bool(torch.isfinite(out_TD[~others]).all()), name
    grad_TD = torch.where(dropped_TK.any(1, keepdim=True), float("inf"), rand(T, D, seed=4))
    gy, gw = getattr(P, f"unpermute_backward_{suffix}")(grad_TD, rows_ND, w_TK, row_TK, token_idx_N, slot_idx_N)
    assert bool((gy[~live_N] == 0).all()) and bool((gw[dropped_TK] == 0).all())


@pytest.mark.parametrize("use_triton", [False, True], ids=["reference", "triton"])
@pytest.mark.parametrize("drop", [False, True], ids=["dropless", "dropped"])
def test_gradcheck_fp64(drop, use_triton):
    T, K, D = 5, 3, 4
    row_TK, token_idx_N, slot_idx_N, live_N = routing(T, K, 4, drop, seed=7)
    x_TD = rand(T, D, dtype=torch.float64, seed=1).requires_grad_()
    y_ND = rand(T * K, D, dtype=torch.float64, seed=2).requires_grad_()
    w_TK = rand(T, K, dtype=torch.float64, seed=3).requires_grad_()
    # dead rows of x_ND are don't-care (experts leave their outputs unspecified, unpermute never reads them), so
    # permute's backward reads no gradient from them: the checked function is the permutation's live rows
    fast = use_triton  # the interpreter is slow: one random projection of the Jacobian instead of all of it
    assert torch.autograd.gradcheck(
        lambda x: torch.where(live_N[:, None], P.permute_rows(x, token_idx_N, row_TK, use_triton), 0.0), (x_TD,),
        fast_mode=fast)
    assert torch.autograd.gradcheck(
        lambda y, w: P.unpermute_rows(y, w, row_TK, token_idx_N, slot_idx_N, use_triton), (y_ND, w_TK),
        fast_mode=fast)


def layer(x_TD, w_TK, maps, use_triton):
    """permute -> an elementwise "expert" -> unpermute, as an MoE layer chains them."""
    row_TK, token_idx_N, slot_idx_N = maps
    x_ND = P.permute_rows(x_TD, token_idx_N, row_TK, use_triton)
    return P.unpermute_rows(torch.tanh(x_ND) * 1.5, w_TK, row_TK, token_idx_N, slot_idx_N, use_triton)


def outputs_and_grads(fn, leaves, dy):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    out = fn(*leaves)
    out.backward(dy)
    return [out.detach()] + [t.grad for t in leaves if t.requires_grad]


@pytest.mark.parametrize("weight_grad", [True, False], ids=["weight_grad", "no_weight_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_autograd_matches_reference(dtype, weight_grad):
    T, K, D = 9, 2, 24
    row_TK, token_idx_N, slot_idx_N, _ = routing(T, K, 4, drop=True, seed=11)
    maps = (row_TK, token_idx_N, slot_idx_N)
    x_TD = rand(T, D, dtype=dtype, seed=1).requires_grad_()
    w_TK = rand(T, K, seed=2).requires_grad_(weight_grad)
    dy = rand(T, D, dtype=dtype, seed=3)
    got = outputs_and_grads(lambda x, w: layer(x, w, maps, True), (x_TD, w_TK), dy)
    want = outputs_and_grads(lambda x, w: layer(x, w, maps, False), (x_TD, w_TK), dy)
    assert len(got) == (3 if weight_grad else 2)
    # bf16: grad_x passes two bf16 roundings (grad_y, then tanh's backward), one of them toward zero in the
    # interpreter, so allow two ulps
    tol = dict(rtol=2 ** -6, atol=2 ** -6) if dtype == torch.bfloat16 else {}
    for name, g, w in zip(("y_TD", "grad_x_TD", "grad_w_TK"), got, want):
        assert bool(torch.isfinite(g).all()), name
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{name}: {m}")


def test_a_prefix_of_the_permutation_holding_every_kept_row_is_enough():
    """EP dispatchers pass only the kept rows: maps cut to N_kept < T*K give the same results as the full ones."""
    T, K, D = 6, 2, 8
    row_TK, token_idx_N, slot_idx_N, live_N = routing(T, K, 4, drop=True, seed=3)
    kept = int(live_N.sum())
    y_ND, w_TK, dy = rand(T * K, D, seed=1).requires_grad_(), rand(T, K, seed=2).requires_grad_(), rand(T, D)
    full = outputs_and_grads(lambda y, w: P.unpermute_rows(y, w, row_TK, token_idx_N, slot_idx_N, True),
                             (y_ND, w_TK), dy)
    cut = outputs_and_grads(lambda y, w: P.unpermute_rows(y, w, row_TK, token_idx_N[:kept], slot_idx_N[:kept],
                                                          True), (y_ND[:kept], w_TK), dy)
    for name, g, w in zip(("y_TD", "grad_y", "grad_w"), cut, full):
        assert torch.equal(g, w[:kept] if name == "grad_y" else w), name


@pytest.mark.parametrize("use_triton", [False, True], ids=["reference", "triton"])
def test_forward_and_backward_make_no_host_sync(use_triton):
    row_TK, token_idx_N, slot_idx_N, _ = routing(6, 2, 4, drop=True, seed=5)
    x_TD, w_TK = rand(6, 8).requires_grad_(), rand(6, 2).requires_grad_()
    with count_syncs() as syncs:
        layer(x_TD, w_TK, (row_TK, token_idx_N, slot_idx_N), use_triton).sum().backward()
    ours = [(what, site) for what, site in syncs.calls if "kernels/permute.py" in site]  # not the interpreter's
    assert not ours, syncs.report()


@pytest.mark.parametrize("use_triton", [False, True], ids=["reference", "triton"])
def test_compiles_fullgraph_and_matches_eager(use_triton):
    """fullgraph: a host sync or a data-dependent shape would break the graph and fail here."""
    torch._dynamo.reset()
    row_TK, token_idx_N, slot_idx_N, _ = routing(7, 2, 4, drop=True, seed=9)
    maps = (row_TK, token_idx_N, slot_idx_N)
    x_TD, w_TK, dy = rand(7, 12).requires_grad_(), rand(7, 2).requires_grad_(), rand(7, 12, seed=1)
    compiled = torch.compile(lambda x, w: layer(x, w, maps, use_triton), fullgraph=True, backend="aot_eager")
    got = outputs_and_grads(compiled, (x_TD, w_TK), dy)
    want = outputs_and_grads(lambda x, w: layer(x, w, maps, use_triton), (x_TD, w_TK), dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("use_triton", [False, True], ids=["reference", "triton"])
def test_no_tokens(use_triton):
    row_TK = torch.empty(0, 2, dtype=torch.int64, device=DEVICE)
    idx_N = torch.empty(0, dtype=torch.int64, device=DEVICE)
    x_TD, w_TK = rand(0, 4).requires_grad_(), rand(0, 2).requires_grad_()
    y_TD = layer(x_TD, w_TK, (row_TK, idx_N, idx_N), use_triton)
    y_TD.sum().backward()
    assert y_TD.shape == (0, 4) and x_TD.grad.shape == (0, 4) and w_TK.grad.shape == (0, 2)


@pytest.mark.parametrize("use_triton", [False, True], ids=["reference", "triton"])
def test_every_slot_dropped_and_no_row_given(use_triton):
    """An EP rank whose every slot was dropped sends no row and gets none back: permute backward and unpermute
    (forward and backward) on zero rows give zeros and zero grads (the reference used to raise from
    ``index_select`` on the empty rows)."""
    T, K, D = 3, 2, 4
    row_TK = torch.full((T, K), -1, dtype=torch.int64, device=DEVICE)
    no_rows = torch.empty(0, dtype=torch.int64, device=DEVICE)
    y_ND, w_TK = rand(0, D).requires_grad_(), rand(T, K).requires_grad_()
    y_TD = P.unpermute_rows(y_ND, w_TK, row_TK, no_rows, no_rows, use_triton)
    y_TD.backward(rand(T, D, seed=1))
    assert torch.equal(y_TD, torch.zeros(T, D, device=DEVICE))
    assert y_ND.grad.shape == (0, D) and torch.equal(w_TK.grad, torch.zeros(T, K, device=DEVICE))
    x_TD = rand(T, D).requires_grad_()
    x_ND = P.permute_rows(x_TD, no_rows, row_TK, use_triton)
    x_ND.backward(rand(0, D))
    assert x_ND.shape == (0, D) and torch.equal(x_TD.grad, torch.zeros(T, D, device=DEVICE))


def test_bad_shapes_name_the_problem():
    row_TK, token_idx_N, slot_idx_N, _ = routing(4, 2, 4, drop=False, seed=0)
    with pytest.raises(ValueError, match="row_TK must be a 2-D int64"):
        P.permute_rows(rand(4, 3), token_idx_N, row_TK.int(), False)
    with pytest.raises(ValueError, match="x_TD must be 2-D with 4 rows"):
        P.permute_rows(rand(5, 3), token_idx_N, row_TK, False)
    with pytest.raises(ValueError, match="one common length N <= T\\*K=8"):
        P.unpermute_rows(rand(8, 3), rand(4, 2), row_TK, token_idx_N, slot_idx_N[:7], False)
    with pytest.raises(ValueError, match="y_ND must be 2-D with 8 rows"):
        P.unpermute_rows(rand(7, 3), rand(4, 2), row_TK, token_idx_N, slot_idx_N, False)
    with pytest.raises(ValueError, match="weight_TK must be a float tensor of shape \\(4, 2\\)"):
        P.unpermute_rows(rand(8, 3), rand(4, 1), row_TK, token_idx_N, slot_idx_N, False)
