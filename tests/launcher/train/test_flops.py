"""Analytic FLOP / parameter counts: a hand count on a tiny config, the MoE variants, and a cross-check against
DeepSpeed's FlopsProfiler on the real single-device model."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from launcher.config import Config, load_config
from launcher.train.flops import (default_k_per_layer, expected_k, executed_k_per_layer, forward_flops_per_token,
                            param_counts, training_flops)
from launcher.train.step_reduce import LayerStepStats

REPO = Path(__file__).resolve().parents[3]


TINY = ["model.vocab_size=10", "model.hidden_size=4", "model.num_layers=2", "model.num_attention_heads=2",
        "model.num_query_groups=1", "model.seq_length=3", "model.dense_layers=[0]", "model.dense_ffn_hidden_size=6",
        "moe.num_experts=4", "moe.top_k=2", "moe.expert_ffn_hidden_size=5", "train.global_batch_size=8"]


def tiny_cfg(*overrides: str) -> Config:
    """D=4, 2 layers (layer 0 dense), H=2 heads of hd=2, G=1 kv head, S=3, V=10, E=4 experts of F=5, top-2."""
    return load_config(None, TINY + list(overrides))


def test_hand_count_tiny_config():
    # Forward MACs per token, by hand:
    #   attention projections per layer: q 4*4 + k 4*2 + v 4*2 + o 4*4 = 48; two layers = 96
    #   scores per layer: QK^T 3*(2 heads*2) = 12 and PV 12 (full S x S) = 24; two layers = 48
    #   router (MoE layer 1 only): 4*4 = 16;  experts: 2 of 3*4*5 = 120;  dense FFN (layer 0): 3*4*6 = 72
    #   LM head: 4*10 = 40.  Total 392 MACs = 784 FLOPs forward; training 3x = 2352 per token.
    cfg = tiny_cfg()
    fwd = forward_flops_per_token(cfg)
    assert fwd.as_dict() == dict(attn_proj=192.0, attn_scores=96.0, router=32.0, shared_experts=0.0, experts=240.0,
                                 dense_ffn=144.0, lm_head=80.0, mtp_proj=0.0, experts_useful=240.0,
                                 shared_experts_useful=0.0)
    assert fwd.executed == fwd.useful == 784.0
    count = training_flops(cfg)
    assert count.tokens_per_step == 8 * 3
    assert count.train_per_token == 2352.0
    assert count.train_per_step == 2352.0 * 24


def test_param_counts_tiny_config():
    # embed 40 + head 40 + final norm 4 + per layer (attn 48 + q/k norm 2+2 + 2 norms 8 = 60) * 2
    # + dense FFN 72 + router 16 + 4 experts * 60 = 532 total; activated swaps 4 experts for 2: 532 - 120 = 412.
    p = param_counts(tiny_cfg())
    assert (p.total, p.activated) == (532, 412.0)


@pytest.mark.parametrize("overrides", [("model.qk_norm=projection", "model.qkv_bias=true"), ("model.qk_norm=none",),
                                       ("model.partial_rotary_factor=0.5", "model.head_dim=4"),
                                       ("model.dense_layers=[0,1]",)])
def test_param_counts_equal_the_model(overrides):
    """q/k norms per model.qk_norm (per head: 2 hd; projection: (H + G) hd; none: 0), q/k/v biases, and a model
    with no MoE layer: the count is the real model's."""
    from moe_core.transformer import MoETransformer

    cfg = tiny_cfg(*overrides)
    model = MoETransformer(cfg.model, cfg.moe, seed=0)
    assert param_counts(cfg).total == sum(p.numel() for p in model.parameters())


MLA = ["model.attention=mla", "model.q_lora_rank=3", "model.kv_lora_rank=4", "model.qk_nope_head_dim=2",
       "model.qk_rope_head_dim=2", "model.v_head_dim=3"]


def test_hand_count_mla():
    # Per layer, H=2 heads, n=2, r=2, v=3, c=4, c_q=3: q_a 4*3 + q_b 3*2*(2+2) = 36; kv_a 4*(4+2) = 24;
    # kv_b 4*2*(2+3) = 40; o 2*3*4 = 24 -> 124 MACs (two layers 248). Scores: QK^T 3*2*4 = 24, PV 3*2*3 = 18 -> 42
    # (two layers 84). The rest as in test_hand_count_tiny_config.
    fwd = forward_flops_per_token(tiny_cfg(*MLA))
    assert fwd.as_dict() == dict(attn_proj=496.0, attn_scores=168.0, router=32.0, shared_experts=0.0, experts=240.0,
                                 dense_ffn=144.0, lm_head=80.0, mtp_proj=0.0, experts_useful=240.0,
                                 shared_experts_useful=0.0)
    no_lora = forward_flops_per_token(tiny_cfg(*MLA, "model.q_lora_rank=null"))
    assert no_lora.attn_proj == 496.0 - 2 * 2 * (36 - 4 * 2 * 4)  # one q_proj 4 x 2*(2+2) = 32 MACs instead
    # params: attention 124 + latent norms (4 + 3) = 131 per layer instead of GQA's 52
    p = param_counts(tiny_cfg(*MLA))
    assert (p.total, p.activated) == (532 + 2 * (131 - 52), 412.0 + 2 * (131 - 52))


def test_hand_count_mtp():
    # model.mtp_num_layers=2 adds per depth, in training: eh_proj 8*4 = 32 MACs, an MoE block (attention 48 + scores
    # 24 + router 16 + 2 experts of 60) = 208 MACs, and an LM head 40 MACs; so 2 * 280 = 560 more MACs per token.
    cfg = tiny_cfg("model.mtp_num_layers=2")
    fwd = forward_flops_per_token(cfg)
    assert fwd.as_dict() == dict(attn_proj=2 * 4 * 48.0, attn_scores=2 * 4 * 24.0, router=2 * 3 * 16.0,
                                 shared_experts=0.0, experts=2 * 3 * 2 * 60.0, dense_ffn=144.0, lm_head=2 * 3 * 40.0,
                                 mtp_proj=2 * 2 * 32.0, experts_useful=2 * 3 * 2 * 60.0,
                                 shared_experts_useful=0.0)
    assert fwd.executed == 784.0 + 2 * 560
    assert forward_flops_per_token(cfg, k_per_layer=[2, 1, 3]).experts == 2 * 6 * 60.0  # MTP blocks last
    # evaluation runs the main model only
    assert forward_flops_per_token(cfg, training=False).executed == 784.0
    # params: per module enorm/hnorm/norm 12 + eh_proj 32 + block (attn 48 + q/k norms 4 + 2 norms 8 + router 16
    # + 4 experts * 60) = 360; activated in training swaps 4 experts for 2: 240
    p = param_counts(cfg)
    assert (p.total, p.activated) == (532 + 2 * 360, 412.0 + 2 * 240)
    assert param_counts(cfg, training=False).activated == 412.0
    with pytest.raises(ValueError, match="plus mtp_num_layers=2 in training"):
        forward_flops_per_token(cfg, k_per_layer=[2])


def test_mone_executed_vs_useful():
    # keep_ratio 0.4 of F=5 keeps 2 neurons: useful expert MACs = gate 4*5 + up/down 2*4*2 = 36 (dense: 60).
    cfg = tiny_cfg("moe.mone.enabled=true", "moe.mone.keep_ratio=0.4")
    fwd = forward_flops_per_token(cfg)
    assert fwd.experts == 240.0 and fwd.experts_useful == 2 * 2 * 36
    assert fwd.executed == 784.0 and fwd.useful == 784.0 - 240.0 + 144.0
    assert training_flops(cfg).train_per_token_useful == 3 * fwd.useful
    assert param_counts(cfg).activated == 412.0 - 120 + 72
    # 0.5 * 5 = 2.5 rounds half up to 3 kept neurons (as the model does): 4*5 + 2*4*3 = 44 MACs per expert
    assert forward_flops_per_token(tiny_cfg("moe.mone.enabled=true")).experts_useful == 2 * 2 * 44


def test_mone_shared_expert_useful():
    # A shared expert of width 5 (60 MACs on the one MoE layer) with MoNE's keep 0.4: 36 useful MACs, as a routed one.
    base = ("moe.shared_expert_ffn_hidden_size=5", "moe.mone.enabled=true", "moe.mone.keep_ratio=0.4")
    plain = forward_flops_per_token(tiny_cfg(*base))
    assert plain.shared_experts == plain.shared_experts_useful == 2 * 60.0
    fwd = forward_flops_per_token(tiny_cfg(*base, "moe.mone.shared_experts=true"))
    assert (fwd.shared_experts, fwd.shared_experts_useful) == (2 * 60.0, 2 * 36.0)
    assert fwd.executed == plain.executed and fwd.useful == plain.useful - 2 * (60 - 36)
    with_shared = param_counts(tiny_cfg(*base, "moe.mone.shared_experts=true"))
    assert (with_shared.total, with_shared.activated) == (param_counts(tiny_cfg(*base)).total,
                                                          param_counts(tiny_cfg(*base)).activated - (60 - 36))


def test_shared_expert_hand_count():
    # shared expert of F_s=7 in the one MoE layer: 3*4*7 = 84 MACs per token, the gate 4*1 = 4 more; always active
    fwd = forward_flops_per_token(tiny_cfg("moe.shared_expert_ffn_hidden_size=7"))
    assert fwd.shared_experts == 2 * 84 and fwd.executed == fwd.useful == 784.0 + 2 * 84
    gated = tiny_cfg("moe.shared_expert_ffn_hidden_size=7", "moe.shared_expert_gate=true")
    assert forward_flops_per_token(gated).shared_experts == 2 * (84 + 4)
    assert training_flops(gated).train_per_token == 2352.0 + 3 * 2 * 88
    p = param_counts(gated)
    assert (p.total, p.activated) == (532 + 88, 412.0 + 88)


MM = ["moe.matryoshka.enabled=true", "moe.matryoshka.k_min=1", "moe.matryoshka.k_max=4"]


def test_matryoshka_k_choices():
    uni = tiny_cfg(*MM, "moe.matryoshka.distribution=uniform")
    assert expected_k(uni.moe) == 2.5
    # capacity-aware with tau=1: P(k) proportional to k, so E[k] = (1+4+9+16)/(1+2+3+4) = 3
    cap = tiny_cfg(*MM)  # the default draw: capacity-aware, tau 1
    assert expected_k(cap.moe) == pytest.approx(3.0)
    assert forward_flops_per_token(uni).experts == 2 * 2.5 * 60
    assert forward_flops_per_token(uni, k_per_layer=[3]).experts == 2 * 3 * 60
    # evaluation uses the model's eval k (eval_k; unset: k_max with Matryoshka, top_k without), not the mean
    assert forward_flops_per_token(uni, training=False).experts == 2 * 4 * 60
    assert forward_flops_per_token(tiny_cfg(), training=False).experts == 2 * 2 * 60
    assert forward_flops_per_token(tiny_cfg(*MM, "moe.matryoshka.eval_k=[1]"), training=False).experts == 2 * 60


def test_attention_scores_scale_with_sequence():
    cfg = tiny_cfg()
    short, long = forward_flops_per_token(cfg), forward_flops_per_token(cfg, seq_length=30)
    assert long.attn_scores == 10 * short.attn_scores
    assert long.executed - long.attn_scores == short.executed - short.attn_scores


def test_bad_k_per_layer_is_named():
    with pytest.raises(ValueError, match="k_per_layer has 2 values but the model has 1 MoE layers"):
        forward_flops_per_token(tiny_cfg(), k_per_layer=[2, 2])
    with pytest.raises(ValueError, match="outside"):
        forward_flops_per_token(tiny_cfg(), k_per_layer=[5])


def test_executed_k_from_layer_stats():
    def layer(tokens_per_expert: list[float], k: int, dropped_slots: float) -> LayerStepStats:
        return LayerStepStats(tokens_per_expert_E=torch.tensor(tokens_per_expert, dtype=torch.float64), k=k,
                              dropped_slots=dropped_slots, aux_loss=0.0, z_loss=0.0, mone_kept_fraction=None)

    stats = {3: layer([10, 6, 4, 0], k=2, dropped_slots=5), 1: layer([3, 3, 3, 3], k=3, dropped_slots=0)}
    # sorted by layer: layer 1 keeps all 12 slots (k=3); layer 3 drops 5 of 20 slots: 2 * 15/20 = 1.5
    assert executed_k_per_layer(stats) == [3.0, 1.5]


# ---------------------------------------------------------------- DeepSpeed FlopsProfiler cross-check

_PROFILE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch
    from deepspeed.profiling.flops_profiler import FlopsProfiler
    import kernels.grouped_gemm
    from launcher.config import load_config
    from launcher.train.flops import executed_k_per_layer
    from moe_core.transformer import MoETransformer

    # DeepSpeed does not patch torch._grouped_mm: run the experts through their per-expert F.linear loop (the
    # same math, the reference of grouped_linear) so every expert GEMM goes through a function it counts.
    kernels.grouped_gemm.grouped_mm_usable = lambda x_NI, w_EOI: False
    overrides, training = json.loads(sys.argv[1]), sys.argv[2] == "train"
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = MoETransformer(cfg.model, cfg.moe, cfg.train.seed).train(training)
    model.set_step(7)
    tokens_BS = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length))
    prof = FlopsProfiler(model)
    prof.start_profile()
    model(tokens_BS, tokens_BS if training and cfg.model.mtp_num_layers else None)
    out = dict(flops=prof.get_total_flops(), macs=prof.get_total_macs(), params=prof.get_total_params(),
               tokens=tokens_BS.numel())
    prof.end_profile()
    stats = {i: layer.last_stats for i, layer in model.moe_layers().items() if layer.last_stats is not None}
    out.update(k=[stats[i].k for i in sorted(stats)], executed_k=executed_k_per_layer(stats))
    print(json.dumps(out))
""")


def _deepspeed_profile(overrides: list[str], mode: str) -> dict:
    """Profile one forward (``mode`` train or eval) in a fresh interpreter: DeepSpeed monkey-patches torch
    functionals and its import sets up an accelerator, neither of which should leak into the test process."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _PROFILE_SCRIPT, json.dumps(overrides), mode], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


SMOKE = ["model.vocab_size=256", "model.hidden_size=64", "model.num_layers=3", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.seq_length=32", "model.dense_layers=[0]", "model.dense_ffn_hidden_size=96",
         "moe.num_experts=8", "moe.top_k=2", "moe.expert_ffn_hidden_size=48"]
VARIANTS = {
    "moe-eval": ([], "eval"),
    "mone-train": (["moe.mone.enabled=true", "moe.mone.keep_ratio=0.5"], "train"),
    # M-MoE draws k per layer; the capacity factor drops slots, so executed k is fractional
    "mmoe-capacity-train": (["moe.matryoshka.enabled=true", "moe.matryoshka.k_min=1", "moe.matryoshka.k_max=4",
                             "moe.capacity_factor=0.5"], "train"),
    # MLA with and without query compression (v_head_dim differs from the q/k width: SDPA's P V is counted apart)
    "mla-train": (["model.attention=mla", "model.q_lora_rank=24", "model.kv_lora_rank=32",
                   "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=12"], "train"),
    "mla-no-q-lora-eval": (["model.attention=mla", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16",
                            "model.qk_rope_head_dim=8", "model.v_head_dim=24"], "eval"),
    # Qwen2-MoE-style gated shared expert next to MoNE routed experts
    "shared-expert-gate-mone-train": (["moe.shared_expert_ffn_hidden_size=80", "moe.shared_expert_gate=true",
                                       "moe.mone.enabled=true"], "train"),
    # multi-token prediction: two MTP modules (eh_proj, an M-MoE block each, the shared LM head) run in training
    "mtp-mmoe-train": (["model.mtp_num_layers=2", "moe.matryoshka.enabled=true", "moe.matryoshka.k_min=1",
                        "moe.matryoshka.k_max=4"], "train"),
    "mtp-eval": (["model.mtp_num_layers=1"], "eval"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_deepspeed_flops_profiler(name):
    """DeepSpeed counts MACs of every F.linear / matmul / bmm / scaled_dot_product_attention call the model makes
    (the SDPA counter uses the full S x S square, like us). With the k each layer really used (from its
    ``last_stats``: drawn k minus capacity-dropped slots) the matmul MACs must agree exactly with the analytic
    executed forward count; MoNE's torch path must cost exactly a dense expert.
    DeepSpeed's FLOPs additionally count one FLOP per element for the few elementwise functions it patches
    (F.silu, F.softmax, torch.mul/add): O(F + E) per token against O(D * F) for the matmuls, about 0.1% of the
    total on this model, so they are below 1% and the analytic count leaves them out."""
    variant, mode = VARIANTS[name]
    overrides = SMOKE + variant
    cfg = load_config(None, overrides)
    ds = _deepspeed_profile(overrides, mode)
    if mode == "eval":
        assert ds["executed_k"] == default_k_per_layer(cfg, training=False)
    fwd = forward_flops_per_token(cfg, k_per_layer=ds["executed_k"], training=mode == "train")
    assert ds["params"] == param_counts(cfg).total
    assert ds["macs"] == pytest.approx(fwd.executed / 2 * ds["tokens"], rel=1e-9)
    elementwise = ds["flops"] - 2 * ds["macs"]
    assert 0 <= elementwise <= 0.01 * ds["flops"]
    if "capacity" in name:  # the variant really exercises fractional k (drops happened, k was drawn per layer)
        assert any(ek < k for ek, k in zip(ds["executed_k"], ds["k"]))
