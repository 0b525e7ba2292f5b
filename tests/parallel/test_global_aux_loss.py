"""moe.aux_loss_scope=global_batch over data-parallel ranks (arXiv 2501.11873): two DP ranks, each with a fully
one-sided micro-batch that is balanced together, get the balanced aux-loss value; micro_batch keeps each rank's own
(imbalanced) value. The count reducer is the one build_model installs."""
import pytest
import torch

from tests.helpers.dist import run_distributed


def _rank_aux(rank, world, scope):
    from parallel.groups import initialize
    from parallel.model import count_sum
    from tests.moe_core.test_router import _one_sided_router

    groups = initialize(1, 1, 1)
    router, plus, minus = _one_sided_router(scope)
    router.count_reducer = count_sum(groups.dp_group)
    router.start_step()
    return {"aux": float(router(plus if rank == 0 else minus, 1).aux_loss)}


@pytest.mark.parametrize("scope", ["micro_batch", "global_batch"])
def test_global_batch_aux_loss_over_dp_ranks(scope):
    results = run_distributed(_rank_aux, 2, scope)
    p_chosen = torch.softmax(torch.tensor([2.0, -2.0]), 0)[0].item()
    expected = 0.5 if scope == "global_batch" else 0.5 * 2 * p_chosen  # coeff (balanced) vs coeff * E * p (one-sided)
    assert [r["aux"] for r in results] == pytest.approx([expected, expected])


def test_build_model_installs_the_dp_reducer_only_for_global_batch():
    run_distributed(_installed, 2)


def _installed(rank, world):
    from launcher.config import load_config
    from parallel.groups import initialize
    from parallel.model import build_model
    from moe_core.router import _no_reduction

    groups = initialize(1, 1, 1)
    base = ["model.hidden_size=32", "model.num_layers=2", "model.vocab_size=64", "moe.num_experts=4",
            "moe.expert_ffn_hidden_size=32", "data.source=synthetic"]
    for scope, installed in (("micro_batch", False), ("global_batch", True)):
        model = build_model(load_config(None, [*base, f"moe.aux_loss_scope={scope}"]), groups)
        for layer in model.moe_layers().values():
            assert (layer.router.count_reducer is not _no_reduction) == installed
