"""Build this rank's piece of the model: TP projections, local experts + EP dispatcher, its pipeline model chunks
(one per virtual stage it runs, ``parallel/layout.py``) gathered in a :class:`PipelineStage`.

The module tree is built on the ``meta`` device (no memory), experts are replaced by this EP rank's slice, then
the tensors are materialised and filled by :func:`parallel.sharding.init_parameters`, which draws exactly the
numbers the single-device model would hold at every position. Parameter names equal the single-device names.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_core.experts import SwiGLUExperts
from moe_core.layers import LayerFactory
from moe_core.recompute import Recompute
from moe_core.router import SequenceShard
from moe_core.transformer import MoETransformer
from parallel.comm import SINGLE_PROCESS, all_reduce_sum, gather_dim0
from parallel.compile import compile_blocks
from parallel.config import RunConfig
from parallel.groups import ParallelGroups
from parallel.layout import ChunkPlan, rank_chunks
from parallel.sharding import attach_specs, init_parameters, share_embedding


def _tp_classes():
    """megatron-core TP layers, returning only the output (a column layer's bias, split over TP like its output,
    is added inside; row layers have none) and naming their split axis. Under sequence parallelism (megatron's
    ``sequence_parallel`` / ``reduce_scatter_embeddings``, which act on dim 0) the row layer and the embedding see
    their input as one row of tokens and return the token shard [B*S/tp, D]."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    class ColumnLinear(ColumnParallelLinear):
        tp_axis = 0  # weight [out/tp, in]

        def forward(self, x):
            return super().forward(x)[0]

    class RowLinear(RowParallelLinear):
        tp_axis = 1  # weight [out, in/tp]; output all-reduced (sequence parallel: reduce-scattered) over TP

        def forward(self, x):
            return super().forward(x.flatten(0, -2) if self.sequence_parallel else x)[0]

    class VocabEmbedding(VocabParallelEmbedding):
        tp_axis = 0  # weight [V/tp, D]

        def forward(self, tokens):
            if not self.reduce_scatter_embeddings:
                return super().forward(tokens)
            return super().forward(tokens.reshape(1, -1)).squeeze(1)  # [1, B*S] -> [B*S/tp, 1, D] -> [B*S/tp, D]

    return ColumnLinear, RowLinear, VocabEmbedding


class TensorParallelFactory(LayerFactory):
    """megatron-core column/row-parallel projections and vocab-parallel embedding on an explicit TP group.

    ``sequence_parallel`` (megatron-core's pattern, moe_core.layers.LayerFactory): the embedding reduce-scatters
    its output to the token shard, row layers reduce-scatter instead of all-reducing, and one
    ``sequence_gather`` (all-gather; backward reduce-scatter) feeds each block of column layers (q/k/v, gate/up,
    the LM head), which then sum no input gradient themselves (``disable_grad_reduce``): one collective per block
    instead of one per projection (megatron fuses q/k/v and gate/up into one layer for the same reason)."""

    def __init__(self, groups: ParallelGroups, sequence_parallel: bool = False):
        from megatron.core.model_parallel_config import ModelParallelConfig

        self.tp_size, self.tp_rank = groups.tp_size, groups.tp_rank
        self.tp_group = groups.tp_group
        self.sequence_parallel = sequence_parallel
        # We initialise every tensor ourselves (layout-independent), so megatron must not.
        self.mp_config, self.row_config = (
            ModelParallelConfig(tensor_model_parallel_size=groups.tp_size, use_cpu_initialization=True,
                                perform_initialization=False, params_dtype=torch.float32, sequence_parallel=sp)
            for sp in (False, sequence_parallel))
        self.column_cls, self.row_cls, self.embedding_cls = _tp_classes()

    def column(self, in_features: int, out_features: int, gather_output: bool = False,
               bias: bool = False) -> nn.Module:
        return self.column_cls(in_features, out_features, config=self.mp_config, init_method=_skip_init,
                               bias=bias, gather_output=gather_output, tp_group=self.tp_group,
                               disable_grad_reduce=self.sequence_parallel)

    def row(self, in_features: int, out_features: int) -> nn.Module:
        return self.row_cls(in_features, out_features, config=self.row_config, init_method=_skip_init, bias=False,
                            input_is_parallel=True, skip_bias_add=True, tp_group=self.tp_group)

    def embedding(self, vocab: int, dim: int) -> nn.Module:
        return self.embedding_cls(vocab, dim, config=self.mp_config, init_method=_skip_init,
                                  reduce_scatter_embeddings=self.sequence_parallel, tp_group=self.tp_group)

    def tp_copy(self) -> nn.Module:
        return nn.Identity() if self.sequence_parallel else _TPCopy(self.tp_group)

    def sequence_gather(self) -> nn.Module:
        return _SequenceMapping("gather", self.tp_group) if self.sequence_parallel else nn.Identity()

    def sequence_scatter(self) -> nn.Module:
        return _SequenceMapping("scatter", self.tp_group) if self.sequence_parallel else nn.Identity()

    def tp_gather_columns(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """All-gather of a column layer's output slices over TP (collective; no gradient), in output order."""
        f = x.shape[-1]
        x_fT = x.detach().reshape(-1, f).t()  # gather along dim 0 = the outputs
        full = gather_dim0(x_fT, self.tp_group).t().reshape(*x.shape[:-1], f * self.tp_size)
        return full, self.tp_rank * f

    def tp_sum(self) -> nn.Module:
        return _TPSum(self.tp_group)


class _TPSum(nn.Module):
    """All-reduce (sum) over the TP group in the forward and in the backward (parallel.comm.all_reduce_sum)."""

    def __init__(self, tp_group):
        super().__init__()
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(x, self.tp_group)


class _TPCopy(nn.Module):
    """megatron-core's copy-to-TP-region: identity forward, gradient all-reduced over the TP group backward."""

    def __init__(self, tp_group):
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        super().__init__()
        self.tp_group = tp_group
        self.copy = copy_to_tensor_model_parallel_region

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.copy(x, group=self.tp_group)


class _SequenceMapping(nn.Module):
    """megatron-core's sequence-parallel mappings on dim 0: ``gather`` = gather-from-sequence-parallel-region
    (all-gather forward, reduce-scatter backward), ``scatter`` = scatter-to-sequence-parallel-region (this rank's
    slice forward, all-gather backward)."""

    def __init__(self, kind: str, tp_group):
        from megatron.core.tensor_parallel import mappings

        super().__init__()
        self.tp_group = tp_group
        self.mapping = {"gather": mappings.gather_from_sequence_parallel_region,
                        "scatter": mappings.scatter_to_sequence_parallel_region}[kind]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mapping(x, group=self.tp_group)


def _skip_init(weight: torch.Tensor) -> None:
    """megatron-core asks for an init method; ours runs later (parallel/sharding.py)."""


class PipelineStage(nn.Module):
    """This rank's model chunks (``MoETransformer`` stages, in virtual-stage order) as one module whose parameter
    names are the single-device model's: each chunk's ``layers`` (keyed by GLOBAL layer index), ``embed_tokens``,
    ``norm``, ``lm_head`` and ``mtp`` are registered here under those names, so checkpoints, the optimizer and
    metrics see the same keys at every PP x VPP layout. ``chunks`` (a plain list) is what the schedule runs."""

    def __init__(self, chunks: list[MoETransformer]):
        super().__init__()
        self.chunks = list(chunks)
        self.model_cfg = chunks[0].model_cfg
        for name in ("embed_tokens", "layers", "norm", "lm_head", "mtp"):  # MoETransformer's order
            if name == "layers":
                self.layers = nn.ModuleDict({i: blk for chunk in chunks for i, blk in chunk.layers.items()})
                continue
            owners = [getattr(chunk, name) for chunk in chunks if hasattr(chunk, name)]
            if owners:
                setattr(self, name, owners[0])  # at most one chunk of a rank holds each at PP > 1

    def train(self, mode: bool = True) -> "PipelineStage":
        super().train(mode)
        for chunk in self.chunks:
            chunk.train(mode)
        return self

    def blocks(self) -> dict:
        return {i: blk for chunk in self.chunks for i, blk in chunk.blocks().items()}

    def moe_layers(self) -> dict:
        return {i: layer for chunk in self.chunks for i, layer in chunk.moe_layers().items()}

    def set_step(self, step: int) -> None:
        for chunk in self.chunks:
            chunk.set_step(step)

    def set_eval_k(self, k) -> None:
        for chunk in self.chunks:
            chunk.set_eval_k(k)

    def forward(self, *args, **kwargs):
        """The one chunk's forward (a rank with several chunks runs them through ``parallel.schedule``)."""
        if len(self.chunks) != 1:
            raise RuntimeError("a rank with several model chunks (parallel.virtual_pp > 1) runs them through "
                               "parallel.schedule.PipelineSchedule")
        return self.chunks[0](*args, **kwargs)


def _make_dispatcher(cfg: RunConfig, groups: ParallelGroups):
    # The group the MoE layer's tokens are replicated over: TP, except under sequence parallelism, where each TP
    # rank already holds its own tokens (nothing to slice, nothing to gather back).
    tp_group = SINGLE_PROCESS if cfg.parallel.sequence_parallel else groups.tp_group
    if cfg.moe.dispatcher == "llep":
        from parallel.llep.dispatcher import LLEPDispatcher

        return LLEPDispatcher(tp_group, groups.ep_group, cfg.moe.num_experts, cfg.moe.llep)
    from parallel.dispatch import AllToAllDispatcher

    return AllToAllDispatcher(tp_group, groups.ep_group, cfg.moe.num_experts)


def _localise_experts(model: MoETransformer, cfg: RunConfig, groups: ParallelGroups) -> None:
    """Replace each MoE layer's experts with this EP rank's slice and install the EP dispatcher."""
    if groups.ep_size == 1 and (groups.tp_size == 1 or cfg.parallel.sequence_parallel):
        return  # every expert here and no TP slice to take (sequence parallel: the tokens are this rank's own)
    num_local = cfg.moe.num_experts // groups.ep_size
    for layer in model.moe_layers().values():
        layer.experts = SwiGLUExperts(num_local, cfg.model.hidden_size, cfg.moe.expert_ffn_hidden_size,
                                      cfg.moe.mone, first_expert=groups.ep_rank * num_local)
        layer.dispatcher = _make_dispatcher(cfg, groups)


def to_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Parameters to ``dtype`` in place (same Parameter objects, specs kept), except the router's: routing is
    decided and its softmax differentiated in fp32 (moe_core/router.py computes in fp32 whatever the input), so
    its weight stays fp32, as megatron-core's fp32 router does. Buffers (RoPE tables, expert bias) stay fp32."""
    for name, p in model.named_parameters():
        if "router" not in name.split("."):
            p.data = p.data.to(dtype)


def count_sum(group) -> Callable[[torch.Tensor], torch.Tensor]:
    """A router count reducer summing routed-slot counts over ``group`` in place (collective-only: one all-reduce
    per MoE layer and micro-batch). ``moe.aux_loss_scope=global_batch``: the DP group (tokens are replicated over TP
    peers and disjoint over DP ranks, so the DP sum counts each token of the global batch once). Sequence
    parallelism: the TP group, which holds the micro-batch's pieces (``SequenceShard.reduce``)."""

    def over_group(counts: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(counts, group=group)
        return counts

    return over_group


def activation_shape(cfg: RunConfig, micro_batch_size: int) -> tuple[int, ...]:
    """The activations one micro-batch passes between pipeline stages: hidden [B, S, D], or under sequence
    parallelism this TP rank's token shard [B*S/tp, D]."""
    m, p = cfg.model, cfg.parallel
    if p.sequence_parallel:
        return (micro_batch_size * m.seq_length // p.tp, m.hidden_size)
    return (micro_batch_size, m.seq_length, m.hidden_size)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _chunk_plans(cfg: RunConfig, groups: ParallelGroups) -> list[ChunkPlan]:
    """This rank's virtual stages under ``cfg.parallel``; one process (a single-device reference, HF export)
    holds the whole model as one chunk whatever the config's pipeline layout."""
    if groups.pp_size == 1:
        return [ChunkPlan(range(cfg.model.num_layers), pre_process=True, post_process=True)]
    if groups.pp_size != cfg.parallel.pp:
        raise ValueError(f"the pipeline group has {groups.pp_size} stages, parallel.pp is {cfg.parallel.pp}")
    return rank_chunks(cfg.parallel.stage_plans(cfg.model), groups.pp_size, groups.pp_rank)


def build_model(cfg: RunConfig, groups: ParallelGroups, device: torch.device | None = None) -> PipelineStage:
    """This rank's model chunks with TP/EP applied, initialised layout-independently from cfg.train.seed, with
    ``train.recompute`` set on each (moe_core/recompute.py)."""
    device = device or default_device()
    sequence_parallel = cfg.parallel.sequence_parallel and groups.tp_size > 1  # one TP rank holds every token
    factory = TensorParallelFactory(groups, sequence_parallel) if groups.tp_size > 1 else LayerFactory()
    chunks = []
    for plan in _chunk_plans(cfg, groups):
        with torch.device("meta"):
            chunk = MoETransformer(cfg.model, cfg.moe, cfg.train.seed, factory, layer_range=plan.layers,
                                   pre_process=plan.pre_process, post_process=plan.post_process)
            _localise_experts(chunk, cfg, groups)
        chunk.set_recompute(Recompute(cfg.train.recompute, frozenset(cfg.train.recompute_modules)))
        chunk.to_empty(device=device)
        chunk.reset_buffers()
        chunks.append(chunk)
    model = PipelineStage(chunks)
    attach_specs(model, groups, sequence_parallel)
    share_embedding(model, groups)
    init_parameters(model, cfg.train.seed, cfg.model.init_std, cfg.model.num_layers, groups)
    if cfg.train.precision != "fp32":
        to_compute_dtype(model, torch.bfloat16)
    if cfg.moe.aux_loss_scope == "global_batch" and groups.dp_size > 1:
        for layer in model.moe_layers().values():
            layer.router.count_reducer = count_sum(groups.dp_group)
    if sequence_parallel:
        shard = SequenceShard(groups.tp_rank, groups.tp_size, cfg.model.seq_length, count_sum(groups.tp_group),
                              functools.partial(gather_dim0, group=groups.tp_group))
        for layer in model.moe_layers().values():
            layer.router.shard = shard
    if cfg.train.precision == "fp8":
        from parallel.fp8.swap import convert_to_fp8  # lazy: bf16/fp32 runs never import FP8 code

        for idx, block in model.blocks().items():  # same Parameters keep their names and ShardSpecs
            convert_to_fp8(block, cfg, idx)
    if cfg.train.compile:  # after FP8 conversion, so the FP8 casts are compiled into the blocks
        compile_blocks(model, cfg)
    return model


def token_losses(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """Per-token cross-entropy in fp32; with TP the logits are vocab-sharded (megatron's vocab-parallel CE)."""
    if groups.tp_size > 1:
        from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

        return vocab_parallel_cross_entropy(logits_BSV.float(), labels_BS, tp_group=groups.tp_group)
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(), reduction="none").view_as(labels_BS)
