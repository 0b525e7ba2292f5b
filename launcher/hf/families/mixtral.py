"""Mixtral (``model_type: mixtral``, transformers' ``MixtralForCausalLM``): GQA without q/k norm or bias, every
layer MoE with experts of ``intermediate_size`` (``moe.expert_ffn_hidden_size``), the softmax top-k router with
renormalised gates (``moe.norm_topk_prob: true`` always). ``router_jitter_noise`` (multiplicative noise on the router
input while training) is refused: moetron trains without it, and the model was trained with it.

    moetron (tp=pp=ep=1)                         Hugging Face
    layers.{i}.mlp.router.weight        [E, D]   model.layers.{i}.block_sparse_moe.gate.weight            (fp32)
    layers.{i}.mlp.experts.w_gate_EFD   [E,F,D]  model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight
    layers.{i}.mlp.experts.w_up_EFD     [E,F,D]  model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight
    layers.{i}.mlp.experts.w_down_EDF   [E,D,F]  model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight
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
            **gates_from_hf({"norm_topk_prob": True}, hf_value(hf, Key("num_experts_per_tok")), norm_default=True)}


def write(cfg: Config) -> dict[str, Any]:
    return {**gqa.write_gqa(cfg), "num_experts_per_tok": inference_k(cfg)[0], "output_router_logits": False}


FAMILY = Family(
    model_type="mixtral", architecture="MixtralForCausalLM",
    fields={**BASE_FIELDS, "moe.num_experts": Key("num_local_experts"),
            "moe.expert_ffn_hidden_size": Key("intermediate_size")},
    soft={**BASE_SOFT, "moe.aux_loss_coeff": Key("router_aux_loss_coef", float)},
    sets={"model.qk_norm": "none", "model.qkv_bias": False, "model.mtp_num_layers": 0},
    export_requires={**gqa.SOFTMAX_REQUIRES, "model.qk_norm": "none", "model.qkv_bias": False,
                     "model.partial_rotary_factor": 1.0, "moe.shared_expert_ffn_hidden_size": 0,
                     "moe.renormalise_gates": True},
    unsupported={"hidden_act": "silu", "router_jitter_noise": 0.0},
    renames=((r"\.mlp\.router\.", ".block_sparse_moe.gate."), (r"\.mlp\.experts$", ".block_sparse_moe.experts")),
    expert_names={"w_gate_EFD": "w1", "w_up_EFD": "w3", "w_down_EDF": "w2"},
    fp32_keys=(".block_sparse_moe.gate.weight",),
    read=read, write=write, check_export=lambda cfg: gqa.all_moe(cfg) + gqa.one_k(cfg), writes=gqa.no_expert_bias,
)
