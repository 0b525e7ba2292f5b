"""Configuration of what parallel/ implements: the parallel layout, the expert-parallel token dispatcher with
LLEP, and FP8 projections.

``launcher/config.py`` composes these into the run config tree (YAML sections ``parallel``, ``moe`` and ``fp8``).
Each section checks its own cross-field rules (``validate``, ValueError naming the key) and defines the values
derived from it (``ParallelConfig.data_parallel_size``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional, Protocol, Union

from moe_core.config import MoEConfig
from moe_core.model_config import ModelConfig
from moe_core.config_fields import NonNegativeInt, PositiveFloat, PositiveInt, Range, check_ranges


@dataclass
class LLEPConfig:
    """Least-Loaded Expert Parallelism (arXiv 2601.17111; rules in parallel/llep/plan.py). Extra expert-weight
    memory per rank is at most ``W * (2 * max_foreign_experts + max_helpers_per_expert * experts_per_rank)``,
    ``W`` = one expert's gate+up+down bytes (``parallel.llep.extra_weight_bytes_bound``)."""

    imbalance_threshold: PositiveFloat = 1.3
    """lambda (paper 1.3): plain EP is used while max/mean EP-rank load stays below this."""
    capacity_factor: Annotated[float, Range(ge=1)] = 1.0
    """alpha (paper 1.0-1.1): per-rank token capacity is alpha * total_tokens / ep_size (at least 1 so the ranks
    hold every token)."""
    min_tokens_per_gemm: NonNegativeInt = 1024
    """(paper 1024) A spilled chunk has at least min(this, tokens left) tokens, so an expert spilling s tokens
    makes at most ceil(s / this) weight transfers; a helper may end up to this - 1 tokens over capacity."""
    max_foreign_experts: NonNegativeInt = 4
    """Most foreign experts' weights a rank receives in one step (memory cap on the receiving side)."""
    max_helpers_per_expert: PositiveInt = 16
    """Most helper ranks one expert is spilled to in one step (memory cap on the home rank, which receives one
    weight gradient per helper); a hot expert's tokens are then split over at most this + 1 ranks."""

    def validate(self) -> None:
        """Raise ValueError naming the ``moe.llep`` key outside its declared range (for a config built in code; a
        parsed recipe was checked when it was read)."""
        check_ranges(self, "moe.llep")


@dataclass
class ParallelMoEConfig(MoEConfig):
    """The ``moe`` section: moe_core's MoE layer settings plus how its tokens reach experts over EP ranks."""

    dispatcher: Literal["alltoall", "llep"] = "alltoall"
    """alltoall = plain expert parallelism (a token crosses the all-to-all once per EP rank holding some of its
    experts); llep = Least-Loaded EP (moves excess tokens and weights under skew; its rebalanced steps send a token
    once per expert)."""
    llep: LLEPConfig = field(default_factory=LLEPConfig)

    def validate(self, model: ModelConfig) -> None:
        """moe_core's checks of the section plus the dispatcher's; ValueError naming the key."""
        super().validate(model)
        if self.dispatcher == "llep" and self.capacity_factor is not None:
            raise ValueError("moe.dispatcher=llep is dropless: set moe.capacity_factor=null")
        self.llep.validate()


@dataclass
class ParallelConfig:
    """Sizes of the megatron-core parallel groups. DP is derived: world / (tp * pp).
    Experts are not tensor-parallel (expert TP = 1); EP is carved out of the tp*dp ranks of a stage."""

    tp: PositiveInt = 1
    """Tensor-parallel size (dense layers)."""
    pp: PositiveInt = 1
    """Pipeline-parallel stages (ranks of a pipeline; megatron-core's 1F1B schedule at pp > 1)."""
    virtual_pp: PositiveInt = 1
    """Model chunks per pipeline rank: > 1 runs megatron-core's interleaved 1F1B (needs pp > 1 and micro-batches
    per step divisible by pp); the pipeline bubble falls from (pp-1)/m to (pp-1)/(virtual_pp*m)."""
    pp_layout: Optional[Union[str, list[str]]] = None
    """null = layers split evenly over the pp * virtual_pp virtual stages; else megatron-core's
    --pipeline-model-parallel-layout vocabulary, e.g. "Et|tt|tmL" (E embedding, t layer, m MTP module, L head,
    | next virtual stage, X*n repeats; or a list of one string per stage): see parallel/layout.py."""
    ep: PositiveInt = 1
    """Expert-parallel size."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """auto = nccl when CUDA is available, else gloo (chosen on the machine that runs, so a resolved config stays
    usable on another kind of machine)."""
    sequence_parallel: bool = False
    """true | false (needs tp > 1 and tp dividing model.seq_length): megatron-core's sequence parallelism. The
    residual stream, norms and MoE layers hold 1/tp of each micro-batch's tokens; all-gather before each block
    of column-parallel projections, reduce-scatter after row-parallel ones. Same losses and gradients; less
    activation memory."""

    @property
    def micro_batch_group(self) -> int:
        """Micro-batches per step (and per validation) must be a multiple of this: pp under interleaving
        (megatron-core's interleaved schedule runs them in groups of pp), else 1."""
        return self.pp if self.virtual_pp > 1 else 1

    def data_parallel_size(self, world_size: int) -> int:
        """DP = world / (tp * pp) (:meth:`validate_world` checks that it divides)."""
        return world_size // (self.tp * self.pp)

    def validate(self, model: ModelConfig, moe: ParallelMoEConfig) -> None:
        """Raise ValueError naming the ``parallel.*`` key when the layout cannot split ``model`` / ``moe``."""
        if moe.num_experts % self.ep:
            raise ValueError(f"moe.num_experts ({moe.num_experts}) must be divisible by parallel.ep ({self.ep})")
        if moe.mone.enabled and moe.mone.balance_loss_coeff > 0 and self.ep > 1:
            raise ValueError("moe.mone.balance_loss_coeff > 0 is only defined without expert parallelism (each EP "
                             "rank would normalise over its own experts): set it to 0 or use parallel.ep=1")
        gqa = model.attention == "gqa"
        if model.num_attention_heads % self.tp or (gqa and model.num_query_groups % self.tp):
            raise ValueError(f"parallel.tp ({self.tp}) must divide model.num_attention_heads "
                             f"({model.num_attention_heads})"
                             + (f" and model.num_query_groups ({model.num_query_groups})" if gqa else ""))
        if moe.shared_expert_ffn_hidden_size % self.tp:
            raise ValueError(f"parallel.tp ({self.tp}) must divide moe.shared_expert_ffn_hidden_size "
                             f"({moe.shared_expert_ffn_hidden_size}): the shared expert is tensor-parallel")
        if model.vocab_size % self.tp:
            raise ValueError(f"parallel.tp ({self.tp}) must divide model.vocab_size ({model.vocab_size})")
        self.stage_plans(model)
        if self.sequence_parallel:
            self._validate_sequence_parallel(model, moe)

    def _validate_sequence_parallel(self, model: ModelConfig, moe: ParallelMoEConfig) -> None:
        if self.tp == 1:
            raise ValueError("parallel.sequence_parallel needs parallel.tp > 1 (it splits the sequence over the "
                             "tensor-parallel ranks): set parallel.tp or parallel.sequence_parallel=false")
        if model.seq_length % self.tp:
            raise ValueError(f"parallel.sequence_parallel: parallel.tp ({self.tp}) must divide model.seq_length "
                             f"({model.seq_length})")

    def stage_plans(self, model: ModelConfig):
        """Every virtual pipeline stage's layers (``parallel.layout.plan_stages``); ValueError naming the key."""
        from parallel.layout import plan_stages

        return plan_stages(model.num_layers, model.mtp_num_layers, self.pp, self.virtual_pp, self.pp_layout)

    def validate_world(self, world_size: int) -> None:
        """Raise ValueError when ``world_size`` ranks cannot hold this layout (run before any process group)."""
        if world_size % (self.tp * self.pp):
            raise ValueError(f"world size {world_size} is not divisible by parallel.tp * parallel.pp = "
                             f"{self.tp}*{self.pp}")
        dp = self.data_parallel_size(world_size)
        if (self.tp * dp) % self.ep:
            raise ValueError(f"parallel.ep ({self.ep}) must divide parallel.tp * data-parallel size ({self.tp}*{dp}) "
                             f"at world size {world_size}")


@dataclass
class FP8Config:
    """FP8 projections when train.precision=fp8 (docs/fp8.md). Router, norms, embedding and LM head stay high
    precision; MoNE's kept-neuron up/down path stays bf16. Which recipe and keys apply depends on the backend; a
    recipe or TE-only key that the backend does not have is a config error (parallel.fp8.fp8_config_error)."""

    backend: Literal["torchao", "te"] = "torchao"
    """torchao = torchao float8 training (dense projections: dynamic-scaled FP8 matmuls; experts: one grouped FP8
    GEMM with rowwise scales; a pip dependency, no CUDA build); te = Transformer Engine modules (pip install
    'moetron[gpu]')."""
    recipe: Literal["tensorwise", "rowwise", "delayed", "current", "mxfp8"] = "tensorwise"
    """torchao: tensorwise (one dynamic scale per tensor; E4M3 forward, E5M2 gradients) | rowwise (one power-of-2
    scale per row; E4M3); torchao experts always use rowwise. te: delayed (scale from an amax history, TE
    DelayedScaling) | current (scale from the tensor itself) | mxfp8 (32-element block scales, Blackwell GPUs)."""
    format: Literal["hybrid", "e4m3"] = "hybrid"
    """te only: hybrid = E4M3 activations/weights and E5M2 gradients; e4m3 = E4M3 everywhere."""
    amax_history_len: PositiveInt = 16
    """te delayed recipe only: amax values kept per tensor."""
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    """te delayed recipe only: scale from the max of the amax history, or from the most recent amax."""
    margin: NonNegativeInt = 0
    """te delayed recipe only: scales are divided by 2**margin (headroom against amax growth between steps)."""
    keep_first_last_bf16: bool = True
    """Keep the first and last transformer layers (and the MTP modules' blocks after them) in bf16."""


class _TrainSettings(Protocol):
    seed: int
    precision: str
    compile: bool
    recompute: str
    recompute_modules: list[str]


class RunConfig(Protocol):
    """What parallel/ reads of the whole run config (``launcher.config.Config`` has this shape): the model, MoE,
    parallel and FP8 sections, and ``train.seed`` / ``train.precision`` / ``train.compile`` / ``train.recompute`` /
    ``train.recompute_modules``."""

    model: ModelConfig
    moe: ParallelMoEConfig
    parallel: ParallelConfig
    fp8: FP8Config
    train: _TrainSettings
