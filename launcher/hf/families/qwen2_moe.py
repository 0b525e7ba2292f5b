"""Qwen2-MoE (``model_type: qwen2_moe``, transformers' ``Qwen2MoeForCausalLM``): GQA with a q/k/v bias
(``qkv_bias``, ``model.qkv_bias``) and no q/k norm, the softmax top-k router (``norm_topk_prob``, default false),
and a shared expert of ``shared_expert_intermediate_size`` scaled by a sigmoid gate (``moe.shared_expert_gate``).
Dense layers as Qwen3-MoE (``mlp_only_layers`` / ``decoder_sparse_step``).

    moetron (tp=pp=ep=1)                         Hugging Face
    layers.{i}.mlp.router.weight        [E, D]   model.layers.{i}.mlp.gate.weight                (fp32)
    layers.{i}.mlp.experts.w_*          [E,..]   model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
    layers.{i}.mlp.shared_expert.*               model.layers.{i}.mlp.shared_expert.*
    layers.{i}.mlp.shared_expert_gate.weight [1, D]  model.layers.{i}.mlp.shared_expert_gate.weight
    everything else                              model.<same name>; lm_head.weight as is
"""
from __future__ import annotations

from typing import Any, Mapping

from launcher.config import Config
from launcher.hf.family import BASE_FIELDS, BASE_SOFT, Family, Key, gates_from_hf, hf_value, inference_k, require
from launcher.hf.families import gqa
from launcher.hf.families.qwen3_moe import dense_layers_from_hf


def read(hf: Mapping[str, Any]) -> dict[str, Any]:
    require(hf_value(hf, Key("num_experts")) > 0, "HF config: num_experts is 0 (a dense model); from-hf converts "
                                                  "MoE models")
    require(hf_value(hf, Key("shared_expert_intermediate_size")) > 0,
            "HF config: shared_expert_intermediate_size is 0; Qwen2-MoE's shared expert gate needs a shared expert")
    return {**gqa.read_gqa(hf), "model.dense_layers": dense_layers_from_hf(hf, hf_value(hf, Key("num_hidden_layers"))),
            **gates_from_hf(hf, hf_value(hf, Key("num_experts_per_tok")), norm_default=False)}


def write(cfg: Config) -> dict[str, Any]:
    return {**gqa.write_gqa(cfg), "mlp_only_layers": sorted(set(cfg.model.dense_layers)), "decoder_sparse_step": 1,
            "num_experts_per_tok": inference_k(cfg)[0], "norm_topk_prob": cfg.moe.renormalise_gates,
            "output_router_logits": False}


def check_export(cfg: Config) -> list[str]:
    none = ["moe.shared_expert_ffn_hidden_size=0 (Qwen2-MoE has a gated shared expert)"]
    return gqa.one_k(cfg) + (none if not cfg.moe.shared_expert_ffn_hidden_size else [])


FAMILY = Family(
    model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM",
    fields={**BASE_FIELDS, "model.dense_ffn_hidden_size": Key("intermediate_size"),
            "model.qkv_bias": Key("qkv_bias", bool, True),
            "moe.num_experts": Key("num_experts"), "moe.expert_ffn_hidden_size": Key("moe_intermediate_size"),
            "moe.shared_expert_ffn_hidden_size": Key("shared_expert_intermediate_size")},
    soft={**BASE_SOFT, "moe.aux_loss_coeff": Key("router_aux_loss_coef", float)},
    sets={"model.qk_norm": "none", "moe.shared_expert_gate": True, "model.mtp_num_layers": 0},
    export_requires={**gqa.SOFTMAX_REQUIRES, "model.qk_norm": "none", "model.partial_rotary_factor": 1.0,
                     "moe.shared_expert_gate": True},
    unsupported={"hidden_act": "silu", "use_sliding_window": False},
    renames=((r"\.mlp\.router\.", ".mlp.gate."),),
    fp32_keys=(".mlp.gate.weight",),
    read=read, write=write, check_export=check_export, writes=gqa.no_expert_bias,
)
