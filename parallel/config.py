"""Configuration of what parallel/ implements: the parallel layout, the expert-parallel token dispatcher with
LLEP, and FP8 projections.

``launcher/config.py`` composes these into the run config tree (YAML sections ``parallel``, ``moe`` and ``fp8``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from moe_core.config import ModelConfig, MoEConfig


@dataclass
class LLEPConfig:
    """Least-Loaded Expert Parallelism (arXiv 2601.17111)."""

    imbalance_threshold: float = 1.3
    """lambda: plain EP is used while max/mean EP-rank load stays below this."""
    capacity_factor: float = 1.0
    """alpha: per-rank token capacity is alpha * total_tokens / ep_size."""
    min_tokens_per_gemm: int = 1024
    """Spilled chunks smaller than this are avoided unless nothing else fits."""
    max_foreign_experts: int = 4
    """Most foreign experts' weights a rank may host in one step (memory cap)."""


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

    tp: int = 1
    pp: int = 1
    ep: int = 1
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """auto = nccl when CUDA is available, else gloo."""


@dataclass
class FP8Config:
    """FP8 projections when train.precision=fp8 (docs/fp8.md). Router, norms, embedding and LM head stay high
    precision; MoNE's kept-neuron up/down path stays bf16."""

    backend: Literal["te", "torch"] = "te"
    """te = Transformer Engine modules (pip install 'moetron[gpu]'); torch = torch._scaled_mm with per-tensor
    scales (no TE needed; Hopper/Ada GPU; recipes delayed/current)."""
    recipe: Literal["delayed", "current", "mxfp8"] = "delayed"
    """delayed = scale from an amax history (TE DelayedScaling); current = scale from the tensor itself;
    mxfp8 = 32-element block scales (TE only, Blackwell GPUs)."""
    format: Literal["hybrid", "e4m3"] = "hybrid"
    """hybrid = E4M3 activations/weights and E5M2 gradients; e4m3 = E4M3 everywhere."""
    amax_history_len: int = 16
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    """delayed recipe: scale from the max of the amax history, or from the most recent amax."""
    margin: int = 0
    """Scales are divided by 2**margin (headroom against amax growth between steps)."""
    keep_first_last_bf16: bool = True
    """Keep the first and last transformer layers in bf16."""


class _TrainSettings(Protocol):
    seed: int
    precision: str


class RunConfig(Protocol):
    """What parallel/ reads of the whole run config (``launcher.config.Config`` has this shape): the model and
    MoE sections, the FP8 section, and ``train.seed`` / ``train.precision``."""

    model: ModelConfig
    moe: ParallelMoEConfig
    fp8: FP8Config
    train: _TrainSettings
