"""from-hf: a stock Qwen3-MoE directory -> moetron checkpoint -> HF is bit-identical, and pretraining resumes."""
from __future__ import annotations

import json

import pytest
import torch

from launcher.hf import convert
from launcher.config import ConfigError
from launcher.hf import hf_dir, mapping
from tests.helpers.dist import run_distributed


def _qwen3_config(**overrides) -> dict:
    config = {"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "moe_intermediate_size": 24, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True,
              "mlp_only_layers": [1], "max_position_embeddings": 32, "rms_norm_eps": 1e-5,
              "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}
    return {**config, **overrides}


def _round_trip(rank, world_size, root):
    """HF -> moetron (from-hf), one training step resumed from it, then the step-0 checkpoint -> HF (to-hf)."""
    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel import groups as pgroups

    rc_from = convert.main(["from-hf", "--hf", f"{root}/hf", "--output", f"{root}/ckpt", "data.source=synthetic",
                            "train.steps=1", "train.micro_batch_size=2", "train.global_batch_size=2",
                            f"logging.run_dir={root}/run", "logging.tensorboard=false", "checkpoint.keep_last=5"])
    rc_to = convert.main(["to-hf", "--checkpoint", f"{root}/ckpt/step_0000000", "--output", f"{root}/hf2"])
    trainer = Trainer(load_config(f"{root}/ckpt/config.yaml"), pgroups.initialize(1, 1, 1))
    result = trainer.fit()
    return rc_from, rc_to, result.final_step, result.losses


def _read_all(path) -> dict[str, torch.Tensor]:
    keys, read = hf_dir.weight_reader(path)
    return {k: read(k) for k in keys}


def test_round_trip_is_identical_and_pretraining_resumes(tmp_path):
    from transformers import AutoConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**{k: v for k, v in _qwen3_config().items() if k != "model_type"})) \
        .save_pretrained(tmp_path / "hf")
    rc_from, rc_to, final_step, losses = run_distributed(_round_trip, 1, str(tmp_path))[0]
    assert (rc_from, rc_to) == (0, 0)
    original, back = _read_all(tmp_path / "hf"), _read_all(tmp_path / "hf2")
    assert original.keys() == back.keys()
    for key, tensor in original.items():
        assert torch.equal(tensor, back[key]), key
    a = AutoConfig.from_pretrained(tmp_path / "hf").to_dict()
    b = AutoConfig.from_pretrained(tmp_path / "hf2").to_dict()
    ignore = {"transformers_version", "dtype", "_name_or_path"}
    assert {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}
    assert final_step == 1 and 0 in losses and torch.isfinite(torch.tensor(losses[0]))


def test_from_hf_rejects_what_moetron_cannot_represent():
    with pytest.raises(ConfigError, match="norm_topk_prob"):
        mapping.merge_hf_into_raw({}, _qwen3_config(norm_topk_prob=False))
    with pytest.raises(ConfigError, match="model_type"):
        mapping.merge_hf_into_raw({}, _qwen3_config(model_type="mixtral"))
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        mapping.merge_hf_into_raw({}, _qwen3_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0}))
    with pytest.raises(ConfigError, match="model.hidden_size=128 but the HF model has 32"):
        mapping.merge_hf_into_raw({"model": {"hidden_size": 128}}, _qwen3_config())


def test_from_hf_fields():
    raw = mapping.merge_hf_into_raw({"model": {"seq_length": 16}}, _qwen3_config(decoder_sparse_step=2,
                                                                                   mlp_only_layers=[]))
    assert raw["model"]["dense_layers"] == [0, 2]  # Qwen3-MoE: layer i is sparse iff (i + 1) % step == 0
    assert raw["model"]["seq_length"] == 16  # the recipe wins for training-time fields
    assert raw["model"]["rope_theta"] == 5000.0 and raw["moe"]["num_experts"] == 4


def test_never_unpickles(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_qwen3_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(hf_dir.HFDirError, match="pickle files can run code"):
        hf_dir.weight_reader(tmp_path)


def test_cli_errors(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    assert convert.main(["to-hf", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert convert.main(["to-hf", "--checkpoint", str(tmp_path / "none"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert hf_dir.parse_size("2GiB") == 2 * 2**30 and hf_dir.parse_size("500MB") == 500 * 10**6
    with pytest.raises(hf_dir.HFDirError, match="not understood"):
        hf_dir.parse_size("lots")
