"""Recipes: parsing, dotted overrides, and one clear error line for each kind of bad input (through the CLI's main)."""
from pathlib import Path

import pytest
import torch
import yaml

from launcher import config, pretrain
from launcher.config_sections import OptimConfig
from launcher.config import (ConfigError, load_config, resolve, resolved_dict, save_resolved,
                             to_dict, validate_world)
from launcher.train.checkpoint_config import _flatten, config_differences
from moe_core.config import MoEConfig
from moe_core.model_config import ModelConfig
from parallel.config import ParallelConfig

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
    (["moe.shared_expert_ffn_hidden_size=33", "parallel.tp=2"],
     "parallel.tp (2) must divide moe.shared_expert_ffn_hidden_size (33)"),
    (["moe.shared_expert_gate=true"], "moe.shared_expert_gate=true needs a shared expert"),
    (["moe.shared_expert_ffn_hidden_size=-1"], "moe.shared_expert_ffn_hidden_size: -1 is outside the allowed range"),
    (["moe.matryoshka.enabled=true", "moe.matryoshka.k_max=9"], "moe.matryoshka needs"),
    (["moe.dispatcher=llep", "moe.capacity_factor=1.0"], "moe.dispatcher=llep is dropless"),
    (["moe.mone.enabled=true", "moe.mone.balance_loss_coeff=0.01", "parallel.ep=2"],
     "moe.mone.balance_loss_coeff > 0 is only defined without expert parallelism"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel needs parallel.tp > 1"),
    (["parallel.sequence_parallel=true", "parallel.tp=2", "model.seq_length=127"],
     "parallel.sequence_parallel: parallel.tp (2) must divide model.seq_length (127)"),
    (["parallel.sequence_parallel=yes"], "parallel.sequence_parallel"),
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


# ---------------------------------------------------------------- one resolved config

AUTOMATIC = ("model.head_dim", "moe.matryoshka.eval_k", "optim.min_lr", "optim.distributed",
             "optim.overlap_param_gather", "optim.bucket_size", "checkpoint.dir")
"""Settings whose null means "automatic": concrete once resolved."""
OFF_NULLS = {"moe.capacity_factor", "data.path", "data.valid_path", "logging.peak_tflops", "model.q_lora_rank",
             "model.rope_scaling.mscale", "model.rope_scaling.mscale_all_dim", "model.rope_scaling.attention_factor",
             "train.cpu_threads", "parallel.pp_layout"}
"""Settings whose null means "off" / "none" (peak_tflops: no datasheet value on a CPU; the rope_scaling ones are
unused without rope_scaling.type=yarn; cpu_threads: left to torch where CUDA is available; pp_layout: the even
split)."""


def test_run_dir_config_yaml_holds_no_automatic_null(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = pretrain.main(["--recipe", str(REPO / "recipes" / "smoke_cpu.yaml"), "data.source=synthetic",
                          "data.path=null", "train.steps=1", f"logging.run_dir={run_dir}"])
    assert code == 0, capsys.readouterr().err
    written = _flatten(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert {key for key, value in written.items() if value is None} <= OFF_NULLS
    assert all(written[key] is not None for key in AUTOMATIC)
    assert written["checkpoint.dir"] == str(run_dir / "checkpoints") and written["optim.min_lr"] == 0.003 / 10
    assert written["model.head_dim"] == 128 // 4 and written["moe.matryoshka.eval_k"] == 2  # top_k
    assert written["optim.distributed"] is False and written["optim.overlap_param_gather"] is True
    assert written["train.cpu_threads"] == (None if torch.cuda.is_available() else torch.get_num_threads())


def test_listing_settings_needs_no_data_but_training_does(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a fresh clone before `moetron preprocess`: no data/smoke
    recipe = str(REPO / "recipes" / "smoke_cpu.yaml")
    assert config.main(["--recipe", recipe]) == 0
    assert "data.path = data/smoke" in capsys.readouterr().out
    assert pretrain.main(["--recipe", recipe, "--dry-run"]) == 0  # reads no data either
    capsys.readouterr()
    assert pretrain.main(["--recipe", recipe]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "moetron: config error: data.path 'data/smoke' does not exist (run `moetron preprocess` to make shards)"]


@pytest.mark.parametrize("overrides,world_size", [
    ([], 1),
    (["train.precision=bf16", "train.compile=true", "optim.lr=0.01"], 1),
    (["moe.matryoshka.enabled=true", "moe.matryoshka.k_max=3", "model.dense_layers=[1]", "model.head_dim=16"], 1),
    (["moe.matryoshka.eval_k=[1,2,3,2]", "optim.min_lr=0", "optim.distributed=true", "parallel.ep=2",
      "checkpoint.dir=/somewhere/else", "train.global_batch_size=16"], 4),
    (["parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=2"], 8),
])
def test_resolve_is_idempotent_and_its_yaml_is_a_recipe(tmp_path, overrides, world_size):
    parsed = load_config(None, overrides)
    resolved = resolve(parsed, world_size)
    assert resolve(resolved, world_size) == resolved
    assert load_config(None, overrides) == parsed  # resolve copies; the parsed config is unchanged
    flat = _flatten(to_dict(resolved))
    assert all(flat[key] is not None for key in AUTOMATIC)
    reread = load_config(save_resolved(resolved, tmp_path), [])  # every resolved value passes validation
    validate_world(reread, world_size)
    assert reread == resolved and resolve(reread, world_size) == resolved


def test_automatic_values():
    cfg = resolve(load_config(None, ["optim.lr=0.002", "logging.run_dir=runs/x"]), 4)
    assert cfg.optim.min_lr == 0.002 / 10 and cfg.checkpoint.dir == str(Path("runs/x") / "checkpoints")
    assert cfg.optim.distributed is True and cfg.optim.bucket_size == 40_000_000  # DP = 4 > 1
    assert resolve(load_config(None, []), 64).optim.bucket_size == 64_000_000  # megatron-core: max(4e7, 1e6 * DP)
    assert resolve(load_config(None, ["train.precision=bf16"]), 1).optim.distributed is True
    assert resolve(load_config(None, ["train.precision=bf16", "train.compile=true"]), 1).optim.overlap_param_gather \
        is False
    assert resolve(load_config(None, ["moe.capacity_factor=null"]), 1).moe.capacity_factor is None  # null = off


def test_resume_compares_resolved_with_unresolved_configs():
    parsed = load_config(None, ["model.dense_layers=[0]"])
    resolved = to_dict(resolve(parsed, 2))
    assert config_differences(resolved_dict(to_dict(parsed), 2), resolved) == []  # an older checkpoint
    assert config_differences(resolved_dict(resolved, 2), resolved) == []
    other = to_dict(load_config(None, ["model.head_dim=64"]))
    assert config_differences(resolved_dict(other, 2), resolved) == ["model.dense_layers [] -> [0]",
                                                                                "model.head_dim 64 -> 32"]
    older = {"model": {"head_dim": None, "retired_key": 1}, "moe": {}}  # another version's keys: compared as stored
    assert resolved_dict(older, 2) == older


def test_derived_values_are_defined_on_the_config():
    assert ModelConfig(hidden_size=96, num_attention_heads=4).head_width == 24
    assert ModelConfig(hidden_size=96, num_attention_heads=4, head_dim=8).head_width == 8
    assert ModelConfig(num_layers=5, dense_layers=[0, 3, 3]).moe_layer_indices == [1, 2, 4]
    moe = MoEConfig(top_k=3)
    assert moe.default_eval_k == 3 and moe.eval_k_per_layer(2) == [3, 3]
    moe.matryoshka.enabled, moe.matryoshka.k_max = True, 5
    assert moe.default_eval_k == 5
    moe.matryoshka.eval_k = [1, 2]
    assert moe.default_eval_k == [1, 2] and moe.eval_k_per_layer(2) == [1, 2]
    assert OptimConfig(lr=0.5).final_lr == 0.05 and OptimConfig(lr=0.5, min_lr=0.0).final_lr == 0.0
    assert ParallelConfig(tp=2, pp=2).data_parallel_size(16) == 4


def test_derived_values_are_not_recomputed_elsewhere():
    """The head width and the MoE layers are read from ModelConfig, never recomputed from their fields."""
    import re

    recomputed = re.compile(r"hidden_size\s*//\s*[\w.]*num_attention_heads|not in [\w.]*dense_layers|"
                            r"len\(set\([\w.]*dense_layers\)\)")
    hits = [f"{path.relative_to(REPO)}:{n}" for pkg in ("kernels", "moe_core", "parallel", "launcher")
            for path in (REPO / pkg).rglob("*.py") if path != REPO / "moe_core" / "model_config.py"
            for n, line in enumerate(path.read_text().splitlines(), 1) if recomputed.search(line)]
    assert hits == []
