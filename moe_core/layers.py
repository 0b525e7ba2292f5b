"""Building blocks shared by the attention variants, the transformer block and the MoE layer: the projection
factory, the SwiGLU FFN and RMSNorm.

Parallelism is not this package's business: the linear/embedding constructors come from a :class:`LayerFactory`
(plain ``nn.Linear`` here; ``parallel/model.py`` passes tensor-parallel ones).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerFactory:
    """Builds the projections. ``column`` layers split their output (and their bias) over TP (``gather_output``:
    all-gathered back to the whole output on every rank, for a replicated consumer), ``row`` layers their input;
    ``tp_copy`` marks a TP-replicated tensor that each TP rank uses for its own heads only; ``tp_sum`` adds up a
    per-rank partial result over TP (a norm over a TP-split projection).

    Sequence parallelism (``sequence_parallel``; ``parallel/model.py``): the residual stream, the norms and the MoE
    layer hold this TP rank's shard of the micro-batch's tokens, ``[B*S/tp, D]`` (the tokens flattened batch-major,
    split into ``tp`` contiguous pieces); the embedding returns that shard, ``sequence_gather`` makes the whole
    ``[B*S, ...]`` before each block of column projections, and ``row`` layers return the shard again."""

    tp_size = 1
    sequence_parallel = False

    def column(self, in_features: int, out_features: int, gather_output: bool = False,
               bias: bool = False) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def row(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def embedding(self, vocab: int, dim: int) -> nn.Module:
        return nn.Embedding(vocab, dim)

    def tp_copy(self) -> nn.Module:
        """Identity in the forward; with TP the backward sums the gradient over the TP ranks (each rank's heads
        contribute their share of it). Single device: nothing to sum; under sequence parallelism the tensor comes
        from ``sequence_gather``, whose backward sums it, so this is the identity too."""
        return nn.Identity()

    def sequence_gather(self) -> nn.Module:
        """Sequence parallelism: this rank's token shard ``[B*S/tp, ...]`` -> every token ``[B*S, ...]`` (all-gather;
        the backward sums the gradient over TP and keeps this rank's shard). Without it the identity: the tokens
        are whole already."""
        return nn.Identity()

    def sequence_scatter(self) -> nn.Module:
        """Sequence parallelism: every token ``[B*S, ...]`` (replicated over TP) -> this rank's shard
        ``[B*S/tp, ...]`` (the backward all-gathers the gradient). Without it the identity."""
        return nn.Identity()

    def tp_gather_columns(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(x_full, start)``: a ``column`` layer's output ``x [..., f]`` (this rank's ``f`` of the layer's
        ``F`` outputs) with the other TP ranks' slices, ``[..., F]`` in output order, and the index of this rank's
        first output in it; no gradient (for decisions such as MoNE's neuron selection). Single device:
        ``(x, 0)``."""
        return x.detach(), 0

    def tp_sum(self) -> nn.Module:
        """Sum over the TP ranks in the forward, and of the gradient in the backward (every rank's result depends
        on every rank's input). Single device: identity."""
        return nn.Identity()


class ReplicatedLinear(nn.Linear):
    """A bias-free projection every TP rank holds whole and computes in full (MLA's down-projections). Its input
    and output are replicated over TP; it is not a TP layer."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)


class SwiGLUMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, [..., D] -> [..., D] (HF Qwen3MoeMLP): the dense layers'
    FFN and the MoE layer's shared expert. gate/up are ``column`` and down is ``row`` layers of the factory, so with
    TP each rank computes ``ffn / tp`` of the neurons and the down projection sums them over TP. Under sequence
    parallelism it takes and returns the token shard (``factory.sequence_gather`` before gate/up)."""

    def __init__(self, hidden: int, ffn: int, factory: LayerFactory):
        super().__init__()
        self.sequence_gather = factory.sequence_gather()
        self.gate_proj = factory.column(hidden, ffn)
        self.up_proj = factory.column(hidden, ffn)
        self.down_proj = factory.row(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sequence_gather(x)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back (as HF Qwen3: ``weight * x_normed.to(input_dtype)``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class ProjectionRMSNorm(nn.Module):
    """RMSNorm over a whole projection's output (OLMoE's q/k norm: ``width`` = heads * head_dim channels), fp32
    and cast back like :class:`RMSNorm`; ``[..., width / tp] -> [..., width / tp]``.

    With TP the projection is column-parallel, so each rank holds ``width / tp`` of the channels (its heads): the
    weight is split the same way (``tp_axis = 0``: parallel/sharding.py reads it) and the mean of squares is the
    sum of every rank's sum of squares (``factory.tp_sum``, an all-reduce) divided by ``width``."""

    tp_axis = 0

    def __init__(self, width: int, eps: float, factory: LayerFactory):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width // factory.tp_size))
        self.width, self.eps = width, eps
        self.tp_sum = factory.tp_sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        mean_sq = self.tp_sum(x32.pow(2).sum(-1, keepdim=True)) / self.width
        return self.weight * (x32 * torch.rsqrt(mean_sq + self.eps)).to(x.dtype)
