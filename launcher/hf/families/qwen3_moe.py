"""Qwen3-MoE (``model_type: qwen3_moe``, transformers' ``Qwen3MoeForCausalLM``): moetron's GQA block with q/k
norms, softmax top-k router, SwiGLU experts. MoNE, Matryoshka / per-layer k and the aux-loss-free expert bias are
written as the ``moetron`` flavour (a subclass of the Qwen3-MoE classes shipped in the directory, ``auto_map``;
docs/convert.md). from-hf reads stock ``qwen3_moe`` only.

Gates: ``norm_topk_prob`` is ``MoEConfig.renormalise_gates`` both ways: a top-1 model trained with ``moe.top1_gate:
probability`` (Switch) and a Matryoshka model (raw probabilities by default) are written with ``norm_topk_prob:
false``; a stock top-1 model with ``norm_topk_prob: true`` reads as ``moe.top1_gate: straight_through`` (the same
gate value, 1.0). Dense layers: ``mlp_only_layers`` / ``decoder_sparse_step`` are ``model.dense_layers`` with
``intermediate_size = model.dense_ffn_hidden_size``.

    moetron (tp=pp=ep=1)                         Hugging Face
    layers.{i}.mlp.router.weight        [E, D]   model.layers.{i}.mlp.gate.weight
    layers.{i}.mlp.router.expert_bias   [E]      model.layers.{i}.mlp.gate.expert_bias   (moetron flavour only)
    layers.{i}.mlp.experts.w_*          [E,..]   model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
    everything else                              model.<same name>; lm_head.weight as is
"""
from __future__ import annotations

from typing import Any, Mapping

from launcher.config import Config
from launcher.hf.family import (BASE_FIELDS, BASE_SOFT, Family, Key, gates_from_hf, hf_value, inference_k,
                                require, rope_from_hf, rope_to_hf)

CUSTOM_MODEL_TYPE, CUSTOM_ARCH = "moetron", "MoetronForCausalLM"
AUTO_MAP = {"AutoConfig": "configuration_moetron.MoetronConfig",
            "AutoModelForCausalLM": "modeling_moetron.MoetronForCausalLM"}


EXPERTS = Key("num_experts", alias="num_local_experts")


def needs_custom_code(cfg: Config) -> bool:
    """MoNE, Matryoshka, per-layer k and the expert-bias router are not expressible as stock Qwen3-MoE."""
    moe = cfg.moe
    return moe.mone.enabled or moe.matryoshka.enabled or moe.expert_bias or len(set(inference_k(cfg))) > 1


def dense_layers_from_hf(hf: Mapping[str, Any], num_layers: int) -> list[int]:
    """Qwen3-MoE's rule: layer i is dense if listed in mlp_only_layers or not every decoder_sparse_step-th."""
    only = hf.get("mlp_only_layers") or []
    require(isinstance(only, list) and all(type(i) is int for i in only),
            f"HF config: mlp_only_layers is {only!r}; it must be a list of layer indices")
    step = hf_value(hf, Key("decoder_sparse_step", int, 1))
    require(step > 0, "HF config: decoder_sparse_step is 0; it must be >= 1")
    return [i for i in range(num_layers) if i in set(only) or (i + 1) % step]


def read(hf: Mapping[str, Any]) -> dict[str, Any]:
    heads = hf_value(hf, Key("num_attention_heads"))
    require(hf_value(hf, EXPERTS) > 0, "HF config: num_experts is 0 (a dense model); from-hf converts "
                                                  "MoE models")
    return {"model.num_query_groups": hf_value(hf, Key("num_key_value_heads", int, heads)),
            "model.head_dim": hf_value(hf, Key("head_dim", int, hf_value(hf, Key("hidden_size")) // max(heads, 1))),
            "model.dense_layers": dense_layers_from_hf(hf, hf_value(hf, Key("num_hidden_layers"))),
            **rope_from_hf(hf, yarn=False),
            **gates_from_hf(hf, hf_value(hf, Key("num_experts_per_tok")), norm_default=False)}


def write(cfg: Config) -> dict[str, Any]:
    m, moe = cfg.model, cfg.moe
    ks = inference_k(cfg)
    out: dict[str, Any] = {
        "num_key_value_heads": m.num_query_groups, "head_dim": m.head_width,
        "mlp_only_layers": sorted(set(m.dense_layers)), "decoder_sparse_step": 1, **rope_to_hf(cfg),
        "num_experts_per_tok": ks[0], "norm_topk_prob": moe.renormalise_gates, "sliding_window": None,
        "use_cache": True, "output_router_logits": False, "attention_dropout": 0.0}
    if needs_custom_code(cfg):
        mm = moe.matryoshka
        out.update(architectures=[CUSTOM_ARCH], model_type=CUSTOM_MODEL_TYPE, auto_map=dict(AUTO_MAP),
                   moe_k_per_layer=ks if len(set(ks)) > 1 else None,
                   matryoshka_k_range=[mm.k_min, mm.k_max] if mm.enabled else None,
                   mone_enabled=moe.mone.enabled, mone_keep_ratio=moe.mone.keep_ratio, mone_score=moe.mone.score,
                   router_expert_bias=moe.expert_bias)
    return out


FAMILY = Family(
    model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM",
    fields={**BASE_FIELDS, "model.dense_ffn_hidden_size": Key("intermediate_size"),
            "moe.num_experts": EXPERTS, "moe.expert_ffn_hidden_size": Key("moe_intermediate_size")},
    soft={**BASE_SOFT, "moe.aux_loss_coeff": Key("router_aux_loss_coef", float)},
    sets={"model.mtp_num_layers": 0},
    export_requires={"model.attention": "gqa", "model.rope_scaling.type": "default", "moe.score_function": "softmax",
                     "moe.num_groups": 1, "moe.routed_scaling_factor": 1.0, "moe.shared_expert_ffn_hidden_size": 0,
                     "model.mtp_num_layers": 0, "model.qk_norm": "head", "model.qkv_bias": False,
                     "model.partial_rotary_factor": 1.0},
    unsupported={"hidden_act": "silu", "attention_bias": False, "use_sliding_window": False},
    renames=((r"\.mlp\.router\.", ".mlp.gate."),),
    fp32_keys=(".mlp.gate.weight", ".mlp.gate.expert_bias"),
    read=read, write=write,
    check_export=lambda cfg: [] if cfg.model.moe_layer_indices else ["model.dense_layers=every layer (no MoE layer: "
                                                                     "a dense model is qwen3 or llama)"],
    writes=lambda name, cfg: not name.endswith(".expert_bias") or cfg.moe.expert_bias,
    custom_code=needs_custom_code,
)
