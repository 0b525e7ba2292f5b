"""GQA options under tensor parallelism (gloo, TP=2) equal the single-process model with RANDOM weights everywhere
(non-zero q/k/v biases, norm weights away from 1): the vocab-sharded logits, the loss and every gradient shard.

``model.qk_norm=projection`` (OLMoE) sums the squares over the TP ranks (factory.tp_sum: all-reduce forward and
backward) and splits its weights like q/k; ``model.qkv_bias`` splits the column-parallel bias; partial RoPE and
``qk_norm=none`` need nothing from TP. A fully dense model (no MoE layer) runs too.
"""
import hashlib

import pytest
import torch

from tests.helpers.dist import run_distributed
from tests.parallel.test_model_parallel import S, tiny_cfg

NO_AUX = ("moe.aux_loss_coeff=0", "moe.z_loss_coeff=0")


def _random_full(name: str, shape: torch.Size) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return 1 + 0.2 * noise if "norm" in name else 0.1 * noise


def _compare(rank, world_size, overrides):
    from parallel.groups import ParallelGroups, initialize
    from parallel.model import build_model, token_losses
    from parallel.optim.grads import sync_grads
    from parallel.sharding import get_spec, local_slices

    cfg = tiny_cfg("parallel.tp=2", *NO_AUX, *overrides)
    g = initialize(2, 1, 1)
    single = ParallelGroups.single()
    ref, model = build_model(cfg, single), build_model(cfg, g)
    with torch.no_grad():
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            full = _random_full(name, ref_params[name].shape)
            ref_params[name].copy_(full)
            p.copy_(full[local_slices(get_spec(p), g)])
    tokens = torch.randint(0, cfg.model.vocab_size, (2, S + 1), generator=torch.Generator().manual_seed(5))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    ref_logits = ref(inputs)
    token_losses(ref_logits, labels, single).mean().backward()
    logits = model(inputs)
    loss = token_losses(logits.clone(), labels, g).mean()  # megatron's vocab-parallel CE edits its input in place
    loss.backward()
    sync_grads(model, g)
    v = cfg.model.vocab_size // 2
    torch.testing.assert_close(logits, ref_logits[..., g.tp_rank * v:(g.tp_rank + 1) * v], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, token_losses(ref_logits, labels, single).mean(), rtol=1e-5, atol=1e-6)
    ref_grads = dict((n, p.grad) for n, p in ref.named_parameters())
    for name, p in model.named_parameters():
        expected = ref_grads[name][local_slices(get_spec(p), g)]
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    return sorted(n for n, p in model.named_parameters() if get_spec(p).tp_axis is not None)


@pytest.mark.parametrize("overrides", [
    ("model.qk_norm=projection", "model.qkv_bias=true", "model.head_dim=16", "model.partial_rotary_factor=0.5"),
    ("model.qk_norm=none", "model.qkv_bias=true", "model.dense_layers=[0,1,2,3]"),
], ids=["olmoe-projection-norm-bias-partial-rope", "dense-no-norm-bias"])
def test_attention_options_tp2_match_single_process(overrides):
    split = run_distributed(_compare, 2, overrides)[0]
    assert "layers.1.self_attn.q_proj.bias" in split  # the bias is split over TP like its projection
    if "model.qk_norm=projection" in overrides:
        assert {"layers.1.self_attn.q_norm.weight", "layers.1.self_attn.k_norm.weight"} <= set(split)
