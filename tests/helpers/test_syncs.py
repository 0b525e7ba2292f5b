"""tests/helpers/syncs.py counts what syncs, once per call, names the call site, and restores torch."""
import torch

from tests.helpers.syncs import count_syncs


def test_counts_sync_calls_once_each_with_their_call_site():
    x = torch.arange(6)
    with count_syncs() as syncs:
        x.sum().item()                                      # 1
        x.tolist()                                          # 2
        bool(x.any())                                       # 3
        torch.nonzero(x)                                    # 4
        torch.repeat_interleave(x, x)                       # 5: output size read back
        torch.repeat_interleave(x, x, output_size=15)       # not a sync
        x.repeat_interleave(2)                              # not a sync: int repeats
        torch.tensor([x.max(), x.min()])                    # 6: tensor from device tensors
        torch.tensor([1, 2])                                # not a sync: host data
        x + 1                                               # not a sync
    assert syncs.count == 6, syncs.report()
    assert all("test_syncs.py" in site for _, site in syncs.calls), syncs.report()
    assert [what.split(".")[-1] for what, _ in syncs.calls] == [
        "item", "tolist", "__bool__", "nonzero", "repeat_interleave", "tensor"]
    assert "6 host sync(s)" in syncs.report()


def test_patches_are_removed_after_the_block():
    with count_syncs():
        pass
    with count_syncs() as outer:
        pass
    torch.ones(1).item()
    assert outer.count == 0 and torch.Tensor.item.__name__ == "item"
