"""Where every parameter lives: one :class:`ShardSpec` per parameter drives init, checkpoints and grad norms.

A spec says which axis of the GLOBAL tensor is split over tensor parallelism (``tp_axis``) or over expert
parallelism (``expert_axis``, always 0 for the stacked ``[E, ...]`` expert weights). From it follow:
  * deterministic init: each parameter's global tensor is drawn in fixed 64-row chunks from generators keyed by
    ``(seed, name, chunk)``, and a rank draws only the chunks it holds. Any TP/PP/EP layout therefore holds exactly
    the same numbers as the single-device model, without ever materialising a whole large tensor;
  * checkpoint sharding: global shape + this rank's offsets (megatron-core ``ShardedTensor``) -> reshardable;
  * replication count: how many ranks hold an identical copy (for the de-duplicated global grad norm).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from parallel.groups import ParallelGroups

_CHUNK_ROWS = 64


@dataclass(frozen=True)
class ShardSpec:
    global_shape: tuple[int, ...]
    tp_axis: Optional[int] = None
    expert_axis: Optional[int] = None
    init: str = "normal"  # normal | scaled_normal (output projections) | ones | zeros
    tp_partial_grad: bool = False
    """Replicated over TP but fed TP-sharded activations (per-head q/k norms; under sequence parallelism every
    TP-replicated dense parameter, which sees its rank's token shard): grads must be summed over TP."""
    pipeline_copies: int = 1
    """Pipeline stages holding this parameter: 2 for the token embedding with MTP at PP > 1 (the first stage's and
    the last stage's copy, :func:`share_embedding`); their gradients are summed over ``groups.embedding_group``."""

    @property
    def is_expert(self) -> bool:
        return self.expert_axis is not None


def get_spec(param: torch.Tensor) -> ShardSpec:
    spec = getattr(param, "moetron_spec", None)
    if spec is None:
        raise RuntimeError("parameter has no ShardSpec: call parallel.sharding.attach_specs(model, ...) first")
    return spec


def local_slices(spec: ShardSpec, groups: ParallelGroups) -> tuple[slice, ...]:
    """This rank's slice of the global tensor along every axis."""
    slices = [slice(None)] * len(spec.global_shape)
    for axis, size, rank in ((spec.tp_axis, groups.tp_size, groups.tp_rank),
                             (spec.expert_axis, groups.ep_size, groups.ep_rank)):
        if axis is not None and size > 1:
            n = spec.global_shape[axis] // size
            slices[axis] = slice(rank * n, (rank + 1) * n)
    return tuple(slices)


def rank_offsets(spec: ShardSpec, groups: ParallelGroups) -> list[tuple[int, int, int]]:
    """megatron-core ``ShardedTensor.from_rank_offsets`` triples (axis, rank, fragments)."""
    out = []
    if spec.tp_axis is not None and groups.tp_size > 1:
        out.append((spec.tp_axis, groups.tp_rank, groups.tp_size))
    if spec.expert_axis is not None and groups.ep_size > 1:
        out.append((spec.expert_axis, groups.ep_rank, groups.ep_size))
    return out


def replica_id(spec: ShardSpec, groups: ParallelGroups) -> tuple[int, ...]:
    """All zeros on exactly one holder of each distinct shard (the one that writes it; every holder loads it). A
    parameter with pipeline copies adds the stage's copy index (0 on the first stage): one copy in the checkpoint."""
    copy = (0 if groups.is_first_stage else 1,) if spec.pipeline_copies > 1 else ()
    if spec.is_expert:
        return (0, groups.edp_rank, *copy)
    return (groups.tp_rank if spec.tp_axis is None else 0, groups.dp_rank, *copy)


def is_writer(spec: ShardSpec, groups: ParallelGroups) -> bool:
    """Whether this rank writes its shard of the parameter to a checkpoint (:func:`replica_id` all zeros)."""
    return not any(replica_id(spec, groups))


def sharded_tensor(key: str, tensor: torch.Tensor, spec: ShardSpec, groups: ParallelGroups):
    """megatron-core ``ShardedTensor`` placing ``tensor`` (this rank's TP/EP slice of a parameter-shaped tensor)
    in the global tensor, written by one of the ranks that hold the same slice."""
    from megatron.core.dist_checkpointing import ShardedTensor

    return ShardedTensor.from_rank_offsets(key, tensor, *rank_offsets(spec, groups),
                                           replica_id=replica_id(spec, groups))


def tp_copies(spec: ShardSpec, groups: ParallelGroups) -> int:
    """How many TP peers hold this exact shard: all of them for a parameter not split over TP, one for a TP-split
    parameter or an expert (experts are not tensor-parallel; EP owns them)."""
    return 1 if spec.is_expert or spec.tp_axis is not None else groups.tp_size


def replication(spec: ShardSpec, groups: ParallelGroups) -> int:
    """How many ranks of the world hold this exact shard (ranks of one pipeline stage, times its pipeline copies)."""
    return (groups.edp_size if spec.is_expert else groups.dp_size) * tp_copies(spec, groups) * spec.pipeline_copies


def _generator(seed: int, name: str, chunk: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}/{chunk}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _draw(spec: ShardSpec, name: str, seed: int, std: float, slices: tuple[slice, ...]) -> torch.Tensor:
    """The local slice of the global init tensor, drawn chunk by chunk along axis 0."""
    if spec.init in ("ones", "zeros"):
        shape = [len(range(*s.indices(n))) for s, n in zip(slices, spec.global_shape)]
        return torch.ones(shape) if spec.init == "ones" else torch.zeros(shape)
    rows = range(*slices[0].indices(spec.global_shape[0]))
    rest = spec.global_shape[1:]
    per_chunk = 1 if spec.is_expert else _CHUNK_ROWS  # one expert per generator: ranks draw only their experts
    parts = []
    for chunk in range(rows.start // per_chunk, (rows.stop - 1) // per_chunk + 1):
        lo, hi = chunk * per_chunk, min((chunk + 1) * per_chunk, spec.global_shape[0])
        block = torch.randn((hi - lo, *rest), generator=_generator(seed, name, chunk)) * std
        parts.append(block[max(rows.start, lo) - lo: min(rows.stop, hi) - lo])
    return torch.cat(parts)[(slice(None), *slices[1:])]


def init_parameters(model: nn.Module, seed: int, std: float, num_layers: int, groups: ParallelGroups) -> None:
    """Fill every parameter from its spec (layout-independent); output projections use std / sqrt(2 * layers)."""
    scaled = std / math.sqrt(2.0 * num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_meta:  # a model built for its names and shapes only (moetron convert): no values to draw
                continue
            spec = get_spec(p)
            value = _draw(spec, name, seed, scaled if spec.init == "scaled_normal" else std,
                          local_slices(spec, groups))
            if value.shape != p.shape:
                raise RuntimeError(f"init of {name}: drew {tuple(value.shape)} for a local shape {tuple(p.shape)}")
            p.copy_(value.to(p.dtype))


_OUTPUT_PROJ = ("o_proj", "down_proj", "w_down")


def attach_specs(model: nn.Module, groups: ParallelGroups, sequence_parallel: bool = False) -> None:
    """Give each parameter its ShardSpec from the module that owns it (see parallel/model.py's TP modules);
    ``sequence_parallel``: the model was built with it (``parallel.sequence_parallel``)."""
    from moe_core.experts import SwiGLUExperts

    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            tp_axis = getattr(module, "tp_axis", None) if groups.tp_size > 1 else None
            expert_axis = 0 if isinstance(module, SwiGLUExperts) else None
            shape = list(p.shape)
            if tp_axis is not None:
                shape[tp_axis] *= groups.tp_size
            if expert_axis is not None:
                shape[0] *= groups.ep_size  # stacked [E_local, ...] -> [E, ...]
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name == "bias":  # q/k/v biases (model.qkv_bias) start at zero, as Hugging Face and megatron-core
                init = "zeros"
            elif p.dim() == 1 and "norm" in full:
                init = "ones"
            elif any(tag in full for tag in _OUTPUT_PROJ):
                init = "scaled_normal"
            else:
                init = "normal"
            replicated = tp_axis is None and expert_axis is None
            partial = groups.tp_size > 1 and (getattr(module, "per_head", False) or sequence_parallel and replicated)
            p.moetron_spec = ShardSpec(tuple(shape), tp_axis, expert_axis, init, tp_partial_grad=partial)


def share_embedding(model: nn.Module, groups: ParallelGroups) -> None:
    """Mark ``embed_tokens.weight`` of a ``MoETransformer`` stage as held by two pipeline stages when both the first
    stage (the input) and the last one (the MTP modules, ``model.mtp_num_layers`` > 0) hold it: megatron-core's
    shared-embedding design. Both copies are drawn from the same
    name-keyed generator (identical at init), their gradients are summed over ``groups.embedding_group`` before the
    optimizer step (``parallel/optim``), so they stay identical after every step; checkpoints write the first
    stage's (:func:`replica_id`). ``shared_embedding`` also gives it its own megatron-core gradient bucket, so the
    distributed optimizer shards it alike on both stages."""
    p = getattr(getattr(model, "embed_tokens", None), "weight", None)
    if p is None or groups.pp_size == 1 or not model.model_cfg.mtp_num_layers:
        return
    p.moetron_spec = dataclasses.replace(get_spec(p), pipeline_copies=2)
    p.shared_embedding = True


def pipeline_shared(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with pipeline copies (:func:`share_embedding`), in a fixed order."""
    return [p for p in model.parameters() if get_spec(p).pipeline_copies > 1]


def expert_and_dense(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    expert, dense = [], []
    for p in model.parameters():
        (expert if get_spec(p).is_expert else dense).append(p)
    return expert, dense


def named_specs(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, ShardSpec]]:
    for name, p in model.named_parameters():
        yield name, p, get_spec(p)
