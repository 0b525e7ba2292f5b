"""Checkpoints: a save that dies midway never replaces the last good checkpoint, and a checkpoint written at one
TP/PP/EP layout loads at another with identical values."""
import pytest
import torch

from tests.helpers.dist import run_distributed
from tests.launcher.train.test_train_resume import _overrides


def _crash_during_second_save(rank, world_size, overrides, root):
    from megatron.core import dist_checkpointing

    from launcher.train import checkpoint
    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize

    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, initialize(1, 1, 1))
    good = checkpoint.save(root, 5, trainer.model, trainer.optimizer, trainer.groups, {"step": 5}, {})
    expected = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    real_save = dist_checkpointing.save

    def dies_midway(sd, ckpt_dir, *args, **kwargs):
        (torch.zeros(3)).numpy().tofile(f"{ckpt_dir}/__0_0.distcp")  # a partial file, then the process "dies"
        raise KeyboardInterrupt("killed during save")

    dist_checkpointing.save = dies_midway
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    try:
        checkpoint.save(root, 10, trainer.model, trainer.optimizer, trainer.groups, {"step": 10}, {})
    except KeyboardInterrupt:
        pass
    finally:
        dist_checkpointing.save = real_save
    latest = checkpoint.find_latest(root)
    # the same layout asks for per-rank entries; this checkpoint has none, which must be fine
    common, per_rank = checkpoint.load(latest, trainer.model, trainer.optimizer, trainer.groups,
                                       {"rng": None, "dp.data": None})
    restored = all(torch.equal(p, expected[n]) for n, p in trainer.model.named_parameters())
    retry = checkpoint.save(root, 10, trainer.model, trainer.optimizer, trainer.groups, {"step": 10}, {})
    return {"latest": latest.name, "good": good.name, "step": common["step"], "per_rank": per_rank,
            "restored": restored, "retry": retry.name, "left": sorted(p.name for p in root.iterdir())}


def test_killed_save_leaves_last_good_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    out = run_distributed(_crash_during_second_save, 1, _overrides(tmp_path / "run", 5), root)[0]
    assert out["latest"] == out["good"] == "step_0000005"
    assert out["step"] == 5 and out["per_rank"] == {} and out["restored"]
    assert out["retry"] == "step_0000010"
    assert out["left"] == ["latest", "step_0000005", "step_0000010"]  # the .tmp of the dead save is gone


def _train_and_save(rank, world_size, overrides):
    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize

    cfg = load_config(None, overrides)
    Trainer(cfg, initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)).fit()


def _load_at(rank, world_size, overrides, ckpt, reference):
    from launcher.train import checkpoint
    from launcher.config import load_config
    from parallel.groups import initialize
    from parallel.model import build_model
    from parallel.sharding import get_spec, local_slices

    cfg = load_config(None, overrides)
    g = initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep)
    model = build_model(cfg, g)
    if ckpt is not None:  # None: the freshly initialised model
        checkpoint.load(ckpt, model, None, g)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    if reference is not None:
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, reference[n][local_slices(get_spec(p), g)], rtol=0, atol=0)
    return params


GATED_SHARED = ("moe.shared_expert_ffn_hidden_size=64", "moe.shared_expert_gate=true")


@pytest.mark.parametrize("load_layout,world,model", [(("parallel.pp=2",), 2, ()),
                                                     (("parallel.tp=2", "parallel.pp=2"), 4, ()),
                                                     (("parallel.tp=2", "parallel.pp=2"), 4, GATED_SHARED)],
                         ids=["pp2", "tp2-pp2", "tp2-pp2-shared-expert"])
def test_checkpoint_reshards_across_layouts(tmp_path, load_layout, world, model):
    saved = ("parallel.tp=2", "parallel.ep=2")
    run_distributed(_train_and_save, 4, _overrides(tmp_path / "run", 2, *saved, *model))
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002"
    full = run_distributed(_load_at, 1, _overrides(tmp_path / "one", 2, *model), ckpt, None)[0]
    fresh = run_distributed(_load_at, 1, _overrides(tmp_path / "init", 2, *model), None, None)
    assert any(not torch.equal(full[n], fresh[0][n]) for n in full)  # training really changed the weights
    assert all(not torch.equal(full[n], fresh[0][n]) for n in full if "shared_expert" in n)
    run_distributed(_load_at, world, _overrides(tmp_path / "other", 2, *load_layout, *model), ckpt, full)
