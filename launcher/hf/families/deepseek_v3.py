"""DeepSeek-V3 (``model_type: deepseek_v3``, transformers' ``DeepseekV3ForCausalLM``, stock both ways): MLA
attention (``model.attention: mla``, with YaRN), sigmoid scores with the aux-loss-free bias (``moe.expert_bias``,
HF ``e_score_correction_bias``; used for selection only), group-limited routing (``n_group`` / ``topk_group`` ->
``moe.num_groups`` / ``moe.group_topk``), ``routed_scaling_factor``, a shared expert of width
``n_shared_experts * moe_intermediate_size`` and the first ``first_k_dense_replace`` layers dense.

    moetron (tp=pp=ep=1)                           Hugging Face
    layers.{i}.self_attn.{q_a_proj,q_a_layernorm,q_b_proj | q_proj, kv_a_proj_with_mqa,kv_a_layernorm,kv_b_proj,
                          o_proj}                  model.<same name>
    layers.{i}.mlp.router.weight          [E, D]   model.layers.{i}.mlp.gate.weight                     (fp32)
    layers.{i}.mlp.router.expert_bias     [E]      model.layers.{i}.mlp.gate.e_score_correction_bias    (fp32)
    layers.{i}.mlp.experts.w_*            [E,..]   model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
    layers.{i}.mlp.shared_expert.*                 model.layers.{i}.mlp.shared_experts.*

MTP (official checkpoints, ``num_nextn_predict_layers`` > 0): module i lives at ``model.layers.{N + i}`` (N =
``num_hidden_layers``): ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``, the block's own names, plus copies
of the embedding (``embed_tokens``) and head (``shared_head.head``). moetron's ``mtp.{i}.{enorm, hnorm, eh_proj,
block.*, norm}`` (``model.mtp_num_layers``) are not mapped yet (a rename needing N + i, plus the two copies):
from-hf skips those layers (one line says so) and converts with ``model.mtp_num_layers: 0``; to-hf refuses MTP
models. Official FP8 checkpoints (``weight_scale_inv`` tensors) must be dequantized to bf16 first.

Deepseek-V2 (``deepseek_v2``) is not served by this file: its router is softmax (no bias) and its group-limited
greedy routing scores a group by its best expert, not the sum of its top two.
"""
from __future__ import annotations

from typing import Any, Mapping

from launcher.config import Config
from launcher.hf.family import (BASE_FIELDS, BASE_SOFT, Family, Key, gates_from_hf, hf_value, inference_k,
                                require, rope_from_hf, rope_to_hf)


def read(hf: Mapping[str, Any]) -> dict[str, Any]:
    heads, layers = hf_value(hf, Key("num_attention_heads")), hf_value(hf, Key("num_hidden_layers"))
    kv_heads = hf_value(hf, Key("num_key_value_heads", int, heads, nullable=True))
    require(kv_heads in (None, heads), f"HF config: num_key_value_heads={kv_heads} != num_attention_heads={heads} "
                                       "(MLA has one key/value per head)")
    dense = hf_value(hf, Key("first_k_dense_replace", int, 3, nullable=True)) or 0
    require(dense <= layers, f"HF config: first_k_dense_replace={dense} exceeds num_hidden_layers={layers}")
    groups = hf_value(hf, Key("n_group", int, 8, nullable=True)) or 1
    shared = hf_value(hf, Key("n_shared_experts", int, 1, nullable=True)) or 0
    return {"model.dense_layers": list(range(dense)), **rope_from_hf(hf, yarn=True),
            "moe.num_groups": groups, "moe.group_topk": hf_value(hf, Key("topk_group", int, 4, nullable=True)) or 1,
            "moe.shared_expert_ffn_hidden_size": shared * hf_value(hf, Key("moe_intermediate_size")),
            **gates_from_hf(hf, hf_value(hf, Key("num_experts_per_tok")), norm_default=True)}


def write(cfg: Config) -> dict[str, Any]:
    m, moe = cfg.model, cfg.moe
    return {"num_key_value_heads": m.num_attention_heads, "first_k_dense_replace": len(m.dense_layers),
            **rope_to_hf(cfg), "n_group": moe.num_groups, "topk_group": moe.group_topk,
            "n_shared_experts": moe.shared_expert_ffn_hidden_size // moe.expert_ffn_hidden_size,
            "num_experts_per_tok": inference_k(cfg)[0], "norm_topk_prob": moe.renormalise_gates,
            "num_nextn_predict_layers": 0, "use_cache": True, "attention_dropout": 0.0, "pretraining_tp": 1}


def check_export(cfg: Config) -> list[str]:
    m, moe = cfg.model, cfg.moe
    out = []
    if sorted(m.dense_layers) != list(range(len(m.dense_layers))):
        out.append(f"model.dense_layers={m.dense_layers} (DeepSeek-V3 has the first k layers dense only)")
    if moe.shared_expert_ffn_hidden_size % moe.expert_ffn_hidden_size:
        out.append(f"moe.shared_expert_ffn_hidden_size={moe.shared_expert_ffn_hidden_size} (needs a multiple of "
                   f"moe.expert_ffn_hidden_size={moe.expert_ffn_hidden_size}: n_shared_experts)")
    if len(set(inference_k(cfg))) > 1:
        out.append(f"per-layer k {inference_k(cfg)} (DeepSeek-V3 has one num_experts_per_tok)")
    return out


def _mtp_layers(hf: Mapping[str, Any]) -> tuple[str, ...]:
    layers = hf_value(hf, Key("num_hidden_layers"))
    mtp = hf_value(hf, Key("num_nextn_predict_layers", int, 0, nullable=True)) or 0
    return tuple(f"model.layers.{layers + i}." for i in range(mtp))


FAMILY = Family(
    model_type="deepseek_v3", architecture="DeepseekV3ForCausalLM",
    fields={**BASE_FIELDS, "model.dense_ffn_hidden_size": Key("intermediate_size"),
            "model.q_lora_rank": Key("q_lora_rank", int, 1536, nullable=True),
            "model.kv_lora_rank": Key("kv_lora_rank"),
            "model.qk_nope_head_dim": Key("qk_nope_head_dim"), "model.qk_rope_head_dim": Key("qk_rope_head_dim"),
            "model.v_head_dim": Key("v_head_dim"), "model.rope_interleave": Key("rope_interleave", bool, True),
            "moe.num_experts": Key("n_routed_experts"), "moe.expert_ffn_hidden_size": Key("moe_intermediate_size"),
            "moe.routed_scaling_factor": Key("routed_scaling_factor", float, 2.5)},
    soft=BASE_SOFT,
    sets={"model.attention": "mla", "moe.score_function": "sigmoid", "moe.expert_bias": True,
          "model.mtp_num_layers": 0},
    export_requires={"model.attention": "mla", "moe.score_function": "sigmoid", "moe.shared_expert_gate": False,
                     "moe.mone.enabled": False, "moe.matryoshka.enabled": False, "model.mtp_num_layers": 0},
    unsupported={"hidden_act": "silu", "attention_bias": False, "scoring_func": "sigmoid",
                 "topk_method": "noaux_tc", "moe_layer_freq": 1},
    renames=((r"\.mlp\.router\.expert_bias$", ".mlp.gate.e_score_correction_bias"), (r"\.mlp\.router\.", ".mlp.gate."),
             (r"\.mlp\.shared_expert\.", ".mlp.shared_experts.")),
    fp32_keys=(".mlp.gate.weight", ".mlp.gate.e_score_correction_bias"),
    read=read, write=write, check_export=check_export, skip_prefixes=_mtp_layers,
    skip_reason="the multi-token-prediction (MTP) layers: their mapping to moetron's model.mtp_num_layers modules is "
                "not written yet; converted the main model",
)
