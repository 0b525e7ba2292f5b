"""The whole model under TP / EP / PP (gloo, 4 ranks) equals the single-process model: losses AND every gradient.

Each rank also builds the single-device reference (same seed: init is layout-independent) and runs it on the
same data: every DP rank's micro-batches, each (mean) loss scaled by 1/(micro-batches * dp) and the MoE aux-loss
scale set to the same factor, which is what the pipeline schedule (loss_scale = 1/micro-batches) + DP gradient
averaging compute. Every local
gradient shard is compared with the matching slice of the reference gradient.
"""
import pytest
import torch

from tests.helpers.dist import run_distributed

S, MB, MICRO = 16, 2, 2
SHARED = ("moe.shared_expert_ffn_hidden_size=40",)
"""A shared expert (TP-parallel like the dense FFN); with GATED also its replicated sigmoid gate (Qwen2-MoE)."""
GATED = (*SHARED, "moe.shared_expert_gate=true")
DEEPSEEK = ("moe.num_experts=8", "moe.top_k=3", "moe.score_function=sigmoid", "moe.num_groups=4", "moe.group_topk=2",
            "moe.expert_bias=true", "moe.routed_scaling_factor=2.5", "moe.aux_loss_scope=sequence", *SHARED)
"""DeepSeek-V3's MoE block: sigmoid router, group-limited routing, selection bias, scaled gates, sequence-wise
balance loss, shared expert."""
MLA = ("model.attention=mla", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4",
       "model.v_head_dim=6")


def tiny_cfg(*overrides):
    from launcher.config import load_config

    base = ["model.vocab_size=64", "model.hidden_size=32", "model.num_layers=4", "model.num_attention_heads=4",
            "model.num_query_groups=2", f"model.seq_length={S}", "model.dense_layers=[0]",
            "model.dense_ffn_hidden_size=48", "moe.num_experts=4", "moe.top_k=2", "moe.expert_ffn_hidden_size=24",
            "moe.aux_loss_coeff=0.01", "moe.z_loss_coeff=0.001", f"train.micro_batch_size={MB}",
            "data.source=synthetic"]
    return load_config(None, base + list(overrides))


def _micro_batches(cfg, dp_size):
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, cfg.model.vocab_size, (dp_size, MICRO, MB, S + 1), generator=gen)
    return [[{"tokens": t[:, :-1], "labels": t[:, 1:]} for t in tokens[d]] for d in range(dp_size)]


def _reference_grads(cfg, micro_by_dp):
    from moe_core.aux_loss import AuxLossAutoScaler
    from parallel.groups import ParallelGroups
    from parallel.model import build_model, token_losses

    single = ParallelGroups.single()
    ref = build_model(cfg, single)
    ref.set_step(0)  # one training step: every micro-batch routes with the step's Matryoshka k draw
    n = len(micro_by_dp) * len(micro_by_dp[0])
    AuxLossAutoScaler.set_loss_scale(1.0 / n)
    losses = []
    for dp_batches in micro_by_dp:
        per_dp = []
        for mb in dp_batches:
            loss = token_losses(ref(mb["tokens"]), mb["labels"], single).mean()
            (loss / n).backward()
            per_dp.append(loss.detach())
        losses.append(torch.stack(per_dp))
    return {name: p.grad for name, p in ref.named_parameters()}, losses


def _compare(rank, world_size, overrides):
    from parallel.optim.grads import sync_grads
    from parallel.groups import initialize
    from parallel.model import build_model, token_losses
    from parallel.schedule import PipelineSchedule
    from parallel.sharding import get_spec, local_slices

    cfg = tiny_cfg(*overrides)
    g = initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    micro_by_dp = _micro_batches(cfg, g.dp_size)
    ref_grads, ref_losses = _reference_grads(cfg, micro_by_dp)

    model = build_model(cfg, g)
    model.set_step(0)

    def forward(chunk, mb, x):
        out = chunk(mb["tokens"] if chunk.pre_process else x)
        return token_losses(out, mb["labels"], g).mean() if chunk.post_process else out

    schedule = PipelineSchedule(g, cfg.parallel.virtual_pp, (MB, S, cfg.model.hidden_size), torch.float32)
    losses = schedule(model.chunks, micro_by_dp[g.dp_rank], forward, loss_scale=1.0 / MICRO)
    sync_grads(model, g)
    worst = {}
    for name, p in model.named_parameters():
        if ".shared_expert." in name and g.tp_size > 1:  # TP-parallel like the dense FFN, not replicated
            assert get_spec(p).tp_axis is not None and p.numel() * g.tp_size == ref_grads[name].numel(), name
        expected = ref_grads[name][local_slices(get_spec(p), g)]
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=2e-6, msg=lambda m: f"{name}: {m}")
        worst[name] = (p.grad - expected).abs().max().item()
    if g.is_last_stage:
        torch.testing.assert_close(torch.stack(losses), ref_losses[g.dp_rank], rtol=1e-5, atol=1e-6)
    return {"checked": sorted(worst), "reference": sorted(ref_grads), "max_diff": max(worst.values()),
            "last": g.is_last_stage}


@pytest.mark.parametrize("overrides", [
    ("parallel.tp=2", "parallel.ep=2"),
    ("parallel.pp=2", "parallel.ep=2", "train.global_batch_size=8"),
    ("parallel.tp=2", "parallel.pp=2"),
    ("parallel.tp=2", "parallel.ep=2", "moe.mone.enabled=true", "moe.matryoshka.enabled=true",
     "moe.matryoshka.k_min=1", "moe.matryoshka.k_max=3"),
    # MLA: heads split over TP (q_b_proj / q_proj, kv_b_proj column, o_proj row), down-projections and latent
    # norms replicated; the shared RoPE key's gradient is summed over TP (factory.tp_copy)
    ("parallel.tp=2", "parallel.ep=2", *MLA, "model.q_lora_rank=12", "model.rope_scaling.type=yarn",
     "model.rope_scaling.factor=4", "model.rope_scaling.original_max_position_embeddings=8",
     "model.rope_scaling.mscale_all_dim=1.0"),
    ("parallel.tp=2", "parallel.pp=2", *MLA),
    # MoNE in the shared expert too: its 20 of 40 kept neurons per token chosen over both TP ranks' halves
    ("parallel.tp=2", "parallel.ep=2", *GATED, "moe.mone.enabled=true", "moe.mone.shared_experts=true",
     "moe.matryoshka.enabled=true", "moe.matryoshka.k_min=1", "moe.matryoshka.k_max=3", "moe.capacity_factor=1.0"),
    # LLEP forced onto its rebalancing path (every imbalance >= 1.0 triggers it)
    ("parallel.tp=2", "parallel.ep=2", *SHARED, "moe.dispatcher=llep", "moe.llep.imbalance_threshold=1.0",
     "moe.llep.min_tokens_per_gemm=1"),
    ("parallel.pp=2", "parallel.ep=2", "train.global_batch_size=8", *GATED),
    # DeepSeek-V3 routing at EP=4: 8 experts in 4 groups (one per EP rank), top-3 in the best 2 groups, so most
    # tokens send one row for two experts (deduplicated dispatch); plain EP and LLEP forced to rebalance
    ("parallel.ep=4", "train.global_batch_size=16", *DEEPSEEK),
    ("parallel.ep=4", "train.global_batch_size=16", *DEEPSEEK, "moe.dispatcher=llep",
     "moe.llep.imbalance_threshold=1.0", "moe.llep.min_tokens_per_gemm=1"),
    # GLM-4.5 / OLMoE attention options: q/k norm over the whole TP-split projection, split q/k/v biases, half RoPE
    ("parallel.tp=2", "parallel.ep=2", "model.qk_norm=projection", "model.qkv_bias=true", "model.head_dim=16",
     "model.partial_rotary_factor=0.5"),
    # activation recompute (tests/parallel/test_recompute_parallel.py: bit-identical to the run without it)
    ("parallel.pp=2", "parallel.ep=2", "train.global_batch_size=8", "moe.mone.enabled=true",
     "moe.matryoshka.enabled=true", "moe.matryoshka.k_min=1", "moe.matryoshka.k_max=3", "moe.dispatcher=llep",
     "moe.llep.imbalance_threshold=1.0", "moe.llep.min_tokens_per_gemm=1", "train.recompute=full"),
    ("parallel.tp=2", "parallel.ep=2", *MLA, *SHARED, "train.recompute=selective",
     "train.recompute_modules=[core_attn,mla_up_proj,moe_act,shared_experts,norm,mlp]"),
    # interleaved 1F1B (one layer per model chunk) and uneven layouts (megatron-core's layout vocabulary)
    ("parallel.pp=2", "parallel.virtual_pp=2", "parallel.ep=2", "train.global_batch_size=8"),
    ("parallel.tp=2", "parallel.pp=2", "parallel.pp_layout=Ettt|tL"),
    ("parallel.pp=2", "parallel.virtual_pp=2", "parallel.ep=2", "train.global_batch_size=8",
     "parallel.pp_layout=[Et, '', ttt, L]"),
], ids=["tp2-ep2", "pp2-ep2", "tp2-pp2", "tp2-ep2-mone-mmoe", "tp2-ep2-mla-q-lora-yarn", "tp2-pp2-mla",
        "tp2-ep2-shared-gate-mone-shared-mmoe-capacity", "tp2-ep2-llep-shared", "pp2-ep2-dp2-shared-gate", "ep4-deepseek",
        "ep4-deepseek-llep", "tp2-ep2-projection-norm-bias-partial-rope",
        "pp2-ep2-llep-mone-mmoe-recompute-full", "tp2-ep2-mla-shared-recompute-selective", "pp2-vpp2-ep2-dp2",
        "tp2-pp2-uneven-layout", "pp2-vpp2-uneven-layout-empty-stage"])
def test_model_parallel_matches_single_process(overrides):
    results = run_distributed(_compare, 4, overrides)
    assert any(r["last"] for r in results)
    # every parameter of the reference model was compared on some rank (pipeline stages split them)
    checked = set().union(*(r["checked"] for r in results))
    assert checked == set(results[0]["reference"])
