"""Configuration of what parallel/ implements: the parallel layout, the expert-parallel token dispatcher with
LLEP, and FP8 projections.

``launcher/config.py`` composes these into the run config tree (YAML sections ``parallel``, ``moe`` and ``fp8``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, Protocol

from moe_core.config import ModelConfig, MoEConfig
from moe_core.config_fields import NonNegativeInt, PositiveFloat, PositiveInt, Range


@dataclass
class LLEPConfig:
    """Least-Loaded Expert Parallelism (arXiv 2601.17111; rules in parallel/llep_plan.py). Extra expert-weight
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


@dataclass
class ParallelMoEConfig(MoEConfig):
    """The ``moe`` section: moe_core's MoE layer settings plus how its tokens reach experts over EP ranks."""

    dispatcher: Literal["alltoall", "llep"] = "alltoall"
    """alltoall = plain expert parallelism; llep = Least-Loaded EP (moves excess tokens and weights under skew)."""
    llep: LLEPConfig = field(default_factory=LLEPConfig)


@dataclass
class ParallelConfig:
    """Sizes of the megatron-core parallel groups. DP is derived: world / (tp * pp).
    Experts are not tensor-parallel (expert TP = 1); EP is carved out of the tp*dp ranks of a stage."""

    tp: PositiveInt = 1
    """Tensor-parallel size (dense layers)."""
    pp: PositiveInt = 1
    """Pipeline-parallel stages."""
    ep: PositiveInt = 1
    """Expert-parallel size."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """auto = nccl when CUDA is available, else gloo."""


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
    """Keep the first and last transformer layers in bf16."""


class _TrainSettings(Protocol):
    seed: int
    precision: str
    compile: bool


class RunConfig(Protocol):
    """What parallel/ reads of the whole run config (``launcher.config.Config`` has this shape): the model and
    MoE sections, the FP8 section, and ``train.seed`` / ``train.precision`` / ``train.compile``."""

    model: ModelConfig
    moe: ParallelMoEConfig
    fp8: FP8Config
    train: _TrainSettings
