"""Dense-to-MoE upcycling (launcher/upcycle.py): a tiny random dense moetron model and its upcycled MoE give the same
logits at step 0 (plain, granular, shared expert, Matryoshka with renormalised gates at every multiple of G), raw
gates equal at the reference k and scale by k / k_ref elsewhere, and MoNE equals the dense model with the
documented per-slice neuron selection."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from launcher.config import load_config
from launcher.upcycle import UpcycleError, upcycle_state_dict
from moe_core.layers import SwiGLUMLP
from moe_core.transformer import MoETransformer

SEQ, VOCAB = 12, 64
DENSE = ["model.vocab_size=64", "model.hidden_size=32", "model.num_layers=3", "model.num_attention_heads=4",
         "model.num_query_groups=2", f"model.seq_length={SEQ}", "model.dense_layers=[0,1,2]",
         "model.dense_ffn_hidden_size=48", "data.source=synthetic"]


def dense_model():
    cfg = load_config(None, DENSE)
    model = MoETransformer(cfg.model, cfg.moe, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.2 * noise)
    return cfg, model


def upcycled(cfg, model, *args, **kwargs):
    moe_cfg, sd = upcycle_state_dict(cfg, model.state_dict(), *args, **kwargs)
    moe = MoETransformer(moe_cfg.model, moe_cfg.moe, seed=0).eval()
    moe.load_state_dict(sd, strict=True)
    return moe_cfg, moe


def tokens():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("args, kwargs, eval_ks", [
    ((4, 2), {}, (1, 2, 3, 4)),                                      # plain, renormalised: any k
    ((8, 4, 2), {}, (2, 4, 6)),                                      # granular G=2: every multiple of G
    ((12, 6, 3), {"shared_expert": True}, (3, 6)),                   # granular G=3 + shared expert
    ((8, 4, 2), {"matryoshka": (2, 6), "norm_topk_prob": True}, (2, 4, 6)),
    ((4, 2), {"keep_dense": [0]}, (2,)),
], ids=["plain", "granular-2", "granular-3-shared", "matryoshka-renormalised-granular", "keep-dense"])
def test_upcycled_logits_equal_dense(args, kwargs, eval_ks):
    cfg, dense = dense_model()
    moe_cfg, moe = upcycled(cfg, dense, *args, **kwargs)
    assert len(moe.moe_layers()) == 3 - len(kwargs.get("keep_dense", []))
    with torch.no_grad():
        expected = dense(tokens())
        for k in eval_ks:
            moe.set_eval_k(k)
            torch.testing.assert_close(moe(tokens()), expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"k={k}: {m}")
    assert moe_cfg.moe.expert_ffn_hidden_size == 48 // (args[2] if len(args) > 2 else 1)


def test_granular_upcycling_is_not_a_copy_at_odd_k():
    """The scale is real: at a k that is not a multiple of G a token misses slices, and the output differs."""
    cfg, dense = dense_model()
    _, moe = upcycled(cfg, dense, 8, 4, 2)
    moe.set_eval_k(3)
    with torch.no_grad():
        assert (moe(tokens()) - dense(tokens())).abs().max() > 1e-3


def _mlp_io(model, layer: int, x_TD):
    return model.layers[str(layer)].mlp(x_TD)


def test_raw_gates_equal_at_k_ref_and_scale_elsewhere():
    """norm_topk_prob false (Matryoshka's default): zero router, down projections times E / k_ref. The routed MLP
    output is (k / k_ref) times the dense MLP's; the logits equal the dense ones at k_ref = k_max."""
    cfg, dense = dense_model()
    moe_cfg, moe = upcycled(cfg, dense, 4, 4, matryoshka=(1, 4))
    assert not moe_cfg.moe.renormalise_gates and moe_cfg.moe.default_eval_k == 4
    assert all(float(layer.router.weight.abs().max()) == 0 for layer in moe.moe_layers().values())
    x_TD = torch.randn(20, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(moe(tokens()), dense(tokens()), rtol=1e-5, atol=1e-5)
        for k in (1, 2, 3, 4):
            moe.set_eval_k(k)
            torch.testing.assert_close(_mlp_io(moe, 1, x_TD), _mlp_io(dense, 1, x_TD) * k / 4, rtol=1e-5, atol=1e-6)


def _masked_mlp_forward(mlp: SwiGLUMLP, slices: int, keep: int):
    """The documented MoNE relation on the dense MLP: per token, per slice of F neurons, keep the ``keep`` neurons
    with the largest |silu(W_g x)|, zero the rest."""

    def forward(x):
        act = F.silu(mlp.gate_proj(x))
        h = (act * mlp.up_proj(x)).unflatten(-1, (slices, -1))
        top = act.unflatten(-1, (slices, -1)).abs().topk(keep, dim=-1).indices
        return mlp.down_proj((h * torch.zeros_like(h).scatter(-1, top, 1.0)).flatten(-2))

    return forward


@pytest.mark.parametrize("granularity", [1, 2])
def test_mone_upcycling_equals_dense_with_per_slice_neuron_selection(granularity):
    cfg, dense = dense_model()
    _, moe = upcycled(cfg, dense, 4 * granularity, 2 * granularity, granularity, mone_keep_ratio=0.5)
    with torch.no_grad():
        unmasked = dense(tokens())
        for block in dense.layers.values():
            block.mlp.forward = _masked_mlp_forward(block.mlp, granularity, 48 // granularity // 2)
        expected = dense(tokens())
        torch.testing.assert_close(moe(tokens()), expected, rtol=1e-5, atol=1e-5)
        assert (expected - unmasked).abs().max() > 1e-3  # the selection really drops neurons


@pytest.mark.parametrize("args, kwargs, message", [
    ((8, 4, 2), {"norm_topk_prob": False}, "granular upcycling needs renormalised gates"),
    ((6, 4, 4), {}, "must be multiples of the granularity"),
    ((8, 4, 5), {}, "must be >= 1 and divide the dense MLP width 48"),
    ((4, 2), {"keep_dense": [3]}, "outside [0, 3)"),
    ((4, 5), {}, "the upcycled config does not fit: moe.top_k (5)"),
])
def test_bad_arguments_are_one_line_errors(args, kwargs, message):
    cfg, dense = dense_model()
    with pytest.raises(UpcycleError) as err:
        upcycle_state_dict(cfg, dense.state_dict(), *args, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["model.dense_layers=[0]"], "must be dense"),
    (["model.mtp_num_layers=1"], "upcycle with model.mtp_num_layers=0"),
])
def test_refuses_a_model_with_moe_blocks(overrides, message):
    cfg = load_config(None, DENSE + overrides)
    with pytest.raises(UpcycleError, match=message):
        upcycle_state_dict(cfg, {}, 4, 2)
