"""What the GQA families (Qwen2-MoE, Mixtral, OLMoE, GLM-4.5, Qwen3, Llama) share: key/value heads and head width,
RoPE (default only: moetron's GQA YaRN is not checked against these families' transformers code), partial RoPE,
the sliding-window options moetron refuses, and the export requirements of a stock GQA model."""
from __future__ import annotations

from typing import Any, Mapping

from launcher.config import Config
from launcher.hf.family import Key, hf_value, inference_k, require, rope_from_hf, rope_to_hf

EXPORT_REQUIRES = {"model.attention": "gqa", "model.rope_scaling.type": "default", "model.mtp_num_layers": 0,
                   "moe.mone.enabled": False, "moe.matryoshka.enabled": False}
"""Every stock GQA family: no MLA, plain RoPE, no MTP, no MoNE / Matryoshka (those are the moetron flavour)."""
SOFTMAX_REQUIRES = {**EXPORT_REQUIRES, "moe.score_function": "softmax", "moe.num_groups": 1,
                    "moe.routed_scaling_factor": 1.0, "moe.expert_bias": False}
"""The softmax top-k families (Qwen2-MoE, Mixtral, OLMoE)."""


def no_expert_bias(name: str, cfg: Config) -> bool:
    """Family.writes of the softmax families: moetron's (unused) router expert bias has no HF counterpart."""
    return not name.endswith(".expert_bias")


def read_gqa(hf: Mapping[str, Any], partial_rotary_default: float = 1.0) -> dict[str, Any]:
    """Heads, head width, RoPE and partial RoPE of ``hf``; ConfigError for a sliding window."""
    heads, hidden = hf_value(hf, Key("num_attention_heads")), hf_value(hf, Key("hidden_size"))
    sliding = []
    if hf.get("use_sliding_window"):
        sliding.append("use_sliding_window=true")
    elif "use_sliding_window" not in hf and hf.get("sliding_window"):  # Mixtral: a window unless null
        sliding.append(f"sliding_window={hf['sliding_window']!r}")
    types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in types):
        sliding.append(f"layer_types={sorted(set(map(str, types)))}")
    require(not sliding, f"HF config: {hf.get('model_type')} uses sliding-window attention ({', '.join(sliding)}); "
                         "moetron attends to the whole sequence: convert a model without a sliding window")
    rope = dict(hf.get("rope_parameters") or {})
    partial = rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", partial_rotary_default))
    partial = hf_value({"partial_rotary_factor": partial}, Key("partial_rotary_factor", float))
    return {"model.num_query_groups": hf_value(hf, Key("num_key_value_heads", int, heads)),
            "model.head_dim": hf_value(hf, Key("head_dim", int, None, nullable=True)) or hidden // max(heads, 1),
            "model.partial_rotary_factor": partial,
            **rope_from_hf({**hf, "rope_parameters": rope} if rope else hf, yarn=False)}


def write_gqa(cfg: Config, partial_in_rope: bool = False) -> dict[str, Any]:
    """config.json's heads, head width and ``rope_parameters`` (with ``partial_rotary_factor`` when
    ``partial_in_rope``)."""
    m = cfg.model
    rope = rope_to_hf(cfg)
    if partial_in_rope:
        rope["rope_parameters"]["partial_rotary_factor"] = m.partial_rotary_factor
    return {"num_key_value_heads": m.num_query_groups, "head_dim": m.head_width, **rope, "use_cache": True,
            "attention_dropout": 0.0}


def one_k(cfg: Config) -> list[str]:
    """A stock family has one ``num_experts_per_tok``."""
    ks = inference_k(cfg)
    return [f"per-layer k {ks} (one num_experts_per_tok)"] if len(set(ks)) > 1 else []


def all_moe(cfg: Config) -> list[str]:
    """Mixtral and OLMoE have no dense layers."""
    return [f"model.dense_layers={cfg.model.dense_layers} (every layer is MoE)"] if cfg.model.dense_layers else []


def all_dense(cfg: Config) -> list[str]:
    """Qwen3 and Llama are dense."""
    layers = cfg.model.num_layers
    if sorted(set(cfg.model.dense_layers)) != list(range(layers)):
        return [f"model.dense_layers={cfg.model.dense_layers} (a dense model has all {layers} layers dense)"]
    return []
