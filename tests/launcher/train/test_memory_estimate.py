"""`moetron pretrain --dry-run`: the per-rank memory estimate (launcher/train/memory.py, launcher/train/activations.py)
against a measured CPU step, for every model shape and every applicable recompute option: the bytes the trainer's
parameters, gradients and optimizer really hold after a step within 10%, and the activations within 10% of the
measured activation peak of a micro-batch's forward and backward: the largest sum, after any op, of the bytes of the
tensors created since the forward began that are still alive (parameters, buffers and the gradients accumulated
into excluded), which is where a recomputing model peaks (its backward holds the recomputed region too)."""
import pytest

from launcher.bench.recompute import LivePeak
from tests.helpers.dist import run_distributed
from tests.helpers.recompute import OPTIONS

SHAPES = {
    "default": [],
    "wide": ["model.hidden_size=128", "moe.expert_ffn_hidden_size=256", "moe.top_k=4", "moe.num_experts=16"],
    "bf16": ["train.precision=bf16"],  # bf16 parameters, distributed optimizer with fp32 main weights
    "mla": ["model.attention=mla", "model.q_lora_rank=48", "model.kv_lora_rank=64", "model.qk_nope_head_dim=32",
            "model.qk_rope_head_dim=16", "model.v_head_dim=48"],  # v = n + r: the fused SDPA path, as on GPUs
    "shared": ["moe.shared_expert_ffn_hidden_size=512", "moe.shared_expert_gate=true", "model.dense_layers=[0]",
               "moe.mone.enabled=true"],  # Qwen2-MoE-style gated shared expert, a dense layer, MoNE
    "mtp": ["model.mtp_num_layers=2"],  # two MTP modules: an MoE block and the logits per depth
}
APPLICABLE = {"default": ("none", "full", "core_attn", "norm", "moe_act", "moe"),
              "wide": ("none", "full", "moe_act", "moe"),
              "bf16": ("none", "full", "core_attn", "norm", "moe_act", "moe"),
              "mla": ("none", "full", "core_attn", "mla_up_proj", "mla_up_proj+core_attn", "moe"),
              "shared": ("none", "full", "mlp", "shared_experts", "moe_act", "moe", "selective"),
              "mtp": ("none", "full", "moe_act")}


def _measured(rank, world, shape):
    from launcher.config import load_config
    from launcher.train.memory import estimate
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize

    out = {}
    for option in APPLICABLE[shape]:
        cfg = load_config(None, ["data.source=synthetic", "logging.tensorboard=false", "train.global_batch_size=4",
                                 "train.micro_batch_size=4", *SHAPES[shape], *OPTIONS.get(option, [])])
        trainer = Trainer(cfg, initialize(1, 1, 1))
        trainer.train_step()  # gradients and optimizer state exist from here on (backward adds into them)
        held = trainer.optimizer.memory_bytes()
        weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
        peak = LivePeak.excluding(trainer.model)
        trainer.model.set_step(trainer.step)
        with peak:
            loss = trainer._forward(trainer.model.chunks[0], next(trainer.loader), None)
            (sum(loss) if isinstance(loss, tuple) else loss).backward()  # with MTP: (loss sum, MTP objective)
        est = estimate(cfg, world)
        out[option] = (weights + held["grads"] + held["optimizer_state"] + held["main_params"], peak.peak,
                       est.weights + est.gradients + est.optimizer, est.activations)
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_estimate_is_within_10_percent_of_a_measured_step_for_every_recompute_option(shape):
    results = run_distributed(_measured, 1, shape, timeout=600)[0]
    for option, (state, activations, state_est, activations_est) in results.items():
        assert abs(state_est - state) <= 0.1 * state, (option, state_est, state)
        assert abs(activations_est - activations) <= 0.1 * activations, (option, activations_est, activations)
    activations = {option: r[1] for option, r in results.items()}
    assert all(activations[o] < activations["none"] for o in activations if o != "none"), activations


def test_dry_run_prints_the_estimate_and_builds_nothing(capsys, tmp_path):
    from launcher import pretrain

    assert pretrain.main(["--recipe", "recipes/smoke_cpu.yaml", "data.source=synthetic",
                          f"logging.run_dir={tmp_path / 'run'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "per-rank parameters" in out and "activations" in out and "total" in out
    assert " MiB" in out and " GiB" not in out  # the smoke model is far below 1 GiB
    assert not (tmp_path / "run").exists()


def test_memory_table_switches_to_gib_at_one_gib():
    from launcher.train.memory import MemoryEstimate, format_bytes

    assert format_bytes((1 << 30) - (1 << 20)) == "  1023.0 MiB"
    assert format_bytes(1 << 30) == "    1.00 GiB"
    assert format_bytes(int(2.346 * (1 << 30))) == "    2.35 GiB"
    lines = MemoryEstimate(params=10, weights=3 << 20, gradients=5 << 30, optimizer=0, activations=1 << 29).lines()
    assert lines[1:] == ["  weights          3.0 MiB", "  gradients       5.00 GiB", "  optimizer        0.0 MiB",
                         "  activations    512.0 MiB",
                         "  total           5.50 GiB (no allocator slack or temporaries)",
                         "  pipeline bubble 0.0% of a step"]


def _tp2_activations(rank, world):
    """Activation peak of one micro-batch's forward and backward on this TP=2 rank (as ``_measured``), without and
    with sequence parallelism, and the estimate's activation term for each."""
    from launcher.config import load_config
    from launcher.train.memory import estimate
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize

    groups, out = initialize(2, 1, 1), {}
    for sp in (False, True):
        cfg = load_config(None, ["data.source=synthetic", "logging.tensorboard=false", "train.global_batch_size=4",
                                 "train.micro_batch_size=4", "parallel.tp=2", "moe.shared_expert_ffn_hidden_size=512",
                                 "moe.shared_expert_gate=true", f"parallel.sequence_parallel={str(sp).lower()}"])
        trainer = Trainer(cfg, groups)
        trainer.train_step()
        peak = LivePeak.excluding(trainer.model)
        trainer.model.set_step(trainer.step)
        with peak:
            trainer._forward(trainer.model.chunks[0], next(trainer.loader), None).backward()
        out[sp] = (peak.peak, estimate(cfg, world).activations)
    return out


def test_sequence_parallel_activations_estimate_follows_the_measured_saving():
    """TP=2 with a gated shared expert, one micro-batch: SP keeps less of the activation peak than TP alone, the
    estimate's ratio follows the measured one within 0.05, and each estimate is within 10% of its measurement."""
    result = run_distributed(_tp2_activations, 2)[0]
    for measured, estimated in result.values():
        assert abs(estimated - measured) <= 0.1 * measured, (estimated, measured)
    (plain, plain_est), (sp, sp_est) = result[False], result[True]
    assert sp < 0.95 * plain and sp_est < 0.95 * plain_est
    assert abs(sp_est / plain_est - sp / plain) < 0.05, (sp / plain, sp_est / plain_est)



def test_in_flight_micro_batches_follow_megatron_core_warmup():
    """1F1B: pp - rank; interleaved: (pp - rank - 1) * 2 + (vpp - 1) * pp + 1 virtual micro-batches, by chunk in
    groups of pp, never more than there are."""
    from launcher.train.memory import in_flight

    assert [in_flight(4, 1, r, 8) for r in range(4)] == [[4], [3], [2], [1]]
    assert in_flight(4, 1, 0, 2) == [2]
    assert in_flight(2, 2, 0, 4) == [3, 2] and in_flight(2, 2, 1, 4) == [2, 1]
    assert in_flight(2, 2, 0, 2) == [2, 2]  # every micro-batch of both chunks


def test_interleaving_shrinks_the_bubble_and_the_estimate_counts_its_chunks():
    from launcher.config import load_config
    from launcher.train.memory import estimate

    base = ["data.source=synthetic", "model.num_layers=4", "parallel.pp=2", "train.global_batch_size=32",
            "train.micro_batch_size=4"]  # 8 micro-batches per step at DP = 1
    plain, interleaved = (estimate(load_config(None, [*base, f"parallel.virtual_pp={v}"]), 2) for v in (1, 2))
    assert plain.bubble == pytest.approx(1 / 8) and interleaved.bubble == pytest.approx(1 / 16)
    assert plain.weights == interleaved.weights
    # rank 0 holds 2 micro-batches of 2 layers (1F1B) or 3 + 2 of 1 layer each (interleaved), plus the embedding
    assert interleaved.activations > plain.activations
    uneven = estimate(load_config(None, [*base, "parallel.pp_layout=Ettt|tL"]), 2)
    assert uneven.weights > plain.weights  # the busiest rank holds three layers
