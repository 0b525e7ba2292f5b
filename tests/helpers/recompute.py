"""The recompute options the tests run (train.recompute / train.recompute_modules overrides), by name."""

SELECTIVE = "train.recompute=selective"
OPTIONS = {
    "full": ["train.recompute=full"],
    **{m: [SELECTIVE, f"train.recompute_modules=[{m}]"]
       for m in ("core_attn", "moe_act", "shared_experts", "norm", "mla_up_proj", "moe", "mlp")},
    "mla_up_proj+core_attn": [SELECTIVE, "train.recompute_modules=[mla_up_proj,core_attn]"],
    "selective": [SELECTIVE, "train.recompute_modules=[core_attn,moe_act,shared_experts,norm,mlp]"],
}
"""Every module alone, MLA's merged up-projection + core region, ``full``, and a selective set of all but ``moe``
(which excludes moe_act and shared_experts) and ``mla_up_proj`` (MLA only)."""

TINY_MOE = ["model.vocab_size=64", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
            "model.dense_layers=[0]", "model.dense_ffn_hidden_size=48", "moe.num_experts=4", "moe.top_k=2",
            "moe.expert_ffn_hidden_size=24", "moe.aux_loss_coeff=0.01", "moe.z_loss_coeff=0.001",
            "train.micro_batch_size=2", "data.source=synthetic"]
"""A small MoE model with one dense layer (so every module has something to cover)."""
