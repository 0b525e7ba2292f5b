"""GLM-4.5 (``model_type: glm4_moe``, transformers' ``Glm4MoeForCausalLM``): GQA with a q/k/v bias
(``attention_bias``, o_proj without: ``model.qkv_bias``), per-head q/k norm when ``use_qk_norm`` (``model.qk_norm:
head``, else ``none``) and RoPE on the first ``partial_rotary_factor`` of each head (``rope_parameters`` or the top
level; default 0.5); DeepSeek-V3's router: sigmoid scores, the aux-loss-free ``e_score_correction_bias``
(``moe.expert_bias``), group-limited routing (``n_group`` / ``topk_group``), ``routed_scaling_factor``; a shared
expert of ``n_shared_experts * moe_intermediate_size`` and the first ``first_k_dense_replace`` layers dense. Its
multi-token-prediction layers (``num_nextn_predict_layers``, at ``model.layers.{N + i}``) are skipped (one line).

    moetron (tp=pp=ep=1)                         Hugging Face
    layers.{i}.mlp.router.weight        [E, D]   model.layers.{i}.mlp.gate.weight                     (fp32)
    layers.{i}.mlp.router.expert_bias   [E]      model.layers.{i}.mlp.gate.e_score_correction_bias    (fp32)
    layers.{i}.mlp.experts.w_*          [E,..]   model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
    layers.{i}.mlp.shared_expert.*               model.layers.{i}.mlp.shared_experts.*
    everything else                              model.<same name>; lm_head.weight as is
"""
from __future__ import annotations

from typing import Any, Collection, Mapping

from launcher.config import Config
from launcher.hf.family import BASE_FIELDS, BASE_SOFT, Family, Key, gates_from_hf, hf_value, inference_k, require
from launcher.hf.families import gqa


def read(hf: Mapping[str, Any]) -> dict[str, Any]:
    layers = hf_value(hf, Key("num_hidden_layers"))
    dense = hf_value(hf, Key("first_k_dense_replace", int, 1))
    require(dense <= layers, f"HF config: first_k_dense_replace={dense} exceeds num_hidden_layers={layers}")
    shared = hf_value(hf, Key("n_shared_experts", int, 1))
    return {**gqa.read_gqa(hf, partial_rotary_default=0.5), "model.dense_layers": list(range(dense)),
            "model.qk_norm": "head" if hf_value(hf, Key("use_qk_norm", bool, False)) else "none",
            "moe.num_groups": hf_value(hf, Key("n_group", int, 1)) or 1,
            "moe.group_topk": hf_value(hf, Key("topk_group", int, 1)) or 1,
            "moe.shared_expert_ffn_hidden_size": shared * hf_value(hf, Key("moe_intermediate_size")),
            **gates_from_hf(hf, hf_value(hf, Key("num_experts_per_tok")), norm_default=True)}


def write(cfg: Config) -> dict[str, Any]:
    m, moe = cfg.model, cfg.moe
    return {**gqa.write_gqa(cfg, partial_in_rope=True), "use_qk_norm": m.qk_norm == "head",
            "first_k_dense_replace": len(m.dense_layers), "n_group": moe.num_groups, "topk_group": moe.group_topk,
            "n_shared_experts": moe.shared_expert_ffn_hidden_size // moe.expert_ffn_hidden_size,
            "num_experts_per_tok": inference_k(cfg)[0], "norm_topk_prob": moe.renormalise_gates,
            "num_nextn_predict_layers": 0}


def check_export(cfg: Config) -> list[str]:
    m, moe = cfg.model, cfg.moe
    out = gqa.one_k(cfg)
    if m.qk_norm == "projection":
        out.append("model.qk_norm='projection' (GLM-4.5 normalises per head or not at all)")
    if sorted(m.dense_layers) != list(range(len(m.dense_layers))):
        out.append(f"model.dense_layers={m.dense_layers} (GLM-4.5 has the first k layers dense only)")
    if moe.shared_expert_ffn_hidden_size % moe.expert_ffn_hidden_size:
        out.append(f"moe.shared_expert_ffn_hidden_size={moe.shared_expert_ffn_hidden_size} (needs a multiple of "
                   f"moe.expert_ffn_hidden_size={moe.expert_ffn_hidden_size}: n_shared_experts)")
    return out


def _mtp_layers(hf: Mapping[str, Any]) -> tuple[str, ...]:
    layers = hf_value(hf, Key("num_hidden_layers"))
    mtp = hf_value(hf, Key("num_nextn_predict_layers", int, 0))
    return tuple(f"model.layers.{layers + i}." for i in range(mtp))


def _skip_mtp(hf: Mapping[str, Any], keys: Collection[str]) -> tuple[Mapping[str, Any], str]:
    """The note naming the MTP tensors from-hf leaves unread (none in a transformers save, which drops them)."""
    prefixes = _mtp_layers(hf)
    skipped = sorted(k for k in keys if prefixes and k.startswith(prefixes))
    if not skipped:
        return hf, ""
    return hf, (f"skipped {len(skipped)} tensors under {sorted({p.rstrip('.') for p in prefixes})}: GLM-4.5's "
                "multi-token-prediction (MTP) layers are not mapped to moetron's model.mtp_num_layers modules; "
                "converted the main model")


FAMILY = Family(
    model_type="glm4_moe", architecture="Glm4MoeForCausalLM",
    fields={**BASE_FIELDS, "model.dense_ffn_hidden_size": Key("intermediate_size"),
            "model.qkv_bias": Key("attention_bias", bool, False),
            "moe.num_experts": Key("n_routed_experts"), "moe.expert_ffn_hidden_size": Key("moe_intermediate_size"),
            "moe.routed_scaling_factor": Key("routed_scaling_factor", float, 1.0)},
    soft=BASE_SOFT,
    sets={"moe.score_function": "sigmoid", "moe.expert_bias": True, "model.mtp_num_layers": 0},
    export_requires={**gqa.EXPORT_REQUIRES, "moe.score_function": "sigmoid", "moe.expert_bias": True,
                     "moe.shared_expert_gate": False},
    unsupported={"hidden_act": "silu"},
    renames=((r"\.mlp\.router\.expert_bias$", ".mlp.gate.e_score_correction_bias"), (r"\.mlp\.router\.", ".mlp.gate."),
             (r"\.mlp\.shared_expert\.", ".mlp.shared_experts.")),
    fp32_keys=(".mlp.gate.weight", ".mlp.gate.e_score_correction_bias"),
    read=read, write=write, check_export=check_export, match_weights=_skip_mtp, ignored=_mtp_layers,
)
