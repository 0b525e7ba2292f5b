"""OLMoE (``model_type: olmoe``, transformers' ``OlmoeForCausalLM``): GQA with q/k RMSNorm over the whole q and k
projections (``model.qk_norm: projection``), every layer MoE with experts of ``intermediate_size``, the softmax
top-k router (``norm_topk_prob``, default false). ``clip_qkv`` (clamping q/k/v) and ``attention_bias`` (a bias on
all four projections, o_proj included) are refused.

    moetron (tp=pp=ep=1)                         Hugging Face
    layers.{i}.self_attn.{q,k}_norm.weight [H*hd]  model.layers.{i}.self_attn.{q,k}_norm.weight
    layers.{i}.mlp.router.weight        [E, D]   model.layers.{i}.mlp.gate.weight                (fp32)
    layers.{i}.mlp.experts.w_*          [E,..]   model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
    everything else                              model.<same name>; lm_head.weight as is
"""
from __future__ import annotations

from typing import Any, Mapping

from launcher.config import Config
from launcher.hf.family import BASE_FIELDS, BASE_SOFT, Family, Key, gates_from_hf, hf_value, inference_k
from launcher.hf.families import gqa


def read(hf: Mapping[str, Any]) -> dict[str, Any]:
    return {**gqa.read_gqa(hf), "model.dense_layers": [],
            "model.dense_ffn_hidden_size": hf_value(hf, Key("intermediate_size")),
            **gates_from_hf(hf, hf_value(hf, Key("num_experts_per_tok")), norm_default=False)}


def write(cfg: Config) -> dict[str, Any]:
    return {**gqa.write_gqa(cfg), "num_experts_per_tok": inference_k(cfg)[0],
            "norm_topk_prob": cfg.moe.renormalise_gates, "output_router_logits": False}


FAMILY = Family(
    model_type="olmoe", architecture="OlmoeForCausalLM",
    fields={**BASE_FIELDS, "moe.num_experts": Key("num_experts"),
            "moe.expert_ffn_hidden_size": Key("intermediate_size")},
    soft={**BASE_SOFT, "moe.aux_loss_coeff": Key("router_aux_loss_coef", float)},
    sets={"model.qk_norm": "projection", "model.qkv_bias": False, "model.mtp_num_layers": 0},
    export_requires={**gqa.SOFTMAX_REQUIRES, "model.qk_norm": "projection", "model.qkv_bias": False,
                     "model.partial_rotary_factor": 1.0, "moe.shared_expert_ffn_hidden_size": 0},
    unsupported={"hidden_act": "silu", "attention_bias": False, "clip_qkv": None},
    renames=((r"\.mlp\.router\.", ".mlp.gate."),),
    fp32_keys=(".mlp.gate.weight",),
    read=read, write=write, check_export=lambda cfg: gqa.all_moe(cfg) + gqa.one_k(cfg), writes=gqa.no_expert_bias,
)
