"""launcher/bench/permute.py (a GPU benchmark): without CUDA it refuses in one line with exit code 2, bad
arguments are rejected, and the inputs it builds follow moe_core's permutation contract."""
import pytest
import torch

from launcher.bench import permute as bench


def test_without_cuda_prints_one_line_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "needs a CUDA GPU" in err


def test_bad_arguments_are_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--drop", "1.0"])
    assert exit_info.value.code == 2 and "0 <= --drop < 1" in capsys.readouterr().err


def test_inputs_follow_the_permutation_contract():
    """The benchmark feeds the kernels moe_core's permutation: T*K rows, dropped slots -1 in row_TK, dead rows
    last. (The Triton path itself is checked against the reference in tests/kernels/test_permute.py.)"""
    inputs = bench.make_inputs(T=6, K=2, D=8, E=4, drop=0.3, dtype=torch.float32, device="cpu", seed=1)
    row_TK, token_idx_N, slot_idx_N = inputs["maps"]
    assert token_idx_N.shape == slot_idx_N.shape == (12,) and bool((row_TK < 0).any())
    live_N = row_TK.reshape(-1)[slot_idx_N] >= 0
    assert int(live_N.sum()) == int((row_TK >= 0).sum()) and bool(live_N[: int(live_N.sum())].all())
    assert bool((inputs["w_TK"][row_TK < 0] == 0).all())
    y_TD, grad_x_TD, grad_w_TK = bench.forward_backward(lambda x, w, m: bench.chain(x, w, m, False), inputs)
    kept_w_T = inputs["w_TK"].detach().sum(1, keepdim=True)  # permute then unpermute: y = (sum of kept w) * x
    torch.testing.assert_close(y_TD, kept_w_T * inputs["x_TD"].detach())
    assert grad_x_TD.shape == (6, 8) and grad_w_TK.shape == (6, 2)
    assert bench.min_bytes(16384, 2, 2048, 2) == 15 * 16384 * 2048 * 2
