"""torchao-backend FP8 modules on CPU against the high-precision model: torchao Float8Linear (the real torchao code:
CPU has torch._scaled_mm), the grouped FP8 experts (CPU emulation of the CUDA grouped GEMM), whole-model conversion."""
import copy

import pytest
import torch

from launcher.config import Config
from moe_core.config import MoNEConfig
from moe_core.experts import SwiGLUExperts
from moe_core.transformer import MoETransformer
from parallel.fp8.swap import convert_to_fp8, fp8_context, fp8_stats
from parallel.fp8.experts import Float8GroupedExperts
from parallel.fp8.torchao_backend import convert_module
from tests.helpers.syncs import count_syncs

# Relative (Frobenius) error bounds vs. the fp32 model. E4M3 (3 mantissa bits) rounds each operand by up to ~6%,
# E5M2 gradients (tensorwise) by up to ~12%, through two or three FP8 GEMMs. A wrong layout or scale gives
# errors of order 1.
FP8_REL_TOL, GRAD_REL_TOL = 0.08, 0.2


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _tiny_cfg(**fp8) -> Config:
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.hidden_size, m.num_layers, m.num_attention_heads, m.num_query_groups, m.seq_length = \
        64, 32, 3, 2, 1, 16
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_ffn_hidden_size = 4, 2, 48
    cfg.train.precision = "fp8"
    for k, v in fp8.items():
        setattr(cfg.fp8, k, v)
    return cfg


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_linear_becomes_torchao_float8_with_shared_parameters(recipe):
    torch.manual_seed(0)
    ref = torch.nn.Linear(32, 48)
    lin = convert_module(copy.deepcopy(ref), _tiny_cfg(recipe=recipe).fp8)
    assert type(lin).__name__ == "Float8Linear"
    assert lin.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 5, 32, requires_grad=True)
    y, y_ref = lin(x), ref(x)
    assert 0 < _rel_err(y, y_ref) < FP8_REL_TOL  # > 0: the FP8 path really ran
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, lin.weight), g)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, ref.weight), g)
    assert _rel_err(dx, dx_ref) < GRAD_REL_TOL and _rel_err(dw, dw_ref) < GRAD_REL_TOL


def test_unaligned_linear_stays_high_precision():
    lin = torch.nn.Linear(32, 40)  # 40 is not a multiple of 16: no FP8 GEMM for it
    assert convert_module(lin, _tiny_cfg().fp8) is lin


def _experts_case(mone: bool, dtype=torch.float32):
    torch.manual_seed(0)
    experts = SwiGLUExperts(3, 32, 48, MoNEConfig(enabled=mone, keep_ratio=0.5)).to(dtype)
    counts_E = torch.tensor([7, 0, 12])  # an empty expert, groups that are not multiples of 16
    x_ND = torch.randn(23, 32, dtype=dtype)  # 19 live rows, then 4 dead rows
    return experts, counts_E, x_ND


@pytest.mark.parametrize("mone", [False, True])
def test_fp8_experts_match_high_precision_experts(mone):
    experts, counts_E, x_ND = _experts_case(mone)
    fp8_experts = Float8GroupedExperts(experts)
    assert dict(fp8_experts.named_parameters()) == dict(experts.named_parameters())  # same names, same objects
    x_ND.requires_grad_()
    y_ND = fp8_experts(x_ND, counts_E)
    y_ref = experts(x_ND, counts_E)
    live = int(counts_E.sum())
    params = list(experts.parameters())
    g_ND = torch.randn_like(y_ND)
    g_ND[live:] = 0  # dead rows' outputs are ignored downstream
    grads = torch.autograd.grad(y_ND, [x_ND] + params, g_ND)
    grads_ref = torch.autograd.grad(y_ref, [x_ND] + params, g_ND)
    # MoNE: FP8 rounding of the gate flips a few near-tied neuron choices, so outputs differ a little more
    assert 0 < _rel_err(y_ND[:live], y_ref[:live]) < (GRAD_REL_TOL if mone else FP8_REL_TOL)
    assert _rel_err(grads[0][:live], grads_ref[0][:live]) < GRAD_REL_TOL
    for name, got, want in zip(("w_gate", "w_up", "w_down"), grads[1:], grads_ref[1:]):
        assert _rel_err(got, want) < GRAD_REL_TOL, name
        assert got[1].abs().sum() == 0, name  # the empty expert gets no gradient


def test_fp8_mone_selects_on_the_gate_its_swiglu_uses(monkeypatch):
    """With MoNE the FP8 gate output is both the selection's input and the SwiGLU's g (one tensor, not a bf16
    recomputation that could pick other neurons on near-ties)."""
    import moe_core.grouped
    import moe_core.mone
    from parallel.fp8.grouped import PaddedGroups, fp8_grouped_mm

    experts, counts_E, x_ND = _experts_case(mone=True)
    seen = {}

    def recording(name, fn):
        def wrapper(pre_act_NF, *args):
            seen.setdefault(name, pre_act_NF)  # the first call (the balance loss recomputes its own)
            return fn(pre_act_NF, *args)
        return wrapper

    for module, name in ((moe_core.mone, "select_neurons"), (moe_core.grouped, "masked_swiglu")):
        monkeypatch.setattr(module, name, recording(name, getattr(module, name)))
    Float8GroupedExperts(experts)(x_ND, counts_E)
    groups = PaddedGroups.build(counts_E, x_ND.shape[0])
    gate_NF = groups.unpad(fp8_grouped_mm(groups.pad(x_ND), experts.w_gate_EFD, groups.offs_E))
    assert seen["select_neurons"] is seen["masked_swiglu"]
    live = int(counts_E.sum())  # dead rows are unspecified
    torch.testing.assert_close(seen["select_neurons"][:live], gate_NF[:live], rtol=0, atol=0)


def test_fp8_experts_make_no_host_sync_and_keep_bf16():
    experts, counts_E, x_ND = _experts_case(mone=False, dtype=torch.bfloat16)
    fp8_experts = Float8GroupedExperts(experts)
    x_ND.requires_grad_()
    with count_syncs() as forward:
        y_ND = fp8_experts(x_ND, counts_E)
    with count_syncs() as backward:
        y_ND.float().square().sum().backward()
    assert forward.count == 0 and backward.count == 0, forward.report() + backward.report()
    assert y_ND.dtype == torch.bfloat16 and experts.w_up_EFD.grad.dtype == torch.bfloat16


def test_unaligned_experts_are_refused():
    with pytest.raises(ValueError, match="multiples of 16"):
        Float8GroupedExperts(SwiGLUExperts(2, 32, 40, MoNEConfig()))


@pytest.mark.parametrize("shared", [False, True], ids=["routed-only", "shared-expert-gate"])
def test_convert_model_keeps_router_first_last_and_params(shared):
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    if shared:  # the shared expert's projections go FP8, its 1-wide sigmoid gate stays high precision
        cfg.moe.shared_expert_ffn_hidden_size, cfg.moe.shared_expert_gate = 32, True
    ref = MoETransformer(cfg.model, cfg.moe, cfg.train.seed)
    model = copy.deepcopy(ref)
    before = {n: p for n, p in model.named_parameters()}
    for i, block in model.layers.items():
        convert_to_fp8(block, cfg, int(i))
    assert {n: p for n, p in model.named_parameters()} == before  # names and Parameter objects unchanged
    assert model.state_dict().keys() == ref.state_dict().keys()    # checkpoints see no FP8 state
    assert type(model.layers["1"].self_attn.q_proj).__name__ == "Float8Linear"
    assert isinstance(model.layers["1"].mlp.experts, Float8GroupedExperts)
    assert type(model.layers["1"].mlp.router).__name__ == "TopKRouter"
    if shared:
        assert type(model.layers["1"].mlp.shared_expert.down_proj).__name__ == "Float8Linear"
        assert type(model.layers["1"].mlp.shared_expert_gate).__name__ == "ReplicatedLinear"
    for kept in ("0", "2"):
        assert not any("float8" in type(m).__name__.lower() for m in model.layers[kept].modules())

    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16))
    with fp8_context(cfg):
        logits = model(tokens)
    logits_ref = ref(tokens)
    assert 0 < _rel_err(logits, logits_ref) < FP8_REL_TOL
    logits.float().square().mean().backward()
    logits_ref.float().square().mean().backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert _rel_err(p.grad, p_ref.grad) < GRAD_REL_TOL, name
    assert fp8_stats(model) == {}  # torchao scales dynamically: no scaling state to report
