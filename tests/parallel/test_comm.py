"""parallel/comm.py: forward and backward of each collective against its mathematical definition.

Every rank builds every rank's inputs from one shared seed, so it can compute the exact expected result and
gradient locally; the parent process asserts they match what the collective produced.
"""
import pytest
import torch
import torch.distributed as dist

from parallel import comm
from tests.helpers.dist import run_distributed

WORLD = 3  # odd, so ragged splits and a rank receiving nothing are both exercised
D = 4


def _splits_table(world):
    """send[src][dst] = rows src sends to dst; includes zeros and a rank (0) that receives nothing from anyone."""
    g = torch.Generator().manual_seed(7)
    table = torch.randint(0, 4, (world, world), generator=g)
    table[:, 0] = 0
    return table.tolist()


def _rank_rows(src, rows, seed):
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed * 100 + src))


def _check_all_to_all(rank, world):
    send = _splits_table(world)
    xs = [_rank_rows(s, sum(send[s]), seed=1) for s in range(world)]
    gs = [_rank_rows(s, sum(send[d][s] for d in range(world)), seed=2) for s in range(world)]  # grad of outputs
    x = xs[rank].clone().requires_grad_(True)
    out = comm.all_to_all(x, [send[s][rank] for s in range(world)], send[rank], group=dist.group.WORLD)
    (out * gs[rank]).sum().backward()
    # Expected: rank receives, in source-rank order, the block each source addressed to it.
    offsets = lambda row: [sum(row[:i]) for i in range(len(row))]  # noqa: E731
    want_out = torch.cat([xs[s][offsets(send[s])[rank]:][:send[s][rank]] for s in range(world)])
    # Expected grad: row j of my block for dst d is output row (offset of my block in d's output) of d's grad.
    want_grad = torch.cat([gs[d][sum(send[s][d] for s in range(rank)):][:send[rank][d]] for d in range(world)])
    return out.detach(), want_out, x.grad, want_grad


def _check_split_gather(rank, world):
    g = torch.Generator().manual_seed(3)
    x_full = torch.randn(2 * world, D, generator=g)  # replicated input
    slice_grads = [torch.randn(2, D, generator=g) for _ in range(world)]  # per-rank grad of its slice
    x = x_full.clone().requires_grad_(True)
    part = comm.split_dim0(x, group=dist.group.WORLD)
    (part * slice_grads[rank]).sum().backward()
    split = (part.detach(), x_full[2 * rank:2 * rank + 2], x.grad, torch.cat(slice_grads))

    parts = [torch.randn(2, D, generator=g) for _ in range(world)]  # per-rank input
    full_grad = torch.randn(2 * world, D, generator=g)  # replicated downstream grad
    y = parts[rank].clone().requires_grad_(True)
    gathered = comm.gather_dim0(y, group=dist.group.WORLD)
    (gathered * full_grad).sum().backward()
    gather = (gathered.detach(), torch.cat(parts), y.grad, full_grad[2 * rank:2 * rank + 2])
    return split, gather


def _check_counts(rank, world):
    counts = torch.tensor([rank, 10 * rank, 1], dtype=torch.int64)
    return comm.all_reduce_counts(counts, group=dist.group.WORLD), counts


def _check_uneven_split_error(rank, world):
    try:
        comm.split_dim0(torch.zeros(world + 1, D), group=dist.group.WORLD)
    except ValueError as e:
        return str(e)
    return None


def _missing_group_errors(rank, world):
    """Inside a real world, None must not mean the world (issue 17): every entry point raises."""
    x = torch.zeros(world, D)
    calls = {"all_to_all": lambda: comm.all_to_all(x, [1] * world, [1] * world, None),
             "split_dim0": lambda: comm.split_dim0(x, None), "gather_dim0": lambda: comm.gather_dim0(x, None),
             "all_reduce_counts": lambda: comm.all_reduce_counts(torch.ones(2, dtype=torch.int64), None),
             "group_size": lambda: comm.group_size(None), "group_rank": lambda: comm.group_rank(None)}
    errors = {}
    for name, call in calls.items():
        try:
            call()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    return errors


def _all_checks(rank, world):
    return {"a2a": _check_all_to_all(rank, world), "split_gather": _check_split_gather(rank, world),
            "counts": _check_counts(rank, world), "uneven_error": _check_uneven_split_error(rank, world),
            "missing_group": _missing_group_errors(rank, world)}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_all_checks, WORLD)


def test_all_to_all_forward_and_backward(results):
    for rank, r in enumerate(results):
        out, want_out, grad, want_grad = r["a2a"]
        assert torch.equal(out, want_out), f"rank {rank} forward"
        assert torch.equal(grad, want_grad), f"rank {rank} backward"
    assert results[0]["a2a"][0].shape[0] == 0  # rank 0 receives nothing and still takes part


@pytest.mark.parametrize("which", ["split", "gather"])
def test_split_and_gather_dim0_forward_and_backward(results, which):
    idx = 0 if which == "split" else 1
    for rank, r in enumerate(results):
        out, want_out, grad, want_grad = r["split_gather"][idx]
        assert torch.equal(out, want_out), f"{which} rank {rank} forward"
        assert torch.equal(grad, want_grad), f"{which} rank {rank} backward"


def test_all_reduce_counts_sums_without_touching_input(results):
    want = torch.tensor([0 + 1 + 2, 0 + 10 + 20, WORLD])
    for rank, r in enumerate(results):
        total, original = r["counts"]
        assert torch.equal(total, want)
        assert torch.equal(original, torch.tensor([rank, 10 * rank, 1]))


def test_single_process_is_identity_and_validates():
    x = torch.randn(4, D, requires_grad=True)
    one = comm.SINGLE_PROCESS
    assert comm.all_to_all(x, [4], [4], group=one) is x
    assert comm.split_dim0(x, group=one) is x and comm.gather_dim0(x, group=one) is x
    assert comm.group_size(one) == 1 and comm.group_rank(one) == 0
    with pytest.raises(TypeError, match="tolist"):
        comm.all_to_all(x, torch.tensor([4]), [4], group=one)
    with pytest.raises(ValueError, match="1 ranks"):
        comm.all_to_all(x, [2, 2], [2, 2], group=one)
    with pytest.raises(ValueError, match="sum to 3"):
        comm.all_to_all(x, [4], [3], group=one)
    with pytest.raises(TypeError, match="integer"):
        comm.all_reduce_counts(torch.ones(2), group=one)
    with pytest.raises(ValueError, match="is None: pass the process group explicitly"):
        comm.split_dim0(x, group=None)


def test_a_missing_group_is_an_error_never_the_world(results):
    for r in results:
        for name, error in r["missing_group"].items():
            assert error is not None and "never taken as the world" in error, f"{name}(group=None) did not raise"


def test_split_dim0_rejects_uneven_rows(results):
    for r in results:
        assert r["uneven_error"] is not None and "divisible by the group size" in r["uneven_error"]
