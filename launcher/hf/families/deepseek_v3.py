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

Multi-token prediction: ``num_nextn_predict_layers`` is ``model.mtp_num_layers`` (``model.mtp_loss_coeff`` is
not in config.json: the recipe's or the default). Official checkpoints keep MTP module i at HF layer N + i
(N = ``num_hidden_layers``), with copies of the embedding and the head that moetron shares with the main model:

    mtp.{i}.enorm / hnorm / eh_proj                model.layers.{N+i}.enorm / hnorm / eh_proj
    mtp.{i}.block.<block name>                     model.layers.{N+i}.<HF name, as for a main layer>
    mtp.{i}.norm.weight                            model.layers.{N+i}.shared_head.norm.weight
    (embed_tokens.weight, a copy)                  model.layers.{N+i}.embed_tokens.weight
    (lm_head.weight, a copy)                       model.layers.{N+i}.shared_head.head.weight

to-hf writes the copies; from-hf refuses (one line) a checkpoint whose copies are not bit-equal to the main
embedding and head. transformers' ``DeepseekV3ForCausalLM`` builds N layers and leaves layers >= N unused
(its ``MtpModel`` reads them for MTP drafting), and its ``save_pretrained`` drops them while the config keeps
``num_nextn_predict_layers`` (default 1): a directory with no ``model.layers.{N}.*`` tensors converts with
``model.mtp_num_layers: 0``, said in one line. Official FP8 checkpoints (``weight_scale_inv`` tensors) must be
dequantized to bf16 first.

Deepseek-V2 (``deepseek_v2``) is not served by this file: its router is softmax (no bias) and its group-limited
greedy routing scores a group by its best expert, not the sum of its top two.
"""
from __future__ import annotations

import re
from typing import Any, Collection, Mapping

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
            "use_cache": True, "attention_dropout": 0.0, "pretraining_tp": 1}


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


MTP_LAYERS = Key("num_nextn_predict_layers", int, 0)
_MTP_NAME = re.compile(r"mtp\.(\d+)\.(block\.|norm\.)?")
_MTP_COPIES = {"embed_tokens.weight": "embed_tokens.weight", "lm_head.weight": "shared_head.head.weight"}


def mtp_layer_name(name: str, cfg: Config) -> str:
    """``mtp.{i}.*`` -> ``layers.{N + i}.*`` (module docstring); other names unchanged."""
    match = _MTP_NAME.match(name)
    if match is None:
        return name
    part = "shared_head.norm." if match[2] == "norm." else ""
    return f"layers.{cfg.model.num_layers + int(match[1])}.{part}{name[match.end():]}"


def mtp_copies(name: str, cfg: Config) -> tuple[str, ...]:
    """Every MTP layer's copy of the embedding or the head."""
    leaf = _MTP_COPIES.get(name)
    m = cfg.model
    return tuple(f"model.layers.{m.num_layers + i}.{leaf}" for i in range(m.mtp_num_layers)) if leaf else ()


def without_absent_mtp(hf: Mapping[str, Any], keys: Collection[str]) -> tuple[Mapping[str, Any], str]:
    """MTP off when config.json declares MTP layers but the weights hold no ``model.layers.{N}.*`` tensor."""
    layers, mtp = hf_value(hf, Key("num_hidden_layers")), hf_value(hf, MTP_LAYERS)
    if not mtp or any(key.startswith(f"model.layers.{layers}.") for key in keys):
        return hf, ""
    return dict(hf, **{MTP_LAYERS.name: 0}), (
        f"config.json says num_nextn_predict_layers={mtp} but the weights hold no MTP layer (model.layers.{layers}.*; "
        "transformers' save_pretrained drops them): converted without MTP (model.mtp_num_layers: 0)")


FAMILY = Family(
    model_type="deepseek_v3", architecture="DeepseekV3ForCausalLM",
    fields={**BASE_FIELDS, "model.dense_ffn_hidden_size": Key("intermediate_size"),
            "model.q_lora_rank": Key("q_lora_rank", int, 1536, nullable=True),
            "model.kv_lora_rank": Key("kv_lora_rank"),
            "model.qk_nope_head_dim": Key("qk_nope_head_dim"), "model.qk_rope_head_dim": Key("qk_rope_head_dim"),
            "model.v_head_dim": Key("v_head_dim"), "model.rope_interleave": Key("rope_interleave", bool, True),
            "moe.num_experts": Key("n_routed_experts"), "moe.expert_ffn_hidden_size": Key("moe_intermediate_size"),
            "moe.routed_scaling_factor": Key("routed_scaling_factor", float, 2.5),
            "model.mtp_num_layers": MTP_LAYERS},
    soft=BASE_SOFT,
    sets={"model.attention": "mla", "moe.score_function": "sigmoid", "moe.expert_bias": True},
    export_requires={"model.attention": "mla", "moe.score_function": "sigmoid", "moe.shared_expert_gate": False,
                     "moe.mone.enabled": False, "moe.matryoshka.enabled": False},
    unsupported={"hidden_act": "silu", "attention_bias": False, "scoring_func": "sigmoid",
                 "topk_method": "noaux_tc", "moe_layer_freq": 1},
    renames=((r"\.mlp\.router\.expert_bias$", ".mlp.gate.e_score_correction_bias"), (r"\.mlp\.router\.", ".mlp.gate."),
             (r"\.mlp\.shared_expert\.", ".mlp.shared_experts.")),
    fp32_keys=(".mlp.gate.weight", ".mlp.gate.e_score_correction_bias"),
    read=read, write=write, check_export=check_export,
    layer_name=mtp_layer_name, copies=mtp_copies, match_weights=without_absent_mtp,
)
