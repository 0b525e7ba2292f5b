"""Delayed/current scaling bookkeeping of the torch FP8 backend, checked by hand on CPU with real float8 tensors."""
import pytest
import torch

from parallel.config import FP8Config
from parallel.fp8_emulation import emulated_scaled_mm
from parallel.fp8_torch import Fp8Meta, ScalingState, fp8_grouped_mm, scaled_mm

E4M3 = torch.float8_e4m3fn


def _x(amax: float) -> torch.Tensor:
    return torch.tensor([[amax, -amax / 4], [amax / 2, 0.0]])


def _quantize(st: ScalingState, x: torch.Tensor, slot: int):
    q, scale_inv = st.quantize_rows(x, [x.shape[0]], first_slot=slot)
    return q, scale_inv[0]


def test_delayed_scaling_matches_hand_computed_case():
    # L=2, margin=1: scale = 448 / amax / 2. Step amaxes 2, 8, 1, 0.5.
    st = ScalingState(1, E4M3, "delayed", history_len=2, margin=1)
    seen = []
    for amax in (2.0, 8.0, 1.0, 0.5):
        st.begin()
        q, scale_inv = _quantize(st, _x(amax), 0)
        seen.append((float(st.scale[0]), st.amax_history[:, 0].tolist(), float(q.float().max() * scale_inv)))
    assert seen == [
        (112.0, [2.0, 0.0], 2.0),   # first use: scaled from its own amax (448/2/2)
        (112.0, [8.0, 2.0], 4.0),   # window {2, 0} -> 112; 8 * 112 saturates at 448 -> dequantised 4
        (28.0, [1.0, 8.0], 1.0),    # window {8, 2} -> 448/8/2
        (28.0, [0.5, 1.0], 0.5),    # window {1, 8} -> 28 (8 is still inside the last L=2 steps)
    ]
    st.begin()
    assert float(st.scale[0]) == 224.0 and st.amax_history[:, 0].tolist() == [0.0, 0.5]  # window {0.5, 1}


def test_most_recent_algo_and_zero_amax():
    st = ScalingState(1, E4M3, "delayed", history_len=4, compute_algo="most_recent")
    for amax, expected_scale in ((4.0, 112.0), (1.0, 112.0), (0.0, 448.0), (2.0, 448.0)):
        st.begin()
        _, scale_inv = _quantize(st, _x(amax), 0)
        assert float(st.scale[0]) == expected_scale and float(scale_inv) == pytest.approx(1 / expected_scale)
    st.begin()
    assert float(st.scale[0]) == 224.0  # the zero amax kept the old scale; now 448/2


def test_current_scaling_uses_own_amax():
    st = ScalingState(2, torch.float8_e5m2, "current", history_len=3)
    for amax in (3.0, 1e-3, 7.0):
        st.begin()
        q, scale_inv = _quantize(st, _x(amax), 1)
        assert torch.isclose(1 / scale_inv, torch.tensor(57344.0 / amax))
        assert float(q.float().abs().max() * scale_inv) == pytest.approx(amax, rel=1e-6)
        assert float(st.amax_history[0, 1]) == pytest.approx(amax) and float(st.amax_history[0, 0]) == 0.0


def test_grouped_bookkeeping_shape_for_shape_with_te():
    G, L, splits = 3, 4, [2, 0, 3]
    meta = Fp8Meta(G, FP8Config(backend="torch", amax_history_len=L))
    assert meta.fwd.amax_history.shape == (L, 3 * G) and meta.fwd.scale.shape == (3 * G,)
    assert meta.bwd.amax_history.shape == (L, 2 * G) and meta.bwd.scale.shape == (2 * G,)
    assert meta.bwd.dtype == torch.float8_e5m2 and meta.fwd.dtype == E4M3
    torch.manual_seed(0)
    x = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(G, 32, 16, requires_grad=True)
    y = fp8_grouped_mm(x, w, splits, meta, emulated_scaled_mm)
    g = torch.randn_like(y)
    y.backward(g)
    xs, gs = x.detach().split(splits), g.split(splits)
    amax = lambda t: t.abs().max().item() if t.numel() else 0.0  # noqa: E731
    expect_fwd = [amax(t) for t in xs] + [amax(w[e]) for e in range(G)] + [0.0] * G  # empty input group: 0
    expect_bwd = [amax(t) for t in gs] + [0.0] * G
    assert meta.fwd.amax_history[0].tolist() == pytest.approx(expect_fwd)
    assert meta.bwd.amax_history[0].tolist() == pytest.approx(expect_bwd)
    assert meta.fwd.amax_history[1:].abs().sum() == 0 and w.grad[1].abs().sum() == 0


def test_emulation_matches_torch_scaled_mm():
    torch.manual_seed(0)
    a, b = (torch.randn(24, 48) * 3).to(E4M3), torch.randn(40, 48).to(E4M3)   # unaligned M, N: padded
    sa, sb = torch.tensor(0.25), torch.tensor(0.5)
    ref = emulated_scaled_mm(a, sa, b, sb, torch.float32)
    torch.testing.assert_close(scaled_mm(a, sa, b, sb, torch.float32), ref, rtol=1e-5, atol=1e-4)
    g = torch.randn(24, 40).to(torch.float8_e5m2)  # the backward's e5m2 x e4m3 pairing
    torch.testing.assert_close(scaled_mm(g, sa, b.t().contiguous(), sb, torch.float32),
                               emulated_scaled_mm(g, sa, b.t().contiguous(), sb, torch.float32), rtol=1e-5, atol=1e-4)
