"""Every GQA family both ways (Qwen2-MoE, Mixtral, OLMoE, GLM-4.5, dense Qwen3 and Llama): a tiny random model built
by transformers (CPU, fp32, every option the family has turned on: the models of tests/moe_core/test_hf_families.py)
-> from-hf gives transformers' logits within 1e-5 and the same experts for every token in every MoE layer; to-hf
of that checkpoint gives bit-identical tensors that load in stock transformers (no custom code). For Mixtral and
GLM-4.5 the converted checkpoint also trains two steps and its to-hf export's loss on the validation batches
equals moetron's own evaluation loss. Config options a family cannot represent are one line each."""
from __future__ import annotations

import re

import pytest
import torch

from launcher.hf import convert
from tests.helpers.dist import run_distributed
from tests.launcher.hf.test_from_hf import read_all
from tests.moe_core.test_hf_families import CASES, HF_COMMON, SEQ, VOCAB, hf_model

FAMILIES = ["qwen2_moe", "mixtral", "olmoe", "glm4_moe", "qwen3", "llama", "llama-tied"]
TRAINED = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "glm4_moe", "deepseek_v3", "qwen3", "llama")
TOKENS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
TRAIN = ["data.source=synthetic", "logging.tensorboard=false", "train.steps=2", "train.micro_batch_size=2",
         "train.global_batch_size=2", "train.eval_batches=2", "optim.warmup_steps=1", "checkpoint.interval=2"]


def _routes(routers: dict, read) -> tuple[dict, list]:
    """Forward hooks recording each router's sorted expert ids per token, keyed by layer index."""
    got: dict[int, torch.Tensor] = {}
    hooks = [r.register_forward_hook(lambda m, i, out, idx=idx: got.__setitem__(idx, read(out).sort(-1).values))
             for idx, r in routers.items()]
    return got, hooks


def _load(ckpt_root: str):
    from launcher.train import checkpoint
    from parallel.model import build_model

    ckpt = checkpoint.find_latest(ckpt_root)
    with convert.single_process_groups() as groups:
        model = build_model(convert.checkpoint_config(ckpt), groups, torch.device("cpu"))
        checkpoint.load(ckpt, model, None, groups)
    return model.eval()


def _convert(rank, world_size, root, train):
    """from-hf, the converted model's logits and routes, to-hf; with ``train`` two steps of pretraining from the
    converted checkpoint, moetron's evaluation loss, its validation batches and the trained model's to-hf."""
    import contextlib
    import io

    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel import groups as pgroups

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc_from = convert.main(["from-hf", "--hf", f"{root}/hf", "--output", f"{root}/ckpt", *TRAIN])
    model = _load(f"{root}/ckpt")
    routes, _ = _routes({idx: layer.router for idx, layer in model.moe_layers().items()}, lambda o: o.topk_idx_TK)
    with torch.no_grad():
        logits = model(TOKENS)
    out = {"rc": (rc_from, convert.main(["to-hf", "--checkpoint", f"{root}/ckpt", "--output", f"{root}/hf2"])),
           "stderr": err.getvalue(), "logits": logits, "routes": routes}
    if train:
        trainer = Trainer(load_config(f"{root}/ckpt/config.yaml"), pgroups.initialize(1, 1, 1))
        trainer.fit()
        out.update(eval_loss=trainer.evaluate(), valid=trainer._valid_batches(trainer.cfg.train.eval_batches),
                   rc_trained=convert.main(["to-hf", "--checkpoint", f"{root}/ckpt", "--output", f"{root}/hf3"]))
    return out


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    """case -> (transformers model, its logits and routes, the conversion's results), made on first use."""
    done = {}

    def get(case: str):
        if case not in done:
            root = tmp_path_factory.mktemp(case)
            model_type, _, variant = case.partition("-")
            hf = hf_model(model_type, CASES[model_type][0])
            if variant == "tied":  # transformers ties lm_head to the embedding and saves the embedding only
                hf.config.tie_word_embeddings = True
                hf.tie_weights()
            hf.save_pretrained(root / "hf")
            routers = {i: layer.mlp.gate for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "gate")
                       and hasattr(layer.mlp, "experts")}
            routes, hooks = _routes(routers, lambda out: out[2])
            with torch.no_grad():
                logits = hf(TOKENS).logits
            for h in hooks:
                h.remove()
            got = run_distributed(_convert, 1, str(root), case in TRAINED, timeout=600)[0]
            done[case] = root, hf, logits, routes, got
        return done[case]

    return get


@pytest.mark.parametrize("case", FAMILIES)
def test_from_hf_gives_transformers_logits_and_routes(conversions, case):
    _, _, logits, routes, got = conversions(case)
    assert got["rc"][0] == 0, got["stderr"]
    assert logits.abs().max() > 1
    torch.testing.assert_close(got["logits"], logits, rtol=1e-5, atol=1e-5)
    assert routes.keys() == got["routes"].keys()
    assert bool(routes) == (case.partition("-")[0] not in ("qwen3", "llama"))
    for idx, want in routes.items():
        assert torch.equal(got["routes"][idx].view_as(want), want), f"layer {idx}: different experts"


@pytest.mark.parametrize("case", FAMILIES)
def test_to_hf_is_bit_identical_and_loads_in_stock_transformers(conversions, case):
    from transformers import AutoModelForCausalLM

    root, hf, logits, _, got = conversions(case)
    assert got["rc"] == (0, 0), got["stderr"]
    original, back = read_all(root / "hf"), read_all(root / "hf2")
    if case.endswith("-tied"):  # written untied: lm_head is the embedding's copy
        assert "lm_head.weight" not in original and torch.equal(back.pop("lm_head.weight"),
                                                                 original["model.embed_tokens.weight"])
    assert original.keys() == back.keys()
    for key, tensor in original.items():
        assert tensor.dtype == back[key].dtype and torch.equal(tensor, back[key]), key
    assert not list((root / "hf2").glob("*.py"))
    model = AutoModelForCausalLM.from_pretrained(root / "hf2", attn_implementation="eager").eval()  # as hf
    assert type(model) is type(hf)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, logits, rtol=0, atol=0)


def test_tied_embeddings_are_untied_with_one_line(conversions):
    lines = [line for line in conversions("llama-tied")[4]["stderr"].splitlines() if "tie_word_embeddings" in line]
    assert len(lines) == 1 and "untied" in lines[0], lines


@pytest.mark.parametrize("case", TRAINED)
def test_trained_round_trip_matches_moetron_evaluation_loss(conversions, case):
    """Every family: two steps of pretraining from the converted checkpoint, then to-hf: the stock model's token-weighted loss on
    moetron's validation batches is moetron's own evaluation loss."""
    from transformers import AutoModelForCausalLM

    root, _, _, _, got = conversions(case)
    assert got["rc_trained"] == 0
    model = AutoModelForCausalLM.from_pretrained(root / "hf3").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for mb in got["valid"]:
            logits = model(mb["tokens"]).logits
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), mb["labels"].flatten(),
                                                       reduction="sum").item()
            count += mb["labels"].numel()
    assert abs(total / count - got["eval_loss"]) < 1e-5, (total / count, got["eval_loss"])
    trained, converted = read_all(root / "hf3"), read_all(root / "hf2")
    assert any(not torch.equal(t, converted[k]) for k, t in trained.items())  # the steps changed the weights


def _hf(model_type: str, **changes) -> dict:
    return {"model_type": model_type, **HF_COMMON, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
            **CASES[model_type][0], **changes}


@pytest.mark.parametrize("model_type, changes, named", [
    ("qwen2_moe", {"use_sliding_window": True}, "use_sliding_window=True (moetron: False)"),
    ("qwen2_moe", {"hidden_act": "gelu"}, "qwen2_moe options moetron cannot represent: hidden_act='gelu'"),
    ("mixtral", {"sliding_window": 4096}, "sliding-window attention (sliding_window=4096)"),
    ("mixtral", {"router_jitter_noise": 0.01}, "router_jitter_noise=0.01 (moetron: 0.0)"),
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv=8.0 (moetron: None)"),
    ("olmoe", {"attention_bias": True}, "attention_bias=True (moetron: False)"),
    ("glm4_moe", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("glm4_moe", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope type 'yarn' is not supported for glm4_moe"),
    ("qwen3", {"attention_bias": True}, "attention_bias=True (moetron: False)"),
    ("qwen3", {"layer_types": ["full_attention", "sliding_attention", "full_attention"]},
     "layer_types=['full_attention', 'sliding_attention']"),
    ("llama", {"mlp_bias": True}, "mlp_bias=True (moetron: False)"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope type 'llama3' is not supported for llama")])
def test_from_hf_refuses_what_moetron_cannot_represent(model_type, changes, named):
    from launcher.config import ConfigError
    from launcher.hf.families import for_hf

    hf = _hf(model_type, **changes)
    with pytest.raises(ConfigError, match=re.escape(named)):
        for_hf(hf).merge_into_raw({}, hf)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral", "olmoe", "glm4_moe", "qwen3", "llama"])
def test_export_picks_the_family_that_computes_the_model(model_type):
    """to-hf's automatic choice of a converted model is its own family, and every other family refuses it."""
    from launcher.config import config_from_dict
    from launcher.hf.families import FAMILIES, for_export, for_hf

    hf = _hf(model_type)
    cfg = config_from_dict(for_hf(hf).merge_into_raw({"data": {"source": "synthetic"}}, hf))
    assert for_export(cfg).model_type == model_type
    assert [name for name, f in FAMILIES.items() if not f.export_problems(cfg)] == [model_type]


UNKNOWN_OPTION = {"qwen2_moe": {"use_sliding_window": True}, "mixtral": {"router_jitter_noise": 0.1},
                  "olmoe": {"clip_qkv": 4.0}, "glm4_moe": {"hidden_act": "gelu"}, "qwen3": {"attention_bias": True},
                  "llama": {"mlp_bias": True}}


def _refuse_each(rank, world_size, root, names):
    """from-hf of each directory: (exit code, stderr)."""
    import contextlib
    import io

    results = {}
    for name in names:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = convert.main(["from-hf", "--hf", f"{root}/{name}", "--output", f"{root}/{name}_out",
                               "data.source=synthetic", "--quiet"])
        results[name] = rc, err.getvalue()
    return results


def test_a_refused_option_is_one_line_exit_2_nothing_written(conversions, tmp_path):
    """The CLI on a real directory of every family whose config.json turns on an option moetron refuses."""
    import json
    import shutil

    for name, changes in UNKNOWN_OPTION.items():
        shutil.copytree(conversions(name)[0] / "hf", tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**config, **changes}))
    results = run_distributed(_refuse_each, 1, str(tmp_path), list(UNKNOWN_OPTION))[0]
    for name, (rc, err) in results.items():
        assert rc == 2 and err.count("\n") == 1 and err.startswith("moetron: config error: "), (name, err)
        assert next(iter(UNKNOWN_OPTION[name])) in err, (name, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(UNKNOWN_OPTION)


def test_glm_mtp_layers_are_skipped_with_one_line(conversions, tmp_path):
    """A GLM-4.5 checkpoint with its MTP layer (model.layers.{N}.*, which transformers' save drops) converts the
    main model and names the skipped tensors in one line."""
    import json
    import shutil

    from launcher.hf.safetensors_io import INDEX_NAME, PlannedTensor, write_json, write_weights

    shutil.copytree(conversions("glm4_moe")[0] / "hf", tmp_path / "glm")
    mtp = {f"model.layers.3.{name}": torch.ones(32) for name in ("enorm.weight", "hnorm.weight")}
    write_weights(tmp_path / "glm", [PlannedTensor(k, (32,), torch.float32, lambda v=v: v) for k, v in mtp.items()],
                  1 << 20)  # model-00001-of-00001.safetensors beside the original model.safetensors
    weight_map = {**dict.fromkeys(read_all(conversions("glm4_moe")[0] / "hf"), "model.safetensors"),
                  **dict.fromkeys(mtp, "model-00001-of-00001.safetensors")}
    write_json(tmp_path / "glm" / INDEX_NAME, {"weight_map": weight_map})
    assert json.loads((tmp_path / "glm" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    rc, err = run_distributed(_refuse_each, 1, str(tmp_path), ["glm"])[0]["glm"]
    assert rc == 0, err
    lines = [line for line in err.splitlines() if "MTP" in line]
    assert len(lines) == 1 and "skipped 2 tensors under ['model.layers.3']" in lines[0], err
