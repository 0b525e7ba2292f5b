"""DeepSeek-V3 both ways: a tiny random stock DeepseekV3ForCausalLM (fp32; groups, nonzero expert bias, shared
experts, q_lora, a dense first layer, YaRN) -> from-hf -> moetron gives transformers' logits and routes every token
to the same experts in every layer; to-hf of that gives bit-identical tensors that load in stock transformers."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from launcher.hf import convert
from launcher.hf.safetensors_io import write_json
from tests.helpers.dist import run_distributed
from tests.launcher.hf.test_from_hf import read_all

DEEPSEEK = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8,
                routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12,
                qk_nope_head_dim=8, n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1,
                norm_topk_prob=True, max_position_embeddings=64, rms_norm_eps=1e-5, rope_interleave=True,
                num_nextn_predict_layers=0,
                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "mscale": 1.0, "mscale_all_dim": 1.0})
VARIANTS = {"full": DEEPSEEK,  # every option on
            "plain": dict(DEEPSEEK, q_lora_rank=None, rope_interleave=False, n_group=1, topk_group=1,
                          norm_topk_prob=False, n_shared_experts=1, first_k_dense_replace=0,
                          rope_parameters={"rope_type": "default", "rope_theta": 5000.0})}
TOKENS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(5))


def _hf_model(config: dict):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**config)).eval()
    with torch.no_grad():
        for layer in model.model.layers[config["first_k_dense_replace"]:]:
            layer.mlp.gate.weight.normal_(0.0, 0.5)  # routing that depends on the token, not only on the bias
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    return model


def _routes(model, routers: dict, read) -> dict[int, torch.Tensor]:
    """{layer: per-token sorted expert ids} of one forward of TOKENS, from forward hooks on the routers."""
    got = {}
    hooks = [r.register_forward_hook(lambda m, i, out, idx=idx: got.__setitem__(idx, read(out).sort(-1).values))
             for idx, r in routers.items()]
    with torch.no_grad():
        logits = model(TOKENS)
    for h in hooks:
        h.remove()
    return got, logits if torch.is_tensor(logits) else logits.logits


def _convert_and_evaluate(rank, world_size, root):
    """from-hf, and the converted model's logits and routes."""
    from launcher.train import checkpoint
    from parallel.model import build_model

    rc_from = convert.main(["from-hf", "--hf", f"{root}/hf", "--output", f"{root}/ckpt", "data.source=synthetic",
                            "logging.tensorboard=false"])
    ckpt = checkpoint.find_latest(f"{root}/ckpt")
    with convert.single_process_groups() as groups:
        model = build_model(convert.checkpoint_config(ckpt), groups, torch.device("cpu"))
        checkpoint.load(ckpt, model, None, groups)
    model.eval()
    routers = {idx: layer.router for idx, layer in model.moe_layers().items()}
    routes, logits = _routes(model, routers, lambda out: out.topk_idx_TK)
    return rc_from, routes, logits


def _convert(root: Path, config: dict) -> dict:
    hf = _hf_model(config)
    hf.save_pretrained(root / "hf")
    routers = {i: layer.mlp.gate for i, layer in enumerate(hf.model.layers) if i >= config["first_k_dense_replace"]}
    routes, logits = _routes(hf, routers, lambda out: out[2])
    rc_from, moetron_routes, moetron_logits = run_distributed(_convert_and_evaluate, 1, str(root))[0]
    assert rc_from == 0
    # to-hf as a user runs it: its own process, no process group set up beforehand
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "launcher.convert", "to-hf", "--checkpoint", str(root / "ckpt"),
                           "--output", str(root / "hf2")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"root": root, "routes": routes, "logits": logits, "moetron_routes": moetron_routes,
            "moetron_logits": moetron_logits}


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    """variant -> its conversion, made on first use."""
    done = {}

    def get(variant: str) -> dict:
        if variant not in done:
            done[variant] = _convert(tmp_path_factory.mktemp(f"deepseek_{variant}"), VARIANTS[variant])
        return done[variant]

    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_from_hf_gives_transformers_logits_and_routes(conversions, variant):
    converted = conversions(variant)
    torch.testing.assert_close(converted["moetron_logits"], converted["logits"], rtol=0, atol=1e-5)
    moe_layers = set(range(VARIANTS[variant]["first_k_dense_replace"], 3))
    assert converted["routes"].keys() == converted["moetron_routes"].keys() == moe_layers
    for idx, want in converted["routes"].items():
        assert torch.equal(converted["moetron_routes"][idx].view_as(want), want), idx


def test_converted_settings(conversions):
    converted = conversions("full")
    recipe = yaml.safe_load((converted["root"] / "ckpt" / "config.yaml").read_text())
    m, moe = recipe["model"], recipe["moe"]
    assert (m["attention"], m["q_lora_rank"], m["dense_layers"], m["rope_scaling"]["type"]) == ("mla", 24, [0], "yarn")
    assert (moe["score_function"], moe["num_groups"], moe["group_topk"], moe["routed_scaling_factor"],
            moe["expert_bias"], moe["shared_expert_ffn_hidden_size"]) == ("sigmoid", 4, 2, 2.5, True, 32)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_to_hf_is_bit_identical_and_loads_in_stock_transformers(conversions, variant):
    from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV3ForCausalLM

    converted = conversions(variant)
    root = converted["root"]
    original, back = read_all(root / "hf"), read_all(root / "hf2")
    assert original.keys() == back.keys()
    for key, tensor in original.items():
        assert tensor.dtype == back[key].dtype and torch.equal(tensor, back[key]), key
    assert back["model.layers.1.mlp.gate.e_score_correction_bias"].abs().min() > 0
    assert not list((root / "hf2").glob("*.py"))
    model = AutoModelForCausalLM.from_pretrained(root / "hf2").eval()
    assert type(model) is DeepseekV3ForCausalLM
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, converted["logits"])
    a = AutoConfig.from_pretrained(root / "hf").to_dict()
    b = AutoConfig.from_pretrained(root / "hf2").to_dict()
    # the official DeepSeek-V3 keys other servers (vLLM) read are written too
    assert (b.pop("scoring_func"), b.pop("topk_method"), b.pop("moe_layer_freq")) == ("sigmoid", "noaux_tc", 1)
    ignore = {"transformers_version", "dtype", "_name_or_path"}
    assert {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}


def _from_hf(rank, world_size, root, out):
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = convert.main(["from-hf", "--hf", f"{root}/hf_nextn", "--output", f"{root}/{out}", "data.source=synthetic"])
    return rc, err.getvalue()


def test_a_declared_mtp_layer_without_weights_converts_without_mtp_in_one_line(conversions):
    """transformers' save_pretrained drops the MTP layers but keeps num_nextn_predict_layers (its default is 1):
    from-hf converts the main model with model.mtp_num_layers 0 and says so in one line (test_deepseek_v3_mtp.py
    converts the MTP layers when they are there)."""
    root = conversions("full")["root"]
    shutil.copytree(root / "hf", root / "hf_nextn")
    config = json.loads((root / "hf_nextn" / "config.json").read_text())
    write_json(root / "hf_nextn" / "config.json", dict(config, num_nextn_predict_layers=1))
    rc, err = run_distributed(_from_hf, 1, str(root), "ckpt_nextn")[0]
    assert rc == 0, err
    lines = [line for line in err.splitlines() if "num_nextn_predict_layers" in line]
    assert len(lines) == 1 and "num_nextn_predict_layers=1 but the weights hold no MTP layer (model.layers.3.*" in \
        lines[0] and "converted without MTP (model.mtp_num_layers: 0)" in lines[0], err
    recipe = yaml.safe_load((root / "ckpt_nextn" / "config.yaml").read_text())
    assert recipe["model"]["mtp_num_layers"] == 0


def _hf_config(**changes) -> dict:
    return {"model_type": "deepseek_v3", **DEEPSEEK, **changes}


@pytest.mark.parametrize("changes, named", [
    ({"scoring_func": "softmax", "topk_method": "greedy"},
     "deepseek_v3 options moetron cannot represent: scoring_func='softmax' (moetron: 'sigmoid'), topk_method='greedy'"),
    ({"num_key_value_heads": 2}, "num_key_value_heads=2 != num_attention_heads=4"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "partial_rotary_factor": 0.5}},
     "rope_parameters ['partial_rotary_factor'] cannot be represented"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, "rope type 'dynamic' is not supported"),
    ({"q_lora_rank": "16"}, "q_lora_rank is '16' (str); it must be an integer or null"),
    ({"first_k_dense_replace": 5}, "first_k_dense_replace=5 exceeds num_hidden_layers=3")])
def test_from_hf_refuses_what_moetron_cannot_represent(changes, named):
    from launcher.config import ConfigError
    from launcher.hf.families import for_hf

    with pytest.raises(ConfigError, match=re.escape(named)):
        for_hf(_hf_config(**changes)).merge_into_raw({}, _hf_config(**changes))


def test_official_config_layout_reads():
    """DeepSeek's own config.json: rope_scaling + a top-level rope_theta, the routing method keys, no q compression."""
    from launcher.config import config_from_dict
    from launcher.hf.families import for_hf

    official = _hf_config(q_lora_rank=None, rope_theta=10000, scoring_func="sigmoid", topk_method="noaux_tc",
                          moe_layer_freq=1, rope_parameters=None,
                          rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4,
                                        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    raw = for_hf(official).merge_into_raw({"data": {"source": "synthetic"}}, official)
    cfg = config_from_dict(raw)
    assert cfg.model.q_lora_rank is None and cfg.model.rope_scaling.factor == 40.0 and cfg.model.rope_theta == 1e4
    assert (cfg.moe.num_groups, cfg.moe.group_topk, cfg.moe.top_k, cfg.moe.expert_bias) == (4, 2, 3, True)
