"""Torch-backend FP8 modules on CPU (real float8 storage, emulated GEMM) against the high-precision model."""
import copy

import pytest
import torch

from launcher.config import Config
from moe_core.config import MoNEConfig
from moe_core.experts import SwiGLUExperts
from moe_core.transformer import MoETransformer
from parallel.fp8 import convert_to_fp8, fp8_context, fp8_stats
from parallel.fp8_emulation import emulated_scaled_mm
from parallel.fp8_torch import Fp8Linear, Fp8SwiGLUExperts, fp8_active

# Relative (Frobenius) error bounds vs. the fp32 model. E4M3 (3 mantissa bits) rounds each operand by up to
# ~6%; gradients are E5M2 (2 bits, up to ~12%) and pass through two or three FP8 GEMMs. A wrong layout or scale
# gives errors of order 1.
FP8_REL_TOL, GRAD_REL_TOL = 0.08, 0.2


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _tiny_cfg(**fp8) -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.hidden_size, m.num_layers, m.num_attention_heads, m.num_query_groups, m.seq_length = \
        64, 32, 3, 2, 1, 16
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_ffn_hidden_size = 4, 2, 48
    cfg.train.precision, cfg.fp8.backend = "fp8", "torch"
    for k, v in fp8.items():
        setattr(cfg.fp8, k, v)
    return cfg


def test_fp8_linear_matches_linear_and_is_exact_outside_context():
    torch.manual_seed(0)
    ref = torch.nn.Linear(32, 48)
    lin = Fp8Linear(ref, _tiny_cfg().fp8, gemm=emulated_scaled_mm)
    assert lin.weight is ref.weight and lin.bias is ref.bias
    x = torch.randn(2, 5, 32, requires_grad=True)
    torch.testing.assert_close(lin(x), ref(x), rtol=0, atol=0)
    with fp8_active():
        y = lin(x)
    y_ref = ref(x)
    assert 0 < _rel_err(y, y_ref) < FP8_REL_TOL  # > 0: the FP8 path really ran
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, lin.weight), g)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, ref.weight), g)
    assert _rel_err(dx, dx_ref) < GRAD_REL_TOL and _rel_err(dw, dw_ref) < GRAD_REL_TOL


def test_fp8_linear_under_autocast_keeps_fp32_master_grads():
    torch.manual_seed(0)
    ref = torch.nn.Linear(32, 48, bias=False)
    lin = Fp8Linear(ref, _tiny_cfg().fp8, gemm=emulated_scaled_mm)
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), fp8_active():
        y = lin(x)
        y_ref = ref(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and _rel_err(y, y_ref) < FP8_REL_TOL


@pytest.mark.parametrize("mone", [False, True])
def test_fp8_experts_match_high_precision_experts(mone):
    torch.manual_seed(0)
    experts = SwiGLUExperts(3, 32, 48, MoNEConfig(enabled=mone, keep_ratio=0.5))
    fp8_experts = Fp8SwiGLUExperts(experts, _tiny_cfg().fp8, gemm=emulated_scaled_mm)
    assert dict(fp8_experts.named_parameters()) == dict(experts.named_parameters())  # same names, same objects
    x = torch.randn(9, 32, requires_grad=True)
    tokens = [4, 0, 5]
    with fp8_active():
        y = fp8_experts(x, tokens)
    y_ref = experts(x, tokens)
    params = list(experts.parameters())
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + params, g)
    grads_ref = torch.autograd.grad(y_ref, [x] + params, g)
    # MoNE: FP8 rounding of the gate flips a few near-tied neuron choices, so outputs differ a little more
    assert 0 < _rel_err(y, y_ref) < (GRAD_REL_TOL if mone else FP8_REL_TOL)
    for got, want in zip(grads, grads_ref):
        assert _rel_err(got, want) < GRAD_REL_TOL
    metas = [name for name, _ in fp8_experts.named_modules() if name.endswith("_meta")]
    assert metas == (["gate_meta"] if mone else ["gate_meta", "up_meta", "down_meta"])


def test_convert_model_keeps_router_first_last_and_params():
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    ref = MoETransformer(cfg.model, cfg.moe, cfg.train.seed)
    model = copy.deepcopy(ref)
    before = {n: p for n, p in model.named_parameters()}
    for i, block in model.layers.items():
        convert_to_fp8(block, cfg, int(i), gemm=emulated_scaled_mm)
    assert {n: p for n, p in model.named_parameters()} == before  # names and Parameter objects unchanged
    assert model.state_dict().keys() == ref.state_dict().keys()    # checkpoints see no FP8 state
    assert isinstance(model.layers["1"].self_attn.q_proj, Fp8Linear)
    assert isinstance(model.layers["1"].mlp.experts, Fp8SwiGLUExperts)
    assert type(model.layers["1"].mlp.router).__name__ == "TopKRouter"
    for kept in ("0", "2"):
        assert not any("fp8" in type(m).__name__.lower() for m in model.layers[kept].modules())

    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16))
    with fp8_context(cfg):
        logits = model(tokens)
    logits_ref = ref(tokens)
    assert 0 < _rel_err(logits, logits_ref) < FP8_REL_TOL
    logits.float().square().mean().backward()
    logits_ref.float().square().mean().backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert _rel_err(p.grad, p_ref.grad) < GRAD_REL_TOL, name

    stats = fp8_stats(model)
    q = "train_fp8/layers.1.self_attn.q_proj"
    assert stats[f"{q}/input_amax"] > 0 and stats[f"{q}/grad_output_amax"] > 0
    q_weight = model.layers["1"].self_attn.q_proj.weight
    assert stats[f"{q}/weight_scale"] == pytest.approx(448.0 / q_weight.abs().max().item())
    assert {f"train_fp8/layers.1.mlp.experts.{p}/weight_amax" for p in ("gate", "up", "down")} <= set(stats)
    assert not any(".layers.0." in k or "layers.2." in k or "router" in k for k in stats)
