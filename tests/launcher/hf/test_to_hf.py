"""to-hf: a checkpoint trained at TP=2/EP=2 converts, and the HF model's logits equal moetron's (fp32)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.helpers.dist import run_distributed
from tests.launcher.hf.conftest import K_VALUES, VARIANTS, probe_tokens


def load_hf(path, k):
    """The exported model with every MoE layer routing to k experts."""
    from transformers import AutoModelForCausalLM

    config = json.loads((path / "config.json").read_text())
    if config["model_type"] == "qwen3_moe":  # stock: k is a plain config field
        return AutoModelForCausalLM.from_pretrained(path, num_experts_per_tok=k).eval()
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    model.set_moe_k(k)
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_logits_equal_moetron(exported, variant):
    path = exported["root"] / variant / "hf"
    for k in K_VALUES:
        with torch.no_grad():
            logits = load_hf(path, k)(probe_tokens()).logits
        torch.testing.assert_close(logits, exported["ref"][(variant, k)], rtol=1e-5, atol=1e-6)
    # the two k values really route differently (k is not ignored)
    assert not torch.allclose(exported["ref"][(variant, K_VALUES[0])], exported["ref"][(variant, K_VALUES[1])])


def test_stock_export_is_plain_qwen3_moe(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeForCausalLM

    path = exported["root"] / "moe" / "hf"
    assert not list(path.glob("*.py"))  # no custom code: loads without trust_remote_code
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model) is Qwen3MoeForCausalLM
    assert model.config.mlp_only_layers == [0] and model.config.norm_topk_prob
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in index["weight_map"]
    tok = AutoTokenizer.from_pretrained(path)
    generation = json.loads((path / "generation_config.json").read_text())
    assert tok.eos_token == "<|endoftext|>" and generation["eos_token_id"] == tok.eos_token_id
    assert tok.decode(tok("def add(a, b):")["input_ids"]) == "def add(a, b):"


def test_custom_export_config(exported):
    mone = json.loads((exported["root"] / "mone" / "hf" / "config.json").read_text())
    assert mone["model_type"] == "moetron" and mone["auto_map"]["AutoModelForCausalLM"]
    assert mone["mone_enabled"] and mone["mone_keep_ratio"] == 0.5 and mone["router_expert_bias"]
    mmoe = json.loads((exported["root"] / "mmoe" / "hf" / "config.json").read_text())
    assert mmoe["matryoshka_k_range"] == [1, 3] and mmoe["num_experts_per_tok"] == 3  # eval k defaults to k_max
    from safetensors import safe_open

    index = json.loads((exported["root"] / "mone" / "hf" / "model.safetensors.index.json").read_text())
    shard = exported["root"] / "mone" / "hf" / index["weight_map"]["model.layers.1.mlp.gate.expert_bias"]
    with safe_open(str(shard), framework="pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.expert_bias").abs().sum() > 0  # trained, not a zero default


@pytest.mark.parametrize("variant", ["moe", "mmoe"])
def test_generate_matches_uncached_greedy(exported, variant):
    """generate() (KV cache) gives the tokens a cache-free greedy loop over full forwards gives."""
    model = load_hf(exported["root"] / variant / "hf", 2)
    prompt = probe_tokens()[:1, :5]
    out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    seq = prompt
    with torch.no_grad():
        for _ in range(4):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_per_layer_k_list(exported):
    """A list with one k per MoE layer equals the moetron reference where all entries are the same k."""
    model = load_hf(exported["root"] / "mmoe" / "hf", 1)
    model.set_moe_k([3, 3])
    with torch.no_grad():
        logits = model(probe_tokens()).logits
    torch.testing.assert_close(logits, exported["ref"][("mmoe", 3)], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one per MoE layer"):
        model.set_moe_k([1, 2, 3])


def _export_biased_bf16(rank, world_size, root):
    """A MoNE + expert-bias model whose biases sit near 4 with gaps far below bf16's spacing there (1/32), exported
    with --dtype bfloat16; returns per MoE layer the probe input and moetron's routing of it."""
    from launcher.config import load_config
    from launcher.hf import convert, transfer
    from parallel import groups as pgroups
    from parallel.model import build_model
    from tests.launcher.hf.conftest import BASE

    cfg = load_config(None, BASE + VARIANTS["mone"] + [f"logging.run_dir={root}/run"])
    model = build_model(cfg, pgroups.initialize(1, 1, 1), torch.device("cpu"))
    x = torch.randn(64, cfg.model.hidden_size, generator=torch.Generator().manual_seed(3)).bfloat16()
    routes = {}
    for idx, layer in model.moe_layers().items():
        with torch.no_grad():
            layer.router.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(idx))
            layer.router.expert_bias.copy_(4.0 + torch.tensor([0.0, 0.011, 0.019, 0.007]))
        routes[idx] = layer.router(x.float(), cfg.moe.top_k).topk_idx_TK
        rounded = layer.router.expert_bias.bfloat16().float()  # what a bf16 export used to keep of the bias
        probs = torch.softmax(x.float() @ layer.router.weight.detach().float().T, dim=-1)
        assert not torch.equal(torch.topk(probs + rounded, cfg.moe.top_k).indices, routes[idx])  # it matters
    convert.export_hf(cfg, transfer.ModelTensors(model), Path(root) / "hf", None, torch.bfloat16, 10**9)
    return x, routes


def test_bf16_export_keeps_fp32_router_and_routes_exactly_like_moetron(tmp_path, monkeypatch):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    x, routes = run_distributed(_export_biased_bf16, 1, str(tmp_path))[0]
    path = tmp_path / "hf"
    with safe_open(str(next(path.glob("*.safetensors"))), framework="pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.expert_bias").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.experts.0.up_proj.weight").dtype == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16).eval()
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    for idx, want in routes.items():
        gate = model.model.layers[idx].mlp.gate
        assert gate.weight.dtype == torch.float32 and gate.expert_bias.dtype == torch.float32
        torch.testing.assert_close(gate.expert_bias, 4.0 + torch.tensor([0.0, 0.011, 0.019, 0.007]))
        with torch.no_grad():
            _, _, idx_TK = gate(x)
        assert torch.equal(idx_TK, want), idx


def test_exported_files_follow_the_umask(tmp_path):
    import os

    from launcher.hf.safetensors_io import PlannedTensor, write_weights

    old = os.umask(0o027)
    try:
        write_weights(tmp_path, [PlannedTensor("model.norm.weight", (4,), torch.float32, lambda: torch.ones(4))],
                      1 << 20)
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert modes == {"model-00001-of-00001.safetensors": "0o640", "model.safetensors.index.json": "0o640"}


@pytest.mark.parametrize("overrides, named", [
    (["model.attention=mla"], "model.attention='mla' (needs 'gqa')"),
    (["model.rope_scaling.type=yarn"], "model.rope_scaling.type='yarn' (needs 'default')"),
    (["moe.score_function=sigmoid"], "moe.score_function='sigmoid' (needs 'softmax')"),
    (["moe.num_groups=2", "moe.group_topk=1"], "moe.num_groups=2 (needs 1)"),
    (["moe.routed_scaling_factor=2.5"], "moe.routed_scaling_factor=2.5 (needs 1.0)"),
    (["moe.shared_expert_ffn_hidden_size=64"], "moe.shared_expert_ffn_hidden_size=64 (needs 0)"),
    (["model.mtp_num_layers=1"], "model.mtp_num_layers=1 (needs 0)"),
    (["model.qk_norm=projection"], "model.qk_norm='projection' (needs 'head')"),
    (["model.qk_norm=none"], "model.qk_norm='none' (needs 'head')"),
    (["model.qkv_bias=true"], "model.qkv_bias=True (needs False)"),
    (["model.partial_rotary_factor=0.5"], "model.partial_rotary_factor=0.5 (needs 1.0)"),
    # MoNE in the shared expert: the moetron flavour (MoNE's modeling code) has no shared expert at all
    (["moe.shared_expert_ffn_hidden_size=64", "moe.mone.enabled=true", "moe.mone.shared_experts=true"],
     "moe.shared_expert_ffn_hidden_size=64 (needs 0)")])
def test_qwen3_moe_refuses_what_it_cannot_represent_in_one_line(overrides, named):
    """Qwen3-MoE would compute such a model differently: refuse instead of exporting it wrong."""
    from launcher.config import ConfigError, load_config
    from launcher.hf.families.qwen3_moe import FAMILY

    with pytest.raises(ConfigError, match="HF export as qwen3_moe cannot represent: .*" + re.escape(named)):
        FAMILY.hf_config(load_config(None, overrides), {})


def test_to_hf_picks_the_family_that_represents_the_model_or_names_the_closest_first():
    from launcher.config import ConfigError, load_config
    from launcher.hf import families

    mla = ["model.attention=mla", "moe.score_function=sigmoid"]
    assert families.for_export(load_config(None, [])).model_type == "qwen3_moe"
    assert families.for_export(load_config(None, mla)).model_type == "deepseek_v3"
    with pytest.raises(ConfigError, match=r"the closest: deepseek_v3: model.dense_layers=\[1\][^|]* \| "):
        families.for_export(load_config(None, mla + ["model.dense_layers=[1]"]))
    shared_mone = mla + ["moe.shared_expert_ffn_hidden_size=64", "moe.mone.enabled=true",
                         "moe.mone.shared_experts=true"]  # MoNE in the shared expert: no family writes it
    with pytest.raises(ConfigError, match=r"the closest: deepseek_v3: moe.mone.enabled=True \(needs False\)"):
        families.for_export(load_config(None, shared_mone))


def test_a_failed_write_leaves_the_output_as_it_was(tmp_path):
    """Everything is written into a temporary sibling that is renamed only when complete."""
    from launcher.hf.convert import staging

    with staging(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "a").read_text() == "1"
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError), staging(tmp_path / "empty") as tmp:
        (tmp / "a").write_text("1")
        raise OSError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"] and not any((tmp_path / "empty").iterdir())


def test_one_rank_config_drops_sequence_parallelism():
    """A checkpoint trained with parallel.sequence_parallel converts at tp=1 (where SP is not allowed)."""
    from launcher.config import load_config, to_dict
    from launcher.hf.convert import one_rank_config

    trained = load_config(None, ["parallel.tp=2", "parallel.sequence_parallel=true", "data.source=synthetic"])
    cfg = one_rank_config(to_dict(trained), keep_data=False)
    assert (cfg.parallel.tp, cfg.parallel.sequence_parallel) == (1, False)
