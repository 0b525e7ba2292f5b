"""Dense Qwen3 (``model_type: qwen3``, transformers' ``Qwen3ForCausalLM``): moetron's GQA block with per-head q/k
norm and every layer dense (``model.dense_layers`` = all, ``model.dense_ffn_hidden_size = intermediate_size``): a
dense baseline, and what ``moetron convert upcycle`` reads. ``attention_bias`` (a bias on all four projections,
o_proj included) and sliding windows are refused. Names: moetron ``<name>`` is HF ``model.<name>``
(``lm_head.weight`` as is)."""
from __future__ import annotations

from typing import Any, Mapping

from launcher.config import Config
from launcher.hf.family import BASE_FIELDS, BASE_SOFT, Family, Key, hf_value
from launcher.hf.families import gqa

DENSE_SETS = {"model.qkv_bias": False, "model.mtp_num_layers": 0}


def read_dense(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The dense families' settings: GQA, every layer dense."""
    return {**gqa.read_gqa(hf), "model.dense_layers": list(range(hf_value(hf, Key("num_hidden_layers"))))}


def write(cfg: Config) -> dict[str, Any]:
    layers = cfg.model.num_layers
    return {**gqa.write_gqa(cfg), "use_sliding_window": False, "sliding_window": None, "max_window_layers": layers,
            "layer_types": ["full_attention"] * layers}


FAMILY = Family(
    model_type="qwen3", architecture="Qwen3ForCausalLM",
    fields={**BASE_FIELDS, "model.dense_ffn_hidden_size": Key("intermediate_size")},
    soft=BASE_SOFT,
    sets={**DENSE_SETS, "model.qk_norm": "head"},
    export_requires={**gqa.EXPORT_REQUIRES, "model.qk_norm": "head", "model.qkv_bias": False,
                     "model.partial_rotary_factor": 1.0},
    unsupported={"hidden_act": "silu", "attention_bias": False, "use_sliding_window": False},
    read=read_dense, write=write, check_export=gqa.all_dense,
)
