"""Hugging Face config of a moetron MoNE / Matryoshka-MoE / expert-bias model (shipped inside exported model
directories and loaded with ``trust_remote_code=True``; imports only transformers).

Everything of Qwen3-MoE applies (``norm_topk_prob`` included: renormalised gates at every k, 1.0 at k = 1). The
extra fields:

- ``num_experts_per_tok``: k of every MoE layer unless ``moe_k_per_layer`` is set (elastic k: pass
  ``num_experts_per_tok=2`` to ``from_pretrained``, or call ``model.set_moe_k(k)``).
- ``moe_k_per_layer``: optional list, one k per MoE layer (in layer order, dense layers skipped).
- ``matryoshka_k_range``: ``[k_min, k_max]`` the model was trained over (Matryoshka MoE), for information.
- ``mone_enabled`` / ``mone_keep_ratio`` / ``mone_score``: MoNE neuron selection inside each routed expert: keep
  ``keep_ratio * moe_intermediate_size`` neurons per token (the ratio read as the decimal it prints as, rounded
  half up, at least 1) ranked by ``|silu(gate)|`` (``post_act``) or ``|gate|`` (``pre_act``); the selection rule
  (fp32 score, NaN lowest, ties to the lower index) is in modeling_moetron.py.
- ``router_expert_bias``: a per-expert bias (``mlp.gate.expert_bias``) added to the router probabilities for
  expert selection only (aux-loss-free balancing).
"""
from huggingface_hub.dataclasses import strict
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig


@strict
class MoetronConfig(Qwen3MoeConfig):
    model_type = "moetron"

    norm_topk_prob: bool = True
    moe_k_per_layer: list[int] | None = None
    matryoshka_k_range: list[int] | None = None
    mone_enabled: bool = False
    mone_keep_ratio: float = 0.5
    mone_score: str = "post_act"
    router_expert_bias: bool = False

    def validate_architecture(self):
        super().validate_architecture()
        if self.mone_score not in ("post_act", "pre_act"):
            raise ValueError(f"mone_score must be 'post_act' or 'pre_act', got {self.mone_score!r}")
        if not 0.0 < self.mone_keep_ratio <= 1.0:
            raise ValueError(f"mone_keep_ratio must be in (0, 1], got {self.mone_keep_ratio}")


__all__ = ["MoetronConfig"]
