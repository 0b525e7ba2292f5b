"""parallel.sequence_parallel: TP=2 with sequence parallelism equals TP=2 without it and the single-process model
(gloo, 4 ranks): every loss, every gradient shard (1e-5, fp32) and the MoE statistics (the TP ranks' token
counts and aux/z losses add up to the replicated ones without SP).

Micro-batches of 3 sequences of 16 tokens: each TP rank's shard (24 tokens) holds one whole sequence and half
of another, so the sequence-wise aux loss needs counts from both ranks.
"""
import pytest
import torch

from tests.helpers.dist import run_distributed
from tests.parallel.test_model_parallel import GATED, MLA, S, _reference_grads, tiny_cfg

MB, MICRO = 3, 2


def _micro_batches(cfg, dp_size):
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, cfg.model.vocab_size, (dp_size, MICRO, MB, S + 1), generator=gen)
    return [[{"tokens": t[:, :-1], "labels": t[:, 1:]} for t in tokens[d]] for d in range(dp_size)]


def _train_micro_batches(cfg, g, micro):
    """Forward/backward of this rank's micro-batches and the DP/TP gradient reduction; returns the model, its
    losses (last stage) and per MoE layer the last micro-batch's token counts and aux + z loss summed over the
    TP ranks' shares (SP) or as every TP rank has them (no SP)."""
    import torch.distributed as dist

    from parallel.model import activation_shape, build_model, token_losses
    from parallel.optim.grads import sync_grads
    from parallel.schedule import PipelineSchedule

    model = build_model(cfg, g)
    model.set_step(0)

    def forward(chunk, mb, x):
        out = chunk(mb["tokens"] if chunk.pre_process else x)
        return token_losses(out, mb["labels"], g).mean() if chunk.post_process else out

    schedule = PipelineSchedule(g, cfg.parallel.virtual_pp, activation_shape(cfg, MB), torch.float32)
    losses = schedule(model.chunks, micro, forward, loss_scale=1.0 / MICRO)
    sync_grads(model, g)
    stats = {}
    for idx, layer in model.moe_layers().items():
        st = layer.last_stats
        row = torch.cat([st.tokens_per_expert_E.double(), (st.aux_loss + st.z_loss).double().reshape(1)])
        if cfg.parallel.sequence_parallel:
            dist.all_reduce(row, group=g.tp_group)
        stats[idx] = row
    return model, losses, stats


def _compare(rank, world_size, overrides):
    from parallel.groups import initialize
    from parallel.sharding import get_spec, local_slices

    plain = tiny_cfg(f"train.micro_batch_size={MB}", *overrides)
    sp = tiny_cfg(f"train.micro_batch_size={MB}", "parallel.sequence_parallel=true", *overrides)
    g = initialize(sp.parallel.tp, sp.parallel.pp, sp.parallel.ep)
    micro_by_dp = _micro_batches(sp, g.dp_size)
    ref_grads, ref_losses = _reference_grads(plain, micro_by_dp)
    plain_model, plain_losses, plain_stats = _train_micro_batches(plain, g, micro_by_dp[g.dp_rank])
    sp_model, sp_losses, sp_stats = _train_micro_batches(sp, g, micro_by_dp[g.dp_rank])
    plain_grads = dict(plain_model.named_parameters())
    # global_batch at DP > 1: the single process runs the DP ranks' micro-batches one after another, so its
    # step-cumulative counts differ from the DP ranks' (test_model_parallel has no such case); SP vs TP still holds
    with_reference = sp.moe.aux_loss_scope != "global_batch" or g.dp_size == 1
    checked = []
    for name, p in sp_model.named_parameters():
        torch.testing.assert_close(p.grad, plain_grads[name].grad, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name} (SP vs TP): {m}")
        if with_reference:
            torch.testing.assert_close(p.grad, ref_grads[name][local_slices(get_spec(p), g)], rtol=1e-4,
                                       atol=2e-6, msg=lambda m: f"{name} (SP vs single process): {m}")
        checked.append(name)
    for idx, row in plain_stats.items():
        torch.testing.assert_close(sp_stats[idx], row, rtol=1e-5, atol=1e-7, msg=lambda m: f"layer {idx}: {m}")
    if g.is_last_stage:
        torch.testing.assert_close(torch.stack(sp_losses), torch.stack(plain_losses), rtol=1e-5, atol=1e-6)
        if with_reference:
            torch.testing.assert_close(torch.stack(sp_losses), ref_losses[g.dp_rank], rtol=1e-5, atol=1e-6)
    return {"checked": sorted(checked), "reference": sorted(ref_grads), "last": g.is_last_stage,
            "moe_layers": sorted(sp_stats)}


@pytest.mark.parametrize("overrides", [
    ("parallel.tp=2", *GATED),
    ("parallel.tp=2", "parallel.ep=2", *GATED, "moe.aux_loss_scope=global_batch"),
    ("parallel.tp=2", "parallel.ep=2", "moe.aux_loss_scope=sequence", "moe.mone.enabled=true",
     "moe.matryoshka.enabled=true", "moe.matryoshka.k_min=1", "moe.matryoshka.k_max=3", *GATED,
     "moe.mone.shared_experts=true"),
    ("parallel.tp=2", "parallel.ep=2", *MLA, "model.q_lora_rank=12", "moe.shared_expert_ffn_hidden_size=40",
     "moe.aux_loss_scope=sequence"),
    ("parallel.tp=2", "parallel.pp=2", *MLA, *GATED),
    ("parallel.tp=2", "parallel.ep=2", *GATED, "moe.dispatcher=llep", "moe.llep.imbalance_threshold=1.0",
     "moe.llep.min_tokens_per_gemm=1"),
    # the drop choice is made over the whole micro-batch's scores (each rank's shard holds 1.5 sequences)
    ("parallel.tp=2", "parallel.ep=2", *GATED, "moe.capacity_factor=0.75"),
    ("parallel.tp=2", "moe.capacity_factor=1.0", "moe.aux_loss_scope=sequence"),
    # GQA options: the whole-projection q/k norm (TP-split weight, all-reduced statistics), q/k/v biases, partial RoPE
    ("parallel.tp=2", "parallel.ep=2", "model.qk_norm=projection", "model.qkv_bias=true",
     "model.partial_rotary_factor=0.5"),
], ids=["tp2-shared-gate", "tp2-ep2-global-batch", "tp2-ep2-sequence-mone-mmoe-shared", "tp2-ep2-mla-q-lora-sequence",
        "tp2-pp2-mla-shared-gate", "tp2-ep2-llep", "tp2-ep2-capacity", "tp2-capacity-sequence",
        "tp2-ep2-gqa-options"])
def test_sequence_parallel_matches_tensor_parallel_and_single_process(overrides):
    results = run_distributed(_compare, 4, overrides)
    assert any(r["last"] for r in results)
    assert set().union(*(r["checked"] for r in results)) == set(results[0]["reference"])
    assert any(r["moe_layers"] for r in results)


def _shards(rank, world_size):
    """What travels and what is TP-summed under SP: the stage output is the token shard, every TP-replicated
    dense parameter (norms, router, the shared-expert gate, MLA's down-projections and latent norms) is marked
    for the TP sum, TP-split ones are not."""
    from parallel.groups import initialize
    from parallel.model import activation_shape, build_model
    from parallel.sharding import get_spec

    cfg = tiny_cfg(f"train.micro_batch_size={MB}", "parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true",
                   *MLA, "model.q_lora_rank=12", *GATED)
    g = initialize(2, 2, 1)
    model = build_model(cfg, g)
    marked = {n for n, p in model.named_parameters() if get_spec(p).tp_partial_grad}
    replicated = {n for n, p in model.named_parameters() if get_spec(p).tp_axis is None and not get_spec(p).is_expert}
    out_shape = None
    if g.is_first_stage:
        out_shape = tuple(model(torch.zeros(MB, S, dtype=torch.long)).shape)
    return {"marked": marked, "replicated": replicated, "shape": out_shape, "expected": activation_shape(cfg, MB)}


def test_sequence_parallel_stage_output_and_tp_summed_parameters():
    results = run_distributed(_shards, 4)
    for r in results:
        assert r["marked"] == r["replicated"] and r["marked"]
        assert r["expected"] == (MB * S // 2, 32)
        assert r["shape"] in (None, r["expected"])
    marked = set().union(*(r["marked"] for r in results))
    for part in ("input_layernorm", "mlp.router.weight", "shared_expert_gate", "q_a_proj", "kv_a_layernorm",
                 "norm.weight"):
        assert any(part in n for n in marked), part


def _compiled_and_eager_losses(rank, world_size, run_dir):
    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize
    from tests.launcher.train.test_train_resume import _overrides

    groups, losses = initialize(2, 1, 1), {}
    for compiled in (False, True):
        cfg = load_config(None, _overrides(f"{run_dir}/{compiled}", 3, "parallel.tp=2", "train.precision=bf16",
                                           "parallel.sequence_parallel=true", f"train.compile={str(compiled).lower()}",
                                           "moe.shared_expert_ffn_hidden_size=16", "logging.tensorboard=false"))
        trainer = Trainer(cfg, groups)
        losses[compiled] = []
        for _ in range(3):
            losses[compiled].append(trainer.train_step()[0])
            trainer.step += 1
    return losses


def test_compiled_blocks_under_sequence_parallelism_match_eager(tmp_path):
    """train.compile (bf16) with the sequence gathers, reduce-scatters and the local dispatcher (EP=1) inside the
    compiled blocks: the losses of eager SP to bf16 precision."""
    losses = run_distributed(_compiled_and_eager_losses, 2, str(tmp_path), timeout=600)[0]
    assert losses[True] == pytest.approx(losses[False], rel=2e-3)
