"""Dense Llama (``model_type: llama``, transformers' ``LlamaForCausalLM``): GQA without q/k norm
(``model.qk_norm: none``) and every layer dense, as dense Qwen3 (qwen3.py). Refused: ``attention_bias`` (all four
projections), ``mlp_bias``, and Llama 3's ``llama3`` RoPE scaling (only default RoPE is represented). Names:
moetron ``<name>`` is HF ``model.<name>`` (``lm_head.weight`` as is)."""
from __future__ import annotations

from typing import Any

from launcher.config import Config
from launcher.hf.family import BASE_FIELDS, BASE_SOFT, Family, Key
from launcher.hf.families import gqa
from launcher.hf.families.qwen3 import DENSE_SETS, read_dense


def write(cfg: Config) -> dict[str, Any]:
    return {**gqa.write_gqa(cfg), "pretraining_tp": 1}


FAMILY = Family(
    model_type="llama", architecture="LlamaForCausalLM",
    fields={**BASE_FIELDS, "model.dense_ffn_hidden_size": Key("intermediate_size")},
    soft=BASE_SOFT,
    sets={**DENSE_SETS, "model.qk_norm": "none"},
    export_requires={**gqa.EXPORT_REQUIRES, "model.qk_norm": "none", "model.qkv_bias": False,
                     "model.partial_rotary_factor": 1.0},
    unsupported={"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
    read=read_dense, write=write, check_export=gqa.all_dense,
)
