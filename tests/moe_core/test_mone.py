"""MoNE neuron selection: exactness at keep_ratio=1, per-token loop reference, zero gradients, scores, backends."""
import inspect
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from moe_core.config import MoNEConfig
from moe_core.experts import SwiGLUExperts
from moe_core.mone import keep_count, mone_swiglu_torch, neuron_balance_loss, resolve_mone_fn

SPLITS = [4, 0, 3]
COUNTS = torch.tensor(SPLITS)  # as the API takes them: int64 on the token device
D, FFN = 8, 16


def _experts(**mone) -> SwiGLUExperts:
    torch.manual_seed(0)
    return SwiGLUExperts(len(COUNTS), D, FFN, MoNEConfig(**mone))


def _per_token_reference(x_ND, experts: SwiGLUExperts, score: str) -> torch.Tensor:
    """Row by row: rank neurons by a full descending sort, keep keep_k of them, gather only those weights."""
    expert_of_row = [e for e, n in enumerate(SPLITS) for _ in range(n)]
    rows = []
    for x_D, e in zip(x_ND, expert_of_row):
        pre_F = experts.w_gate_EFD[e] @ x_D
        post_F = F.silu(pre_F)
        ranking = (post_F if score == "post_act" else pre_F).abs().argsort(descending=True)
        kept = ranking[: experts.keep_k]
        hidden_k = post_F[kept] * (experts.w_up_EFD[e][kept] @ x_D)
        rows.append(experts.w_down_EDF[e][:, kept] @ hidden_k)
    return torch.stack(rows)


def test_keep_count_rounds_half_up_and_validates():
    assert keep_count(0.5, 16) == 8 and keep_count(0.25, 10) == 3 and keep_count(0.01, 16) == 1
    assert keep_count(1.0, 16) == 16
    # exact decimal arithmetic: 0.29 * 50 = 14.5 -> 15 (binary float gives 14.499999999999998 -> 14)
    assert keep_count(0.29, 50) == 15 and keep_count(0.57, 50) == 29
    with pytest.raises(ValueError, match="keep_ratio"):
        keep_count(0.0, 16)


def test_keep_ratio_one_equals_dense_expert_exactly():
    dense, mone = _experts(), _experts(enabled=True, keep_ratio=1.0)
    x = torch.randn(sum(SPLITS), D)
    assert torch.equal(mone(x, COUNTS), dense(x, COUNTS))


@pytest.mark.parametrize("score", ["post_act", "pre_act"])
def test_mone_matches_per_token_loop_reference(score):
    experts = _experts(enabled=True, keep_ratio=0.25, score=score)
    assert experts.keep_k == 4 and experts.kept_fraction == 0.25
    x = torch.randn(sum(SPLITS), D)
    torch.testing.assert_close(experts(x, COUNTS), _per_token_reference(x, experts, score), atol=1e-6, rtol=1e-5)


def test_dropped_neurons_get_exactly_zero_gradient():
    experts = _experts(enabled=True, keep_ratio=0.25)
    x = torch.randn(1, D)  # one token for expert 0 only
    counts = torch.tensor([1, 0, 0])
    experts(x, counts).square().sum().backward()
    kept = F.silu(experts.w_gate_EFD[0] @ x[0]).abs().topk(experts.keep_k).indices
    dropped = torch.ones(FFN, dtype=torch.bool)
    dropped[kept] = False
    for grad_FD in (experts.w_gate_EFD.grad[0], experts.w_up_EFD.grad[0], experts.w_down_EDF.grad[0].T):
        assert torch.all(grad_FD[dropped] == 0)
        assert torch.all(grad_FD[kept].abs().sum(-1) > 0)


def test_pre_act_and_post_act_scores_differ_only_where_silu_reorders():
    # W_gate = W_up = W_down = I, so y_i = silu(x_i) * x_i for the kept neuron i and 0 otherwise.
    eye = torch.eye(2).unsqueeze(0)
    run = lambda x, score: mone_swiglu_torch(x, torch.tensor([x.shape[0]]), eye, eye, eye, 1, score)  # noqa: E731
    # |silu(-3)| = 0.14 < |silu(0.5)| = 0.31 although |-3| > |0.5|: the two scores keep different neurons
    x = torch.tensor([[-3.0, 0.5]])
    assert run(x, "post_act")[0, 0] == 0 and run(x, "post_act")[0, 1] > 0
    assert run(x, "pre_act")[0, 0] > 0 and run(x, "pre_act")[0, 1] == 0
    # silu is monotonic for positive inputs: both scores agree
    x = torch.tensor([[2.0, 0.5]])
    assert torch.equal(run(x, "post_act"), run(x, "pre_act"))
    with pytest.raises(ValueError, match="score"):
        run(x, "gate")


def test_neuron_balance_loss_values():
    eye = torch.eye(2).unsqueeze(0)  # pre-activations are the inputs; pre_act score = |x|
    balanced = torch.tensor([[3.0, 1.0], [1.0, 3.0]])  # each neuron kept once, mean shares [0.5, 0.5]
    skewed = torch.tensor([[3.0, 1.0], [3.0, 1.0]])  # neuron 0 always kept, mean shares [0.75, 0.25]
    torch.testing.assert_close(neuron_balance_loss(balanced, torch.tensor([2]), eye, 1, "pre_act"), torch.tensor(1.0))
    torch.testing.assert_close(neuron_balance_loss(skewed, torch.tensor([2]), eye, 1, "pre_act"), torch.tensor(1.5))
    # experts without rows are ignored in the mean
    torch.testing.assert_close(neuron_balance_loss(skewed, torch.tensor([0, 2]), eye.repeat(2, 1, 1), 1, "pre_act"),
                               torch.tensor(1.5))
    # dead rows past the counts (capacity-dropped slots) are ignored, NaN or not
    with_dead = torch.cat([skewed, torch.full((2, 2), float("nan"))])
    torch.testing.assert_close(neuron_balance_loss(with_dead, torch.tensor([2]), eye, 1, "pre_act"), torch.tensor(1.5))


def test_neuron_balance_loss_gradient_is_injected_with_coefficient():
    coeff = 0.3
    plain, balanced = _experts(enabled=True, keep_ratio=0.5), _experts(enabled=True, keep_ratio=0.5,
                                                                       balance_loss_coeff=coeff)
    x = torch.randn(sum(SPLITS), D)
    balanced(x, COUNTS).sum().backward()
    (plain(x, COUNTS).sum() + coeff * neuron_balance_loss(x, COUNTS, plain.w_gate_EFD, plain.keep_k,
                                                          "post_act")).backward()
    torch.testing.assert_close(balanced.w_gate_EFD.grad, plain.w_gate_EFD.grad)
    assert not torch.equal(balanced.w_gate_EFD.grad, _grad_without_balance(x))


def _grad_without_balance(x):
    experts = _experts(enabled=True, keep_ratio=0.5)
    experts(x, COUNTS).sum().backward()
    return experts.w_gate_EFD.grad


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_mone_fn("torch", cuda) is mone_swiglu_torch
    assert resolve_mone_fn("auto", cpu) is mone_swiglu_torch
    fake = types.ModuleType("kernels.mone")
    fake.mone_swiglu_grouped = lambda *args: None
    monkeypatch.setitem(sys.modules, "kernels.mone", fake)
    assert resolve_mone_fn("auto", cuda) is fake.mone_swiglu_grouped
    assert resolve_mone_fn("triton", cpu) is fake.mone_swiglu_grouped
    monkeypatch.setitem(sys.modules, "kernels.mone", None)  # makes the import fail
    assert resolve_mone_fn("auto", cuda) is mone_swiglu_torch
    with pytest.raises(ImportError, match="backend=torch"):
        resolve_mone_fn("triton", cuda)
    with pytest.raises(ValueError, match="backend"):
        resolve_mone_fn("cuda", cuda)


def test_configured_backend_is_called(monkeypatch):
    calls = []
    fake = types.ModuleType("kernels.mone")
    fake.mone_swiglu_grouped = lambda *args: calls.append(args[5:]) or mone_swiglu_torch(*args)
    monkeypatch.setitem(sys.modules, "kernels.mone", fake)
    experts = _experts(enabled=True, keep_ratio=0.5, score="pre_act", backend="triton")
    experts(torch.randn(sum(SPLITS), D), COUNTS)
    assert calls == [(8, "pre_act")]


def test_triton_kernel_has_the_contract_signature():
    import kernels.mone as kernels_mone  # triton is a pinned dependency, so this must import everywhere

    params = list(inspect.signature(kernels_mone.mone_swiglu_grouped).parameters)
    assert params == list(inspect.signature(mone_swiglu_torch).parameters)
