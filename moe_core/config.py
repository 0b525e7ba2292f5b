"""Configuration of the MoE math (YAML section ``moe``): routing, shared experts, MoNE and Matryoshka MoE.

Plain dataclasses, owned by the package that implements them; ``launcher/config.py`` composes them into the run
config tree (YAML sections ``model`` and ``moe``), parses recipes and overrides and runs the checks that span
packages. Each section checks its own cross-field rules (``validate``, ValueError naming the key) and defines the
values derived from it (``MoEConfig.default_eval_k``, ``MoEConfig.renormalise_gates``; the ``model`` section lives in
moe_core/model_config.py): every user of a derived value reads it from here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional, Union

from moe_core.config_fields import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range
from moe_core.model_config import ModelConfig


@dataclass
class MoNEConfig:
    """Mixture of Neuron Experts (arXiv 2510.05781): inside each routed expert keep only the top-k neurons."""

    enabled: bool = False
    """Select neurons inside each routed expert (off: every expert neuron is computed)."""
    keep_ratio: Annotated[float, Range(gt=0, le=1)] = 0.5
    """Fraction of expert neurons kept per token: k_n = max(1, round(keep_ratio * expert_ffn_hidden_size))."""
    score: Literal["post_act", "pre_act"] = "post_act"
    """Rank neurons by |silu(W_gate x)| (post_act, default) or |W_gate x| (pre_act)."""
    balance_loss_coeff: NonNegativeFloat = 0.0
    """Optional neuron-level load-balance loss coefficient (0 disables)."""
    backend: Literal["auto", "torch", "triton"] = "auto"
    """Neuron-selection implementation: auto = Triton kernels on CUDA, torch elsewhere."""
    shared_experts: bool = False
    """Also select neurons inside the shared expert (needs enabled and moe.shared_expert_ffn_hidden_size > 0): each
    token keeps its top round(keep_ratio * shared_expert_ffn_hidden_size) shared-expert neurons by the same score
    (with tensor parallelism the scores are gathered over TP, so the kept set is the single-device one)."""


@dataclass
class MatryoshkaConfig:
    """Matryoshka MoE (arXiv 2509.26520): k is drawn per layer per step, so one model serves any k."""

    enabled: bool = False
    """Draw k per layer per step in training (off: every layer routes to top_k experts)."""
    k_min: PositiveInt = 1
    """Smallest k drawn in training (<= k_max)."""
    k_max: PositiveInt = 4
    """Largest k drawn in training (<= moe.num_experts)."""
    distribution: Literal["uniform", "capacity"] = "capacity"
    """uniform over [k_min, k_max], or capacity-aware P(k) proportional to exp(log(k) / tau) (the paper's
    capacity-aware sampling; the default: measured closer to the specialists at k >= 2 than uniform, and as close
    at k = 1, docs/benchmarks.md "Matryoshka fidelity")."""
    tau: PositiveFloat = 1.0
    """Temperature of the capacity distribution."""
    eval_k: Optional[Union[PositiveInt, list[PositiveInt]]] = None
    """k used at evaluation/inference (each <= moe.num_experts): one int for all layers or one per MoE layer;
    null = automatic: k_max when Matryoshka is enabled, else moe.top_k. A k outside [k_min, k_max] warns once."""

    def validate(self, num_experts: int) -> None:
        """Raise ValueError unless ``1 <= k_min <= k_max <= num_experts`` (when enabled)."""
        if self.enabled and not 1 <= self.k_min <= self.k_max <= num_experts:
            raise ValueError(f"moe.matryoshka needs 1 <= k_min ({self.k_min}) <= k_max ({self.k_max}) <= "
                             f"moe.num_experts ({num_experts})")


def check_eval_k(k, num_experts: int, num_moe_layers: Optional[int], name: str) -> None:
    """Raise ValueError naming ``name`` unless ``k`` is an int in ``[1, num_experts]`` or a list of them with one
    per MoE layer (``num_moe_layers``; None = not checked). ``k`` None passes (the config's eval k)."""
    if k is None:
        return
    ks = list(k) if isinstance(k, (list, tuple)) else [k]
    for v in ks:
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= num_experts:
            raise ValueError(f"{name}: k={v!r} must be an int in [1, moe.num_experts={num_experts}]")
    if isinstance(k, (list, tuple)) and num_moe_layers is not None and len(ks) != num_moe_layers:
        raise ValueError(f"{name} gives {len(ks)} values but the model has {num_moe_layers} MoE layers: give one k "
                         "per MoE layer")


@dataclass
class MoEConfig:
    """Top-k router MoE layer (softmax router, SwiGLU experts, optional shared expert), with MoNE and Matryoshka
    MoE inside it."""

    num_experts: PositiveInt = 8
    """Routed experts E."""
    top_k: PositiveInt = 2
    """Experts per token K (<= num_experts)."""
    expert_ffn_hidden_size: PositiveInt = 256
    """Expert FFN width F."""
    aux_loss_coeff: NonNegativeFloat = 1e-2
    """Switch-style load-balancing loss coefficient (0 disables)."""
    aux_loss_scope: Literal["micro_batch", "global_batch", "sequence"] = "micro_batch"
    """Whose routing the load-balancing loss balances: micro_batch = each micro-batch's own; global_batch = the
    step's global batch, counts summed over data-parallel ranks and accumulated over the step's micro-batches
    (arXiv 2501.11873; lets experts specialise by domain); sequence = each sequence's own, averaged over the
    sequences (DeepSeek-V3's sequence-wise balance loss, arXiv 2412.19437 eq. 17-20; paper coefficient 1e-4).
    Details in moe_core/router.py."""
    score_function: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores: softmax over the experts (Qwen3-MoE, Mixtral) or an independent sigmoid per expert
    (DeepSeek-V3, GLM-4.5; the aux losses then see the scores normalised to sum to 1 per token)."""
    routed_scaling_factor: PositiveFloat = 1.0
    """Multiplies the gate weights after normalisation (DeepSeek-V3: 2.5); 1.0 = off."""
    num_groups: PositiveInt = 1
    """Group-limited routing (DeepSeek-V3's node-limited routing): the experts split into num_groups contiguous
    groups of num_experts / num_groups, a token picks its group_topk best groups (a group scored by the sum of its
    two highest selection scores) and its k experts inside them. 1 = off. Must divide moe.num_experts."""
    group_topk: PositiveInt = 1
    """Groups a token may route to (<= num_groups; every k used must fit: k <= group_topk * experts per group).
    Mapping groups onto EP ranks (num_groups a multiple of parallel.ep) bounds the EP ranks a token reaches."""
    z_loss_coeff: NonNegativeFloat = 1e-3
    """Router z-loss coefficient (0 disables)."""
    norm_topk_prob: Optional[bool] = None
    """true: the k gate weights of a token are its selected router probabilities renormalised to sum to 1 (at
    k = 1 the value 1.0, with the gradient of log p: see moe.top1_gate). false: the raw probabilities at every k, so
    each further expert adds its term (the nested, coarse-to-fine gate Matryoshka MoE needs). null = false under
    Matryoshka MoE, true otherwise (measured: docs/benchmarks.md "Matryoshka fidelity"). Hugging Face's name."""
    top1_gate: Literal["probability", "straight_through"] = "probability"
    """How a top-1 model (moe.top_k = 1, no Matryoshka) with renormalised gates weighs its one expert.
    probability: the raw router probability (Switch Transformer, arXiv 2101.03961; measured best for a top-1
    model), which makes it a raw-probability model: evaluated at any k it gates with the raw probabilities.
    straight_through: the value 1.0 (the renormalised value, Hugging Face Qwen3-MoE's gate) with the gradient of
    log p, so the router still learns. Every other renormalised model gates a k = 1 token the straight_through way
    (value 1.0: the scale of every k), so evaluating a top-2 model at k = 1 keeps its output scale."""
    expert_bias: bool = False
    """Aux-loss-free balancing: a per-expert bias added to routing scores for selection only."""
    expert_bias_update_rate: NonNegativeFloat = 1e-3
    """Step size of the expert-bias update per optimizer step."""
    capacity_factor: Optional[PositiveFloat] = None
    """null = off: dropless, no capacity limit (default). A number caps tokens per expert at
    capacity_factor * T * k / E; extra tokens drop."""
    shared_expert_ffn_hidden_size: NonNegativeInt = 0
    """Width of the shared expert, a SwiGLU FFN every token goes through besides its routed experts and whose
    output is added to theirs (DeepSeek-V3: moe_intermediate_size * n_shared_experts; Qwen2-MoE:
    shared_expert_intermediate_size). 0 = none (default). Tensor-parallel like the dense FFN (parallel.tp must
    divide it)."""
    shared_expert_gate: bool = False
    """Scale the shared expert's output by sigmoid(x w), w a learned [D] vector (Qwen2-MoE's shared_expert_gate);
    false = added as is (DeepSeek-V3). Needs moe.shared_expert_ffn_hidden_size > 0."""
    mone: MoNEConfig = field(default_factory=MoNEConfig)
    matryoshka: MatryoshkaConfig = field(default_factory=MatryoshkaConfig)

    @property
    def renormalise_gates(self) -> bool:
        """Whether gates are renormalised over the chosen experts at every k (value 1.0 at k = 1): norm_topk_prob
        (null: false under Matryoshka, true otherwise), except for a top-1 model with top1_gate = probability,
        whose trained scale is the raw probability."""
        raw_top1 = self.top1_gate == "probability" and self.top_k == 1 and not self.matryoshka.enabled
        return self.normalised_topk_prob and not raw_top1

    @property
    def normalised_topk_prob(self) -> bool:
        """``norm_topk_prob`` with null resolved: false under Matryoshka MoE, true otherwise."""
        return self.norm_topk_prob if self.norm_topk_prob is not None else not self.matryoshka.enabled

    @property
    def largest_k(self) -> int:
        """The most experts a token is routed to, in training or at the configured evaluation k."""
        eval_k = self.default_eval_k
        return max(self.top_k, self.matryoshka.k_max if self.matryoshka.enabled else 1,
                   max(eval_k) if isinstance(eval_k, list) else eval_k)

    @property
    def default_eval_k(self) -> Union[int, list[int]]:
        """The evaluation k of the config: ``matryoshka.eval_k``, or when null ``k_max`` with Matryoshka, else
        ``top_k``."""
        mm = self.matryoshka
        if mm.eval_k is not None:
            return mm.eval_k
        return mm.k_max if mm.enabled else self.top_k

    def eval_k_per_layer(self, num_moe_layers: int) -> list[int]:
        """The config's evaluation k of each of the ``num_moe_layers`` MoE layers, in layer order."""
        k = self.default_eval_k
        return list(k) if isinstance(k, list) else [k] * num_moe_layers

    def validate(self, model: ModelConfig) -> None:
        """Raise ValueError naming the ``moe.*`` key when the section does not fit itself or ``model``."""
        if self.top_k > self.num_experts:
            raise ValueError(f"moe.top_k ({self.top_k}) must be in [1, moe.num_experts={self.num_experts}]")
        self.matryoshka.validate(self.num_experts)
        self.validate_groups()
        if self.top1_gate != "probability" and (self.top_k > 1 or self.matryoshka.enabled):
            raise ValueError(f"moe.top1_gate={self.top1_gate} applies to top-1 models (moe.top_k=1 without "
                             "Matryoshka) only: every other renormalised model gates k = 1 straight-through already")
        if self.mone.shared_experts and not (self.mone.enabled and self.shared_expert_ffn_hidden_size):
            raise ValueError("moe.mone.shared_experts=true needs moe.mone.enabled=true and a shared expert "
                             "(moe.shared_expert_ffn_hidden_size > 0); set them or moe.mone.shared_experts=false")
        if self.shared_expert_gate and not self.shared_expert_ffn_hidden_size:
            raise ValueError("moe.shared_expert_gate=true needs a shared expert: set moe.shared_expert_ffn_hidden_size "
                             "> 0 or moe.shared_expert_gate=false")
        check_eval_k(self.matryoshka.eval_k, self.num_experts, len(model.moe_layer_indices), "moe.matryoshka.eval_k")

    def validate_groups(self) -> None:
        """Group-limited routing: groups split the experts evenly, and every k used fits the chosen groups."""
        if self.num_experts % self.num_groups:
            raise ValueError(f"moe.num_groups ({self.num_groups}) must divide moe.num_experts ({self.num_experts})")
        if self.group_topk > self.num_groups:
            raise ValueError(f"moe.group_topk ({self.group_topk}) must be <= moe.num_groups ({self.num_groups})")
        reachable = self.group_topk * (self.num_experts // self.num_groups)
        if self.num_groups > 1 and self.largest_k > reachable:
            raise ValueError(f"a token may be routed to {self.largest_k} experts (moe.top_k, moe.matryoshka.k_max or "
                             f"its eval_k) but its moe.group_topk={self.group_topk} groups of "
                             f"{self.num_experts // self.num_groups} experts hold only {reachable}: raise "
                             "moe.group_topk or lower k")
