"""moetron <-> Hugging Face: parameter names and config fields (pure functions, no I/O, no transformers import).

Architecture: a baseline moetron model (softmax top-k router, SwiGLU experts, no expert bias) IS Hugging Face
Qwen3-MoE (``model_type: qwen3_moe``); moetron's ``dense_layers`` are Qwen3-MoE's ``mlp_only_layers`` with
``intermediate_size = dense_ffn_hidden_size``. MoNE, Matryoshka and per-layer k, and aux-loss-free expert bias
need moetron's own modeling code (``model_type: moetron``, a subclass of the Qwen3-MoE classes, shipped in the
directory and registered through ``auto_map``).

Gate weights: Qwen3-MoE's ``norm_topk_prob`` is moetron's ``MoEConfig.renormalise_gates`` (renormalised at every
k, 1.0 at k = 1), written both ways: a top-1 model trained with ``moe.top1_gate: probability`` (Switch) and a
Matryoshka model (raw probabilities by default) are written with ``norm_topk_prob: false``; a stock top-1 model with
``norm_topk_prob: true`` is read as ``moe.top1_gate: straight_through`` (the same gate value, 1.0).

Dtypes: tensors the model keeps in fp32 (router weight: the router computes in fp32 from the fp32 master weight;
aux-loss-free expert bias) are written in fp32 whatever ``--dtype`` is; the moetron flavour's modeling code keeps
them fp32 when loaded in bf16/fp16. Everything else is written in the export dtype.

Weights on disk use the Qwen3-MoE Hub layout for both flavours (what transformers' own ``save_pretrained`` writes;
transformers >= 5 fuses the experts into ``gate_up_proj`` when loading)::

    moetron (tp=pp=ep=1)                         Hugging Face
    embed_tokens.weight                          model.embed_tokens.weight
    layers.{i}.<attention / norms / dense mlp>   model.layers.{i}.<same name>
    layers.{i}.mlp.router.weight        [E, D]   model.layers.{i}.mlp.gate.weight
    layers.{i}.mlp.router.expert_bias   [E]      model.layers.{i}.mlp.gate.expert_bias   (moetron flavour only)
    layers.{i}.mlp.experts.w_gate_EFD   [E,F,D]  model.layers.{i}.mlp.experts.{e}.gate_proj.weight  [F, D] each
    layers.{i}.mlp.experts.w_up_EFD     [E,F,D]  model.layers.{i}.mlp.experts.{e}.up_proj.weight    [F, D] each
    layers.{i}.mlp.experts.w_down_EDF   [E,D,F]  model.layers.{i}.mlp.experts.{e}.down_proj.weight  [D, F] each
    norm.weight                                  model.norm.weight
    lm_head.weight                               lm_head.weight
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import torch

from launcher.config import Config, ConfigError

STOCK_MODEL_TYPE, STOCK_ARCH = "qwen3_moe", "Qwen3MoeForCausalLM"
CUSTOM_MODEL_TYPE, CUSTOM_ARCH = "moetron", "MoetronForCausalLM"
AUTO_MAP = {"AutoConfig": "configuration_moetron.MoetronConfig",
            "AutoModelForCausalLM": "modeling_moetron.MoetronForCausalLM"}

_EXPERT_WEIGHTS = {"w_gate_EFD": "gate_proj", "w_up_EFD": "up_proj", "w_down_EDF": "down_proj"}


# ---------------------------------------------------------------- parameter names

def hf_keys(name: str, num_experts: int) -> list[str]:
    """The HF key(s) of moetron parameter/buffer ``name``: one key, or one per expert for stacked expert weights."""
    if name == "lm_head.weight":
        return [name]
    module, _, leaf = name.rpartition(".")
    if leaf in _EXPERT_WEIGHTS:
        return [f"model.{module}.{e}.{_EXPERT_WEIGHTS[leaf]}.weight" for e in range(num_experts)]
    return ["model." + name.replace(".mlp.router.", ".mlp.gate.")]


FP32_KEY_SUFFIXES = (".mlp.gate.weight", ".mlp.gate.expert_bias")
"""HF keys written in fp32 whatever the export dtype (the router's weight and expert bias)."""


def export_dtype(hf_key: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype HF tensor ``hf_key`` is written in when the export dtype is ``dtype``."""
    return torch.float32 if hf_key.endswith(FP32_KEY_SUFFIXES) else dtype


def to_hf(tensors: Mapping[str, torch.Tensor], num_experts: int) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (key, tensor) pairs of a full (single-device) moetron state; expert stacks are split per expert."""
    for name, tensor in tensors.items():
        keys = hf_keys(name, num_experts)
        yield from zip(keys, tensor.unbind(0)) if len(keys) > 1 else [(keys[0], tensor)]


def from_hf(names: list[str], num_experts: int, read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full moetron tensors for ``names``, reading HF tensors with ``read(key)`` (expert weights are stacked)."""
    out = {}
    for name in names:
        keys = hf_keys(name, num_experts)
        out[name] = torch.stack([read(k) for k in keys]) if len(keys) > 1 else read(keys[0])
    return out


# ---------------------------------------------------------------- config: moetron -> HF

def needs_custom_code(cfg: Config) -> bool:
    """MoNE, Matryoshka, per-layer k and the expert-bias router are not expressible as stock Qwen3-MoE."""
    moe = cfg.moe
    return moe.mone.enabled or moe.matryoshka.enabled or moe.expert_bias or len(set(inference_k(cfg))) > 1


def inference_k(cfg: Config) -> list[int]:
    """The k of every MoE layer at inference: the config's evaluation k (``MoEConfig.eval_k_per_layer``)."""
    return cfg.moe.eval_k_per_layer(len(cfg.model.moe_layer_indices))


def hf_config(cfg: Config, tokens: Mapping[str, int]) -> dict[str, Any]:
    """config.json for ``cfg`` (``tokens``: optional bos/eos/pad token ids). Only GQA with plain RoPE and no shared
    expert has an HF layout here: MLA (DeepseekV3), YaRN and shared experts are refused with one line."""
    m, moe = cfg.model, cfg.moe
    _require(m.attention == "gqa" and m.rope_scaling.type == "default",
             f"HF export supports model.attention=gqa with plain RoPE only (this model: model.attention="
             f"{m.attention}, model.rope_scaling.type={m.rope_scaling.type}); no DeepseekV3 export yet")
    _require(m.mtp_num_layers == 0, f"HF export has no layout for multi-token prediction modules (this model: "
             f"model.mtp_num_layers={m.mtp_num_layers}); no DeepseekV3 export yet")
    _require(moe.score_function == "softmax" and moe.num_groups == 1 and moe.routed_scaling_factor == 1.0,
             f"HF export supports softmax routing only (this model: moe.score_function={moe.score_function}, "
             f"moe.num_groups={moe.num_groups}, moe.routed_scaling_factor={moe.routed_scaling_factor}); no "
             "DeepseekV3 export yet")
    _require(moe.shared_expert_ffn_hidden_size == 0,
             f"HF export has no layout for shared experts yet (this model: moe.shared_expert_ffn_hidden_size="
             f"{moe.shared_expert_ffn_hidden_size}; Qwen3-MoE has none): export a model without them")
    ks = inference_k(cfg) or [moe.top_k]
    custom = needs_custom_code(cfg)
    out: dict[str, Any] = {
        "architectures": [CUSTOM_ARCH if custom else STOCK_ARCH],
        "model_type": CUSTOM_MODEL_TYPE if custom else STOCK_MODEL_TYPE,
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.num_query_groups,
        "head_dim": m.head_width,
        "intermediate_size": m.dense_ffn_hidden_size, "mlp_only_layers": sorted(set(m.dense_layers)),
        "decoder_sparse_step": 1, "max_position_embeddings": m.seq_length,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta}, "rms_norm_eps": m.norm_eps,
        "initializer_range": m.init_std, "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "use_sliding_window": False, "sliding_window": None, "tie_word_embeddings": False, "use_cache": True,
        "num_experts": moe.num_experts, "num_experts_per_tok": ks[0], "moe_intermediate_size":
            moe.expert_ffn_hidden_size, "norm_topk_prob": moe.renormalise_gates,
        "router_aux_loss_coef": moe.aux_loss_coeff,
        "output_router_logits": False, "dtype": "float32", **dict(tokens),
    }
    if custom:
        mm = moe.matryoshka
        out.update(auto_map=dict(AUTO_MAP),
                   moe_k_per_layer=ks if len(set(ks)) > 1 else None,
                   matryoshka_k_range=[mm.k_min, mm.k_max] if mm.enabled else None,
                   mone_enabled=moe.mone.enabled, mone_keep_ratio=moe.mone.keep_ratio, mone_score=moe.mone.score,
                   router_expert_bias=moe.expert_bias)
    return out


# ---------------------------------------------------------------- config: HF -> moetron

def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _hf_dense_layers(hf: Mapping[str, Any], num_layers: int, num_experts: int) -> list[int]:
    """Qwen3-MoE's rule: layer i is dense if listed in mlp_only_layers or not every decoder_sparse_step-th."""
    only = set(hf.get("mlp_only_layers") or [])
    step = int(hf.get("decoder_sparse_step", 1))
    return [i for i in range(num_layers) if i in only or not (num_experts > 0 and (i + 1) % step == 0)]


def _rope_theta(hf: Mapping[str, Any]) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    _require(kind == "default", f"HF config: rope type '{kind}' is not supported (moetron uses plain RoPE); "
                                "convert a model with rope_type 'default'")
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    _require(theta is not None, "HF config: no rope_theta in rope_parameters or at the top level")
    return float(theta)


def check_stock_hf(hf: Mapping[str, Any]) -> None:
    """Fail with a clear message unless ``hf`` is a Qwen3-MoE config moetron represents exactly."""
    _require(hf.get("model_type") == STOCK_MODEL_TYPE,
             f"HF config: model_type is {hf.get('model_type')!r}; from-hf converts '{STOCK_MODEL_TYPE}' models")
    _require(hf.get("hidden_act", "silu") == "silu", f"HF config: hidden_act {hf.get('hidden_act')!r} != 'silu'")
    _require(not hf.get("attention_bias", False), "HF config: attention_bias=true (moetron has no biases)")
    _require(not hf.get("use_sliding_window", False), "HF config: use_sliding_window=true is not supported")


def moetron_model_fields(hf: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The model/moe fields a stock Qwen3-MoE config fixes (sections ``model`` and ``moe``)."""
    check_stock_hf(hf)
    layers, heads = int(hf["num_hidden_layers"]), int(hf["num_attention_heads"])
    num_experts = int(hf.get("num_experts", hf.get("num_local_experts", 0)))
    _require(num_experts > 0, "HF config: num_experts is 0 (a dense model); from-hf converts MoE models")
    model = {"vocab_size": int(hf["vocab_size"]), "hidden_size": int(hf["hidden_size"]), "num_layers": layers,
             "num_attention_heads": heads, "num_query_groups": int(hf.get("num_key_value_heads", heads)),
             "head_dim": int(hf.get("head_dim") or hf["hidden_size"] // heads), "rope_theta": _rope_theta(hf),
             "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
             "dense_layers": _hf_dense_layers(hf, layers, num_experts),
             "dense_ffn_hidden_size": int(hf["intermediate_size"])}
    moe = {"num_experts": num_experts, "top_k": int(hf["num_experts_per_tok"]),
           "expert_ffn_hidden_size": int(hf["moe_intermediate_size"]),
           "norm_topk_prob": bool(hf.get("norm_topk_prob", False))}  # Qwen3MoeConfig's default is false
    if moe["norm_topk_prob"] and moe["top_k"] == 1:
        moe["top1_gate"] = "straight_through"  # a gate of 1.0, as Qwen3-MoE's renormalised single weight
    return {"model": model, "moe": moe}


def merge_hf_into_raw(raw: dict, hf: Mapping[str, Any]) -> dict:
    """Recipe dict + the HF model's architecture. A recipe value that contradicts the HF model is an error;
    training-time defaults (seq_length, init std, aux-loss coeff) come from HF only when the recipe is silent."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for section, fields in moetron_model_fields(hf).items():
        sec = raw.setdefault(section, {})
        for key, value in fields.items():
            _require(key not in sec or sec[key] == value,
                     f"recipe sets {section}.{key}={sec.get(key)!r} but the HF model has {value!r}; remove it "
                     "from the recipe (the architecture comes from the HF config)")
            sec[key] = value
    soft = {("model", "seq_length"): hf.get("max_position_embeddings"),
            ("model", "init_std"): hf.get("initializer_range"),
            ("moe", "aux_loss_coeff"): hf.get("router_aux_loss_coef")}
    for (section, key), value in soft.items():
        if value is not None:
            raw[section].setdefault(key, value)
    return raw
