"""Training end to end on CPU: loss goes down, TensorBoard events and checkpoints are written, and a run
resumed from a checkpoint reproduces the uninterrupted run's losses exactly (single rank, TP=2 x EP=2, the same
with sequence parallelism and multi-token prediction, PP=2 x DP=2 with multi-token prediction, and a dense model at
TP=2); an MTP checkpoint holds one embedding and loads at another layout."""
import math

import pytest

from tests.helpers.dist import run_distributed


def _overrides(run_dir, steps, *extra):
    return ["model.vocab_size=128", "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4",
            "model.num_query_groups=2", "model.seq_length=32", "moe.num_experts=4", "moe.top_k=2",
            "moe.expert_ffn_hidden_size=32", "train.micro_batch_size=2", "train.global_batch_size=8",
            f"train.steps={steps}", "optim.warmup_steps=3", "optim.lr=0.01", "data.source=synthetic",
            f"logging.run_dir={run_dir}", "logging.log_interval=1", "checkpoint.interval=10", *extra]


def _train(rank, world_size, overrides):
    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize

    cfg = load_config(None, overrides)
    g = initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    result = Trainer(cfg, g).fit()
    return {"losses": result.losses, "final_step": result.final_step, "checkpoint": result.checkpoint}


def _run(world, overrides):
    return run_distributed(_train, world, overrides)[0]


@pytest.mark.parametrize("world,extra", [
    (1, ()), (4, ("parallel.tp=2", "parallel.ep=2")),
    (4, ("parallel.tp=2", "parallel.ep=2", "parallel.sequence_parallel=true", "moe.shared_expert_ffn_hidden_size=16",
         "moe.expert_bias=true", "model.mtp_num_layers=1")),
    (4, ("parallel.pp=2", "model.mtp_num_layers=2")),
    # a dense model (no MoE layer) with OLMoE's whole-projection q/k norm and q/k/v biases, both split over TP
    (2, ("parallel.tp=2", "model.dense_layers=[0,1]", "model.qk_norm=projection", "model.qkv_bias=true")),
], ids=["single", "tp2-ep2", "tp2-ep2-sp-mtp", "pp2-dp2-mtp", "tp2-dense-projection-norm-bias"])
def test_resume_reproduces_uninterrupted_losses(tmp_path, world, extra):
    full = _run(world, _overrides(tmp_path / "full", 20, *extra))
    first = _run(world, _overrides(tmp_path / "split", 20, "train.exit_interval=10", *extra))
    assert first["final_step"] == 10 and first["checkpoint"].endswith("step_0000010")
    # same run dir: resume=auto picks up step_0000010 (model, AdamW, LR schedule, RNG, data)
    second = _run(world, _overrides(tmp_path / "split", 20, *extra))
    resumed = {**first["losses"], **second["losses"]}
    assert sorted(second["losses"]) == list(range(10, 20))
    assert resumed == full["losses"]  # bit-identical on CPU
    assert full["losses"][19] < full["losses"][0]


def test_mtp_checkpoint_holds_one_embedding_and_loads_at_another_layout(tmp_path):
    """PP=2 with MTP keeps an embedding copy on the last stage; the checkpoint stores the first stage's only, and
    a PP=1 run resumed from it continues the PP=2 run (same weights, same data: DP=1 both; fp32 sums in another
    order, so not bit for bit). TensorBoard gets ``train/mtp_loss``; validation reports the main loss only."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.distributed.checkpoint import FileSystemReader

    extra = ("model.mtp_num_layers=2", "checkpoint.interval=3", "train.eval_interval=3", "train.eval_batches=2")
    full = _run(2, _overrides(tmp_path / "full", 6, "parallel.pp=2", *extra))
    acc = EventAccumulator(str(tmp_path / "full" / "tb"))
    acc.Reload()
    mtp = [e.value for e in acc.Scalars("train/mtp_loss")]
    assert len(mtp) == 6 and all(0 < v < 0.1 * 2 * full["losses"][0] for v in mtp)  # coeff 0.1 x about the loss
    assert [t for t in acc.Tags()["scalars"] if t.startswith("valid/")] == ["valid/loss"]
    first = _run(2, _overrides(tmp_path / "split", 6, "parallel.pp=2", "train.exit_interval=3", *extra))
    chunks = FileSystemReader(first["checkpoint"]).read_metadata().state_dict_metadata
    assert len(chunks["model.embed_tokens.weight"].chunks) == 1
    assert any(key.startswith("model.mtp.1.block.") for key in chunks)
    assert "optim.exp_avg.mtp.0.eh_proj.weight" in chunks
    second = _run(1, _overrides(tmp_path / "split", 6, *extra))
    assert sorted(second["losses"]) == [3, 4, 5]
    assert [second["losses"][s] for s in (3, 4, 5)] == pytest.approx([full["losses"][s] for s in (3, 4, 5)],
                                                                      rel=1e-5)


def test_compiled_pipeline_resume_reproduces_uninterrupted_losses(tmp_path):
    """train.compile with PP=2, every routing feature and an MTP module (a compiled block on the last stage, which
    also holds the embedding copy): a resumed process (no compile history) gives the
    uninterrupted run's losses bit for bit (it did not while megatron-core's param all-gather hooks broke the
    compiled graphs, from step 7 of 8 on)."""
    extra = ("train.precision=bf16", "train.compile=true", "parallel.pp=2", "moe.capacity_factor=0.5",
             "moe.mone.enabled=true", "moe.mone.balance_loss_coeff=0.01", "moe.matryoshka.enabled=true",
             "moe.matryoshka.k_min=1", "moe.matryoshka.k_max=3", "moe.expert_bias=true", "model.mtp_num_layers=1")
    full = _run(2, _overrides(tmp_path / "full", 8, *extra))
    first = _run(2, _overrides(tmp_path / "split", 8, "train.exit_interval=4", *extra))
    second = _run(2, _overrides(tmp_path / "split", 8, *extra))
    assert first["final_step"] == 4 and sorted(second["losses"]) == list(range(4, 8))
    assert {**first["losses"], **second["losses"]} == full["losses"]


def test_smoke_training_learns_and_writes_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _run(1, _overrides(tmp_path / "run", 30))
    losses = [run["losses"][s] for s in range(30)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/tflops_per_device",
                "train_moe/layer00/load_max_over_mean"):
        assert tag in tags, tag
    assert "train/mfu" not in tags  # a CPU has no known peak: no invented MFU
    logged = [e.value for e in acc.Scalars("train/loss")]
    assert logged == pytest.approx(losses, rel=1e-6)
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_0000030"


def test_llep_training_logs_rebalancing_stats(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = ("parallel.ep=2", "moe.dispatcher=llep", "moe.llep.min_tokens_per_gemm=1")
    run = run_distributed(_train, 2, _overrides(tmp_path / "run", 3, *extra))[0]
    assert all(math.isfinite(v) for v in run["losses"].values())
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key in ("imbalance_before", "imbalance_after", "tokens_moved", "weights_moved", "planner_ms"):
        assert f"train_moe/layer00/llep_{key}" in tags, key
    assert all(e.value >= 1.0 for e in acc.Scalars("train_moe/layer00/llep_imbalance_before"))
