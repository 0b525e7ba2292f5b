"""Recipes: parsing, dotted overrides, and one clear error line for each kind of bad input (through the CLI's main)."""
from pathlib import Path

import pytest
import yaml

from launcher import pretrain
from launcher.config import ConfigError, load_config, save_resolved, validate_world

REPO = Path(__file__).resolve().parents[2]


def test_overrides_apply_with_types():
    cfg = load_config(None, ["moe.num_experts=16", "moe.mone.keep_ratio=0.25", "moe.matryoshka.eval_k=[1,2,3]",
                             "model.dense_layers=[0]", "train.precision=bf16"])
    assert cfg.moe.num_experts == 16 and cfg.moe.mone.keep_ratio == 0.25
    assert cfg.moe.matryoshka.eval_k == [1, 2, 3] and cfg.model.dense_layers == [0]


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "recipes" / "smoke_cpu.yaml", ["data.source=synthetic", "train.steps=7"])
    out = save_resolved(cfg, tmp_path)
    assert load_config(out, []) == cfg


@pytest.mark.parametrize("overrides,message", [
    (["moe.num_expert=8"], "unknown key 'moe.num_expert'"),
    (["moe.mone.keep_ration=0.5"], "unknown key 'moe.mone.keep_ration'"),
    (["moe.top_k=two"], "moe.top_k: expected an integer, got 'two'"),
    (["train.precision=fp16"], "train.precision: must be one of"),
    (["moe.num_experts=6", "parallel.ep=4"], "moe.num_experts (6) must be divisible by parallel.ep (4)"),
    (["model.num_attention_heads=6", "model.num_query_groups=3", "model.head_dim=16", "parallel.tp=2"],
     "parallel.tp (2) must divide"),
    (["data.source=shards", "data.path=/nonexistent/shards"], "data.path '/nonexistent/shards' does not exist"),
    (["moe.matryoshka.enabled=true", "moe.matryoshka.k_max=9"], "moe.matryoshka needs"),
    (["moe.dispatcher=llep", "moe.capacity_factor=1.0"], "moe.dispatcher=llep is dropless"),
    (["moe.mone.enabled=true", "moe.mone.balance_loss_coeff=0.01", "parallel.ep=2"],
     "moe.mone.balance_loss_coeff > 0 is only defined without expert parallelism"),
])
def test_invalid_config_rejected_with_key_path(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_world_size_checks_before_any_process_group():
    cfg = load_config(None, ["parallel.tp=2", "parallel.pp=2"])
    with pytest.raises(ConfigError, match="world size 6 is not divisible by parallel.tp \\* parallel.pp = 2\\*2"):
        validate_world(cfg, 6)
    cfg = load_config(None, ["train.global_batch_size=6", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="train.global_batch_size \\(6\\) must be divisible"):
        validate_world(cfg, 1)


def _pretrain(tmp_path, capsys, recipe_text, *overrides) -> tuple[int, str]:
    """``moetron pretrain`` in-process (the subprocess contract is in tests/launcher/test_bad_inputs.py)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    code = pretrain.main(["--recipe", str(recipe), *overrides])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("recipe,overrides,message", [
    ("moe:\n  num_expertz: 8\n", [], "unknown key 'moe.num_expertz'"),
    ("train:\n  steps: many\n", [], "train.steps: expected an integer, got 'many'"),
    ("parallel:\n  ep: 3\n", [], "moe.num_experts (8) must be divisible by parallel.ep (3)"),
    ("data:\n  source: shards\n", [], "data.path is required when data.source=shards"),
    ("data:\n  source: shards\n  path: /no/such/dir\n", [], "data.path '/no/such/dir' does not exist"),
    ("model: [1, 2\n", [], "is not valid YAML: expected ',' or ']', but got '<stream end>' at line 2, column 1"),
    ("{}\n", ["moe.top_k"], "override 'moe.top_k' must look like key.path=value"),
])
def test_cli_prints_one_error_line_and_exits_2(tmp_path, capsys, recipe, overrides, message):
    code, err = _pretrain(tmp_path, capsys, recipe, *overrides)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("moetron: config error: ")
    assert message in lines[0]
    assert "Traceback" not in err


def test_cli_rejects_indivisible_world_before_process_groups(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    code, err = _pretrain(tmp_path, capsys, yaml.safe_dump({"parallel": {"tp": 2}}))
    assert code == 2
    assert "world size 3 is not divisible by parallel.tp * parallel.pp = 2*1" in err


def test_cuda_only_settings_fail_in_one_line_on_a_cpu(monkeypatch):
    import torch

    from launcher.config import ConfigError, load_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="parallel.backend=nccl needs CUDA GPUs and none is visible"):
        load_config(None, ["parallel.backend=nccl"])
    with pytest.raises(ConfigError, match="moe.mone.backend=triton needs a CUDA GPU"):
        load_config(None, ["moe.mone.enabled=true", "moe.mone.backend=triton"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs Triton kernels on a CPU (slowly)
    assert load_config(None, ["moe.mone.enabled=true", "moe.mone.backend=triton"]).moe.mone.backend == "triton"
