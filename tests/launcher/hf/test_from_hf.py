"""from-hf: a stock Qwen3-MoE directory -> moetron checkpoint -> HF is bit-identical, and pretraining resumes."""
from __future__ import annotations

import json

import pytest
import torch

from launcher.config import ConfigError
from launcher.hf import convert, families, hf_dir
from launcher.hf.families.qwen3_moe import FAMILY as QWEN3
from launcher.hf.safetensors_io import HFDirError, HFWeights, write_json
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


def _merge(raw: dict, hf: dict) -> dict:
    return families.for_hf(hf).merge_into_raw(raw, hf)


def read_all(path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory, read with the safetensors library itself (independent of moetron's reader),
    and equal to what moetron's streaming reader reads."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else \
        ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    weights = HFWeights(path)
    assert weights.info.keys() == out.keys() and all(torch.equal(weights.read(k), v) for k, v in out.items())
    return out


def test_round_trip_is_identical_and_pretraining_resumes(tmp_path):
    from transformers import AutoConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**{k: v for k, v in _qwen3_config().items() if k != "model_type"})) \
        .save_pretrained(tmp_path / "hf")
    rc_from, rc_to, final_step, losses = run_distributed(_round_trip, 1, str(tmp_path))[0]
    assert (rc_from, rc_to) == (0, 0)
    original, back = read_all(tmp_path / "hf"), read_all(tmp_path / "hf2")
    assert original.keys() == back.keys()
    for key, tensor in original.items():
        assert torch.equal(tensor, back[key]), key
    a = AutoConfig.from_pretrained(tmp_path / "hf").to_dict()
    b = AutoConfig.from_pretrained(tmp_path / "hf2").to_dict()
    ignore = {"transformers_version", "dtype", "_name_or_path"}
    assert {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}
    assert final_step == 1 and 0 in losses and torch.isfinite(torch.tensor(losses[0]))


def test_from_hf_rejects_what_moetron_cannot_represent():
    with pytest.raises(ConfigError, match="model_type"):
        _merge({}, _qwen3_config(model_type="llama4"))
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        _merge({}, _qwen3_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0}))
    with pytest.raises(ConfigError, match="model.hidden_size=128 but the HF model has 32"):
        _merge({"model": {"hidden_size": 128}}, _qwen3_config())
    with pytest.raises(ConfigError, match="model.mtp_num_layers=1 but the HF model has 0"):  # no MTP weights to read
        _merge({"model": {"mtp_num_layers": 1}}, _qwen3_config())


@pytest.mark.parametrize("norm", [True, False])
def test_norm_topk_prob_is_carried_both_ways(norm):
    from launcher.config import config_from_dict

    raw = _merge({}, _qwen3_config(norm_topk_prob=norm))
    assert raw["moe"]["norm_topk_prob"] is norm
    assert _merge({}, _qwen3_config(norm_topk_prob=False, num_experts_per_tok=1))["moe"] == \
        {**raw["moe"], "top_k": 1, "norm_topk_prob": False}  # raw top-1 gates are representable
    # HF's renormalised top-1 gate is 1.0: moetron's straight-through top-1 gate has that value
    assert _merge({}, _qwen3_config(norm_topk_prob=True, num_experts_per_tok=1))["moe"] == \
        {**raw["moe"], "top_k": 1, "norm_topk_prob": True, "top1_gate": "straight_through"}
    raw["data"] = {"source": "synthetic"}
    cfg = config_from_dict(raw)
    assert cfg.moe.norm_topk_prob is norm
    assert QWEN3.hf_config(cfg, {})["norm_topk_prob"] is norm
    cfg.moe.top_k = 1  # a Switch-gated top-1 model writes false: the same gate (raw probability) at every k
    assert QWEN3.hf_config(cfg, {})["norm_topk_prob"] is False
    cfg.moe.top1_gate = "straight_through"  # gate value 1.0: HF's renormalised top-1 gate
    assert QWEN3.hf_config(cfg, {})["norm_topk_prob"] is norm
    cfg.moe.expert_bias = True  # moetron flavour: its modeling code applies the same rule
    assert QWEN3.hf_config(cfg, {})["norm_topk_prob"] is norm


def test_from_hf_fields():
    raw = _merge({"model": {"seq_length": 16}}, _qwen3_config(decoder_sparse_step=2,
                                                                                   mlp_only_layers=[]))
    assert raw["model"]["dense_layers"] == [0, 2]  # Qwen3-MoE: layer i is sparse iff (i + 1) % step == 0
    assert raw["model"]["seq_length"] == 16  # the recipe wins for training-time fields
    assert raw["model"]["rope_theta"] == 5000.0 and raw["moe"]["num_experts"] == 4


def test_never_unpickles(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_qwen3_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(HFDirError, match="pickle files can run code"):
        HFWeights(tmp_path)


def test_cli_errors(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    assert convert.main(["to-hf", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert convert.main(["to-hf", "--checkpoint", str(tmp_path / "none"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert hf_dir.parse_size("2GiB") == 2 * 2**30 and hf_dir.parse_size("500MB") == 500 * 10**6
    with pytest.raises(HFDirError, match="not understood"):
        hf_dir.parse_size("lots")


def _from_hf_printing(rank, world_size, root):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = convert.main(["from-hf", "--hf", f"{root}/hf", "--output", f"{root}/ckpt", "train.steps=2",
                           "train.micro_batch_size=2", "train.global_batch_size=2", "model.seq_length=16",
                           "logging.tensorboard=false"])
    return rc, out.getvalue()


def test_printed_follow_up_continues_pretraining_on_shards_with_the_hf_tokenizer(tmp_path):
    """The commands from-hf prints, run as printed (YOUR_TEXT.jsonl = a real corpus), tokenize with the model's own
    tokenizer and continue pretraining from the converted step-0 checkpoint on those shards."""
    import os
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from launcher.data.format import read_index
    from launcher.data.tokenizer import train_tokenizer
    from tests.launcher.data.helpers import CORPUS, corpus_docs

    (tmp_path / "hf").mkdir()
    train_tokenizer(corpus_docs(200_000), 300, "<|endoftext|>").save(str(tmp_path / "hf" / "tokenizer.json"))
    torch.manual_seed(0)
    qwen = {k: v for k, v in _qwen3_config(vocab_size=320).items() if k != "model_type"}
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**qwen)).save_pretrained(tmp_path / "hf")
    rc, printed = run_distributed(_from_hf_printing, 1, str(tmp_path))[0]
    assert rc == 0, printed
    commands = [line.strip() for line in printed.splitlines() if line.startswith("  moetron ")]
    assert [c.split()[1] for c in commands] == ["preprocess", "pretrain"], printed
    assert f"--tokenizer {tmp_path / 'hf' / 'tokenizer.json'}" in commands[0]
    repo = Path(__file__).resolve().parents[3]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    for command in commands:
        argv = [a if a != "YOUR_TEXT.jsonl" else str(CORPUS) for a in shlex.split(command)[1:]]
        proc = subprocess.run([sys.executable, "-m", "launcher.cli", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-2000:])
        if argv[0] == "preprocess":  # the printed --valid-fraction holds out validation samples of the shipped corpus
            assert read_index(tmp_path / "data" / "ckpt")["splits"]["valid"]["num_samples"] > 0, command
    assert f"resumed from {tmp_path / 'ckpt' / 'step_0000000'}" in proc.stdout
    assert "done: step 2" in proc.stdout and "data        shards in data/ckpt" in proc.stdout


def test_from_hf_never_writes_into_a_used_directory(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: {}\n")  # e.g. an existing run directory
    (tmp_path / "hf").mkdir()
    write_json(tmp_path / "hf" / "config.json", _qwen3_config())
    assert convert.main(["from-hf", "--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not an empty directory" in err
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]
