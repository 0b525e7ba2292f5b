"""FP8 availability checks, fallbacks and per-layer selection (all CPU; no Transformer Engine here)."""
import sys

import pytest

from launcher.config import Config, ConfigError, load_config
from parallel.config import FP8Config
from parallel.fp8 import swap as fp8
from parallel.fp8.swap import Fp8Support, fp8_unavailable_reason

HOPPER, ADA, AMPERE, BLACKWELL = (9, 0), (8, 9), (8, 0), (10, 0)
NO_TE = Fp8Support(HOPPER, "ModuleNotFoundError: No module named 'transformer_engine'")


@pytest.mark.parametrize("cfg, support, expected", [
    (FP8Config(), Fp8Support(None, None), "use train.precision=bf16"),
    (FP8Config(backend="te", recipe="delayed"), Fp8Support(None, None), "none is visible"),
    (FP8Config(), Fp8Support(AMPERE, None), "8.9"),
    (FP8Config(backend="te", recipe="delayed"), NO_TE, "pip install 'moetron[gpu]'"),
    (FP8Config(), Fp8Support(HOPPER, "ImportError: torchao"), "torchao"),
    (FP8Config(backend="te", recipe="mxfp8"), Fp8Support(HOPPER, None), "Blackwell"),
])
def test_unavailable_reasons_name_the_fix_in_one_line(cfg, support, expected):
    reason = fp8_unavailable_reason(cfg, support)
    assert reason is not None and expected in reason and "\n" not in reason


@pytest.mark.parametrize("cfg, support", [
    (FP8Config(), Fp8Support(HOPPER, None)),
    (FP8Config(recipe="rowwise"), Fp8Support(ADA, None)),
    (FP8Config(backend="te", recipe="current"), Fp8Support(ADA, None)),
    (FP8Config(backend="te", recipe="mxfp8"), Fp8Support(BLACKWELL, None)),
])
def test_supported_setups_pass(cfg, support):
    assert fp8_unavailable_reason(cfg, support) is None


@pytest.mark.parametrize("overrides, expected", [
    (["fp8.backend=te"], "fp8.recipe=tensorwise is not a recipe of fp8.backend=te: use one of delayed"),
    (["fp8.recipe=delayed"], "fp8.recipe=delayed is not a recipe of fp8.backend=torchao: use one of tensorwise"),
    (["fp8.recipe=mxfp8"], "or fp8.backend=te"),
    (["fp8.margin=1"], "fp8.margin is a Transformer Engine setting"),
    (["fp8.format=e4m3"], "fp8.format is a Transformer Engine setting"),
    (["fp8.amax_history_len=4"], "remove fp8.amax_history_len or set fp8.backend=te"),
    (["model.hidden_size=40", "model.num_attention_heads=4", "model.num_query_groups=4"],
     "model.hidden_size to be a multiple of 16"),
    (["moe.expert_ffn_hidden_size=40"], "moe.expert_ffn_hidden_size to be a multiple of 16"),
    (["moe.shared_expert_ffn_hidden_size=40"], "moe.shared_expert_ffn_hidden_size to be a multiple of 16"),
    (["fp8.backend=te", "fp8.recipe=delayed", "parallel.tp=2", "parallel.sequence_parallel=true"],
     "fp8.backend=te does not support parallel.sequence_parallel yet"),
])
def test_bad_fp8_settings_are_one_line_config_errors_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:  # checked before the machine, so a CPU reports them too
        load_config(overrides=["train.precision=fp8"] + overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_unknown_backend_is_rejected_with_the_choices():
    with pytest.raises(ConfigError, match="torchao"):
        load_config(overrides=["train.precision=fp8", "fp8.backend=torch"])


def test_config_validation_rejects_fp8_on_this_cpu_machine():
    with pytest.raises(ConfigError, match="train.precision=bf16") as err:
        load_config(overrides=["train.precision=fp8"])
    assert "\n" not in str(err.value)


def test_check_reports_missing_te_with_install_hint(monkeypatch):
    monkeypatch.setattr(fp8, "probe_fp8_support",
                        lambda backend: NO_TE if backend == "te" else Fp8Support(HOPPER, None))
    with pytest.raises(ConfigError, match=r"pip install 'moetron\[gpu\]'.*fp8.backend=torchao"):
        load_config(overrides=["train.precision=fp8", "fp8.backend=te", "fp8.recipe=delayed"])
    cfg = load_config(overrides=["train.precision=fp8"])  # torchao backend (default): no TE needed
    assert cfg.fp8.backend == "torchao"


def test_probe_on_cpu_sees_no_gpu_and_does_not_import_te():
    assert fp8.probe_fp8_support("te") == Fp8Support(None, None)
    assert "transformer_engine" not in sys.modules


def test_bf16_path_needs_no_te():
    cfg = load_config(overrides=["train.precision=bf16"])
    assert not fp8.fp8_layer_enabled(cfg, 1)
    with fp8.fp8_context(cfg, amax_group=None):
        pass
    import torch
    layer = torch.nn.Linear(4, 4)
    assert fp8.convert_to_fp8(layer, cfg, 1) is layer and fp8.fp8_stats(layer) == {}
    assert "transformer_engine" not in sys.modules


@pytest.mark.parametrize("keep, expected", [(True, [False, True, True, False]), (False, [True] * 4)])
def test_first_and_last_layers_kept_bf16(keep, expected):
    cfg = Config()
    cfg.train.precision, cfg.model.num_layers, cfg.fp8.keep_first_last_bf16 = "fp8", 4, keep
    assert [fp8.fp8_layer_enabled(cfg, i) for i in range(4)] == expected


def test_te_recipe_spec_follows_config():
    assert fp8.te_recipe_spec(FP8Config(backend="te", recipe="delayed", amax_history_len=8, margin=1,
                                        amax_compute_algo="most_recent")) == (
        "DelayedScaling", dict(fp8_format="HYBRID", amax_history_len=8, amax_compute_algo="most_recent", margin=1))
    assert fp8.te_recipe_spec(FP8Config(backend="te", recipe="current", format="e4m3")) == ("Float8CurrentScaling",
                                                                              dict(fp8_format="E4M3"))
    assert fp8.te_recipe_spec(FP8Config(backend="te", recipe="mxfp8"))[0] == "MXFP8BlockScaling"
