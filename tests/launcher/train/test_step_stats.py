"""Per-step MoE statistics aggregate every micro-batch of the step and every DP rank (issue: dropped slots were taken
from the last micro-batch while token counts were summed, so the executed k behind TFLOP/s read 1.75 for 1.0)."""
import pytest

from tests.helpers.dist import run_distributed
from tests.launcher.train.test_train_resume import _overrides


def _one_step(rank, world, run_dir):
    import torch.distributed as dist

    from launcher.config import load_config
    from launcher.train import flops
    from launcher.train.metrics import moe_layer_scalars
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize

    cfg = load_config(None, _overrides(run_dir, 1, "moe.capacity_factor=0.5", "train.global_batch_size=8",
                                       "logging.tensorboard=false"))
    trainer = Trainer(cfg, initialize(1, 1, 1))
    seen = []  # every micro-batch's own statistics, per layer
    for idx, layer in trainer.model.moe_layers().items():
        def record(module, args, out, idx=idx):
            if module.training:
                st = module.last_stats
                seen.append((idx, int(st.dropped_slots), int(st.tokens_per_expert_E.sum()), float(st.aux_loss),
                             float(st.z_loss)))
        layer.register_forward_hook(record)
    _, _, stats, _ = trainer.train_step()
    gathered = [None] * world
    dist.all_gather_object(gathered, seen)
    return {"stats": {i: dict(vars(st), tokens_per_expert_E=st.tokens_per_expert_E.tolist())
                      for i, st in stats.items()},
            "seen": [row for rank_rows in gathered for row in rank_rows], "num_micro": trainer.num_micro,
            "scalars": moe_layer_scalars(stats, cfg.moe), "executed_k": flops.executed_k_per_layer(stats)}


@pytest.mark.parametrize("world", [1, 2], ids=["dp1-4micro", "dp2-2micro"])
def test_step_stats_sum_over_micro_batches_and_dp(tmp_path, world):
    out = run_distributed(_one_step, world, str(tmp_path))[0]
    assert out["num_micro"] * world == 4
    for pos, (idx, st) in enumerate(sorted(out["stats"].items())):
        rows = [r for r in out["seen"] if r[0] == idx]
        assert len(rows) == 4  # every micro-batch of every DP rank
        dropped, slots = sum(r[1] for r in rows), sum(r[2] for r in rows)
        assert dropped > 0 and st["dropped_slots"] == dropped and sum(st["tokens_per_expert_E"]) == slots
        assert out["executed_k"][pos] == pytest.approx(2 * (1 - dropped / slots))
        assert st["aux_loss"] == pytest.approx(sum(r[3] for r in rows) / 4, rel=1e-6)
        assert st["z_loss"] == pytest.approx(sum(r[4] for r in rows) / 4, rel=1e-6)
        tag = f"train_moe/layer{idx:02d}"
        assert out["scalars"][f"{tag}/dropped_slots"] == dropped
        assert out["scalars"][f"{tag}/aux_loss"] == pytest.approx(st["aux_loss"])


def _sp_and_plain_steps(rank, world, run_dir):
    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize

    groups, out = None, {}
    for sp in (False, True):
        cfg = load_config(None, _overrides(f"{run_dir}/{sp}", 2, "parallel.tp=2", "parallel.ep=2",
                                           f"parallel.sequence_parallel={str(sp).lower()}", "moe.z_loss_coeff=0.001",
                                           "moe.aux_loss_coeff=0.01", "logging.tensorboard=false"))
        groups = groups or initialize(2, 1, 2)
        trainer = Trainer(cfg, groups)
        steps = []
        for _ in range(2):
            loss, norm, layers, _ = trainer.train_step()
            trainer.step += 1
            steps.append((loss, norm, {i: (s.tokens_per_expert_E.tolist(), s.aux_loss, s.z_loss, s.dropped_slots)
                                       for i, s in layers.items()}))
        out[sp] = steps, trainer.evaluate(batches=2)
    return out


def test_sequence_parallel_step_numbers_equal_tensor_parallel(tmp_path):
    """TP=2 x EP=2 with and without parallel.sequence_parallel: the same loss, grad norm and per-layer MoE
    statistics (each TP rank routes its own tokens under SP: counts and aux/z shares add up over TP), and the same
    validation loss."""
    result = run_distributed(_sp_and_plain_steps, 4, str(tmp_path))[0]
    (plain_steps, plain_valid), (sp_steps, sp_valid) = result[False], result[True]
    assert sp_valid == pytest.approx(plain_valid, rel=1e-5)  # validation (forward only) too
    for (loss, norm, layers), (sp_loss, sp_norm, sp_layers) in zip(plain_steps, sp_steps):
        assert sp_loss == pytest.approx(loss, rel=1e-5) and sp_norm == pytest.approx(norm, rel=1e-5)
        for idx, (counts, aux, z, dropped) in layers.items():
            sp_counts, sp_aux, sp_z, sp_dropped = sp_layers[idx]
            assert sp_counts == counts and sp_dropped == dropped == 0
            assert sp_aux == pytest.approx(aux, rel=1e-5) and sp_z == pytest.approx(z, rel=1e-5)
            assert aux > 0 and z > 0
