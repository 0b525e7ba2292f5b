"""Distributed checkpoints (megatron-core ``dist_checkpointing``) that resume exactly and reshard.

Layout of ``<root>``::

    step_0000100/        a complete checkpoint (megatron-core torch_dist format + common.pt)
    step_0000200.tmp/    being written; never read
    latest               text file naming the newest complete step directory

Atomicity: every rank writes into ``step_N.tmp``; after a barrier rank 0 renames it to ``step_N`` and then
replaces ``latest`` through a temp file + ``os.replace``. A kill at any point leaves ``latest`` naming a complete
checkpoint (or nothing), so the last good checkpoint is never corrupted.

Contents: every parameter and AdamW moment as a ``ShardedTensor`` with its global shape/offsets (see
``parallel/sharding.py``) -> loadable at any TP/PP/EP layout; persistent buffers (router expert bias) likewise;
common state (step, scheduler, counters, config, layout) from rank 0; per-rank RNG and per-DP-rank data-loader
state as ``ShardedObject``s, restored only when the layout is unchanged (exact resume). After a layout change
RNG is re-seeded and the loader restarts from the global sample count (documented, not silent).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from parallel.groups import ParallelGroups
from parallel.sharding import named_specs, rank_offsets, replica_id

LATEST = "latest"


def _layout(groups: ParallelGroups) -> dict[str, int]:
    return dict(world=groups.world_size, tp=groups.tp_size, pp=groups.pp_size, ep=groups.ep_size)


def _sharded(key: str, tensor: torch.Tensor, spec, groups: ParallelGroups):
    from megatron.core.dist_checkpointing import ShardedTensor

    return ShardedTensor.from_rank_offsets(key, tensor, *rank_offsets(spec, groups),
                                           replica_id=replica_id(spec, groups))


def _replicated(key: str, tensor: torch.Tensor, groups: ParallelGroups):
    from megatron.core.dist_checkpointing import ShardedTensor

    return ShardedTensor.from_rank_offsets(key, tensor, replica_id=(groups.tp_rank, groups.dp_rank))


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Materialise AdamW's lazily-created state (zeros) so it can be a load target."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    keys = set(model.state_dict().keys())
    return {name: buf for name, buf in model.named_buffers() if name in keys}


def sharded_state_dict(model: nn.Module, optimizer: Optional[torch.optim.Optimizer], groups: ParallelGroups,
                       per_rank: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    from megatron.core.dist_checkpointing import ShardedObject

    sd: dict[str, Any] = {}
    for name, p, spec in named_specs(model):
        sd[f"model.{name}"] = _sharded(f"model.{name}", p.data, spec, groups)
        if optimizer is not None:
            state = optimizer.state[p]
            for moment in ("exp_avg", "exp_avg_sq"):
                sd[f"optim.{moment}.{name}"] = _sharded(f"optim.{moment}.{name}", state[moment], spec, groups)
    for name, buf in _persistent_buffers(model).items():
        sd[f"buffer.{name}"] = _replicated(f"buffer.{name}", buf, groups)
    for key, value in (per_rank or {}).items():
        if key.startswith("dp."):  # one copy per data-parallel rank (identical across its TP/PP peers)
            sd[key] = ShardedObject(key, value, (groups.dp_size,), (groups.dp_rank,),
                                    replica_id=groups.tp_rank * groups.pp_size + groups.pp_rank)
        else:  # one copy per global rank
            sd[key] = ShardedObject(key, value, (groups.world_size,), (groups.rank,), replica_id=0)
    return sd


def save(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         groups: ParallelGroups, common: dict[str, Any], per_rank: dict[str, Any], keep_last: int = 2) -> Path:
    """Write checkpoint ``step`` atomically (collective over the world); returns its directory."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final, tmp = root / f"step_{step:07d}", root / f"step_{step:07d}.tmp"
    if groups.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    sd = sharded_state_dict(model, optimizer, groups, per_rank)
    sd["common"] = dict(common, layout=_layout(groups), per_rank_keys=sorted(per_rank),
                        optim_step=int(next(iter(optimizer.state.values()))["step"]) if optimizer.state else 0)
    dist_checkpointing.save(sd, str(tmp))
    dist.barrier()
    if groups.rank == 0:
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_latest(root, final.name)
        _prune(root, keep_last)
    dist.barrier()
    return final


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f"{LATEST}.tmp"
    with open(tmp, "w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / LATEST)


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def find_latest(root: str | Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` (via ``latest``; else the newest ``step_*`` dir)."""
    root = Path(root)
    marker = root / LATEST
    if marker.is_file():
        candidate = root / marker.read_text().strip()
        if candidate.is_dir():
            return candidate
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    return steps[-1] if steps else None


def load_common(ckpt_dir: str | Path) -> dict[str, Any]:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(ckpt_dir))["common"]


def load(ckpt_dir: str | Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
         groups: ParallelGroups, per_rank_templates: Optional[dict[str, Any]] = None) -> tuple[dict, dict]:
    """Load into ``model``/``optimizer`` in place (any layout). Returns (common, per_rank); per_rank is empty when
    the layout changed (then RNG/data state are not restorable exactly)."""
    from megatron.core import dist_checkpointing

    common = load_common(ckpt_dir)
    same_layout = common.get("layout") == _layout(groups)
    if optimizer is not None:
        init_optimizer_state(optimizer)
    saved = set(common.get("per_rank_keys", ()))  # ask only for what this checkpoint holds
    templates = {k: v for k, v in (per_rank_templates or {}).items() if k in saved} if same_layout else None
    sd = sharded_state_dict(model, optimizer, groups, templates)
    loaded = dist_checkpointing.load(sd, str(ckpt_dir))
    with torch.no_grad():
        for name, p, _ in named_specs(model):
            p.copy_(loaded[f"model.{name}"])
            if optimizer is not None:
                state = optimizer.state[p]
                for moment in ("exp_avg", "exp_avg_sq"):
                    state[moment].copy_(loaded[f"optim.{moment}.{name}"])
                state["step"].fill_(float(common.get("optim_step", 0)))
        for name, buf in _persistent_buffers(model).items():
            buf.copy_(loaded[f"buffer.{name}"])
    per_rank = {k: loaded[k] for k in (templates or {})}
    return common, per_rank


