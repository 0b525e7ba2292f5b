"""``recipes/smoke_deepseek.yaml`` (every DeepSeek-V3-class feature on: MLA with query compression, a dense first
layer, sigmoid + expert bias + group-limited routing + scaling factor, the sequence-wise balance loss, a shared
expert, MTP, MoNE) trains on CPU with falling loss, logs the MTP loss, and its dry-run counts the new parts."""
from __future__ import annotations

import re

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launcher import cli
from launcher.config import load_config
from moe_core.transformer import MoETransformer
from tests.helpers.dist import free_port

RECIPE = "recipes/smoke_deepseek.yaml"


@pytest.fixture(autouse=True)
def one_rank_world(monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)


def test_recipe_turns_every_deepseek_feature_on():
    cfg = load_config(RECIPE)
    m, moe = cfg.model, cfg.moe
    assert (m.attention, m.q_lora_rank is not None, m.dense_layers, m.mtp_num_layers) == ("mla", True, [0], 1)
    assert (moe.score_function, moe.expert_bias, moe.num_groups > 1, moe.group_topk < moe.num_groups) == \
        ("sigmoid", True, True, True)
    assert (moe.routed_scaling_factor, moe.aux_loss_scope, moe.shared_expert_ffn_hidden_size > 0,
            moe.mone.enabled) == (2.5, "sequence", True, True)


def test_trains_with_falling_loss_and_logs_the_mtp_loss(tmp_path, capsys):
    argv = ["pretrain", "--recipe", RECIPE, "data.source=synthetic", "train.steps=30", "train.eval_interval=0",
            "checkpoint.save_at_end=false", "checkpoint.interval=0", "optim.warmup_steps=5",
            f"logging.run_dir={tmp_path / 'run'}"]
    assert cli.main(argv) == 0
    ea = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    loss = [e.value for e in ea.Scalars("train/loss")]
    mtp = [e.value for e in ea.Scalars("train/mtp_loss")]
    assert len(loss) == len(mtp) == 4 and loss[-1] < loss[0] - 1.0, loss  # logged at steps 0, 10, 20, 29
    assert mtp[-1] < mtp[0] - 0.1, mtp


def test_dry_run_counts_every_parameter_of_mla_shared_experts_and_mtp(capsys):
    """The dry-run's parameter count (from launcher/train/flops.py's formula) equals the built model's."""
    assert cli.main(["pretrain", "--recipe", RECIPE, "--dry-run"]) == 0
    counted = int(re.search(r"; ([\d,]+) parameters", capsys.readouterr().out).group(1).replace(",", ""))
    cfg = load_config(RECIPE)
    model = MoETransformer(cfg.model, cfg.moe, seed=0)
    assert counted == sum(p.numel() for p in model.parameters())
