"""Distributed checkpoints (megatron-core ``dist_checkpointing``) that resume exactly and reshard: what a checkpoint
holds, saving (:class:`Saving`: inline, or writing in the background with ``checkpoint.async_save``) and loading.

Layout of ``<root>``::

    step_0000100/        a complete checkpoint (megatron-core torch_dist format + moetron.json: the manifest)
    step_0000200.tmp/    being written (or, ``*.removing.tmp``, being deleted); never read, removed at start
    step_0000200.new/    a complete re-save of the step ``latest`` names, for the moment it replaces it
    latest               text file naming the checkpoint to resume from

Atomicity: every rank writes into ``step_N.tmp``; when every rank's files, ``.metadata`` and ``metadata.json`` are
complete, rank 0 writes the manifest (size and CRC-32 of every file, ``checkpoint_manifest.py``), fsyncs, renames
``step_N.tmp`` to ``step_N`` and then replaces ``latest`` (``checkpoint_root.py``: the directory protocol, which
treats every name read from disk as hostile and deletes only directories it wrote). A kill at any point leaves
``latest`` naming a complete checkpoint (or nothing); :func:`checkpoint_rank0.prepare` finishes or rolls back an
interrupted commit and removes ``*.tmp`` at the next start.

Runs: each checkpoint records the id of the run (lineage) that wrote it; a resumed run keeps its checkpoint's id,
a ``resume=never`` run starts a new one and detaches ``latest``. ``keep_last`` prunes only the run's own
checkpoints, never the one ``latest`` names nor the protected one (the newest saved before a non-finite streak).
Loading checks the bytes against the manifest first and unpickles only allowlisted types (``safe_load.py``); the
model/MoE config must match on resume and evaluation (``checkpoint_config.model_changes``).

Contents: every parameter, AdamW moment and (bf16 runs) fp32 main weight as a ``ShardedTensor`` with its global
shape/offsets (see ``parallel/sharding.py`` and ``parallel/optim/optimizer.py``) -> loadable at any TP/PP/EP/DP layout,
with either optimizer implementation; persistent buffers (router expert bias) likewise;
common state (step, scheduler, counters, config, layout) from rank 0; per-rank RNG and per-DP-rank data-loader
state as ``ShardedObject``s. RNG is restored at the same layout only (after a change it is re-seeded, and a line
says so); the data position always: exactly when the DP size is unchanged (TP/PP/EP may change), else from DP rank
0's global sample count (:func:`_per_rank_targets`).
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from launcher.train import checkpoint_manifest as manifest, checkpoint_root as disk
from launcher.train.checkpoint_rank0 import first_line, on_rank0, root_cause, save_failure
from launcher.train.checkpoint_root import TMP, CheckpointError, step_name
from launcher.train.checkpoint_root import find_latest  # noqa: F401 - this module's API (evaluate, convert)
from launcher.train.checkpoint_write import WriteJob, all_written
from parallel.groups import ParallelGroups
from parallel.optim.optimizer import TrainOptimizer
from parallel.sharding import is_writer, named_specs, sharded_tensor

def _layout(groups: ParallelGroups) -> dict[str, int]:
    return dict(world=groups.world_size, tp=groups.tp_size, pp=groups.pp_size, ep=groups.ep_size)


def _replicated(key: str, tensor: torch.Tensor, groups: ParallelGroups):
    from megatron.core.dist_checkpointing import ShardedTensor

    return ShardedTensor.from_rank_offsets(key, tensor, replica_id=(groups.tp_rank, groups.dp_rank))


def _persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    keys = set(model.state_dict().keys())
    return {name: buf for name, buf in model.named_buffers() if name in keys}


def sharded_state_dict(model: nn.Module, groups: ParallelGroups, per_rank: Optional[dict[str, Any]] = None,
                       loading: bool = False) -> dict[str, Any]:
    """Model weights (as they are; fp32 load targets when ``loading``, so a bf16 run can take its fp32 main
    weights from them), persistent buffers and per-rank objects; the optimizer adds its own entries."""
    from megatron.core.dist_checkpointing import ShardedObject

    sd: dict[str, Any] = {}
    for name, p, spec in named_specs(model):
        data = torch.empty(p.shape, dtype=torch.float32, device=p.device) if loading else p.data
        sd[f"model.{name}"] = sharded_tensor(f"model.{name}", data, spec, groups)
    for name, buf in _persistent_buffers(model).items():
        sd[f"buffer.{name}"] = _replicated(f"buffer.{name}", buf, groups)
    for key, value in (per_rank or {}).items():
        if key.startswith("dp."):  # one copy per data-parallel rank (identical across its TP/PP peers)
            sd[key] = ShardedObject(key, value, (groups.dp_size,), (groups.dp_rank,),
                                    replica_id=groups.tp_rank * groups.pp_size + groups.pp_rank)
        else:  # one copy per global rank
            sd[key] = ShardedObject(key, value, (groups.world_size,), (groups.rank,), replica_id=0)
    return sd


class Saving:
    """One checkpoint save, started by :func:`start_save` (collective): this rank's files are being written (inline:
    already written). :meth:`ready` says whether every rank's writes ended; :meth:`finish` (collective) waits for
    them, writes the manifest and commits: ``latest`` names the new checkpoint only then."""

    def __init__(self, root: Path, step: int, groups: ParallelGroups, job: Optional[WriteJob], keep_last: int, run: str,
                 protect: tuple[str, ...], device: torch.device):
        self.root, self.step, self.groups, self.job, self.device = root, step, groups, job, device
        self.path = root / step_name(step)
        self._keep_last, self._run, self._protect = keep_last, run, protect

    def ready(self) -> bool:
        """Whether every rank's writes have ended (collective: one small all-reduce)."""
        return all_written(self.job, self.device)

    def finish(self) -> Path:
        """Wait for every rank's writes, finalize, write the manifest, commit and prune (collective); returns the
        committed checkpoint. A failure removes the partial ``.tmp`` and raises :class:`CheckpointError` on every
        rank; ``latest`` still names the previous checkpoint."""
        from torch.distributed.checkpoint.api import CheckpointException

        tmp = self.root / (self.path.name + TMP)
        try:
            self.job.finalize()
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP reports a rank's failure on every rank
            self._fail(e)
        records = self._gather_records()

        def commit() -> None:
            if isinstance(records, BaseException):
                raise records
            _fsync_tree(tmp)
            files = dict(records, **manifest.records(tmp, [".metadata", disk.COMPLETE_MARKER]))
            manifest.write(tmp, self.step, self._run, files)
            disk.commit(self.root, tmp.name, self.path.name)
            disk.prune(self.root, self._keep_last, self._run, self.step, self._protect, manifest.run_of)

        on_rank0(self.groups, commit, f"cannot commit checkpoint '{self.path}'",
                 cleanup=lambda: disk.remove(self.root, tmp.name))
        return self.path

    def _gather_records(self) -> dict[str, dict] | BaseException:
        """Every rank's file records merged on rank 0 (a rank's failure to record them, as an error there)."""
        mine = ("error", f"rank {self.groups.rank}: {type(self.job.error).__name__}: {first_line(self.job.error)}") \
            if self.job.error is not None else ("ok", self.job.records)
        parts = [mine]
        if self.groups.world_size > 1:
            parts = [None] * self.groups.world_size if self.groups.rank == 0 else None
            dist.gather_object(mine, parts, dst=0)
        if self.groups.rank != 0:
            return {}
        errors = [text for kind, text in parts if kind == "error"]
        if errors:
            return CheckpointError(save_failure(RuntimeError(errors[0]), self.root, self.path))
        return {name: r for kind, rec in parts for name, r in rec.items()}

    def _fail(self, e: BaseException):
        if self.groups.rank == 0:
            with contextlib.suppress(OSError, CheckpointError):
                disk.remove(self.root, self.path.name + TMP)
        raise CheckpointError(save_failure(e, self.root, self.path)) from None


def start_save(root: str | Path, step: int, model: nn.Module, optimizer: TrainOptimizer,
               groups: ParallelGroups, common: dict[str, Any], per_rank: dict[str, Any], keep_last: int = 2,
               run: str = "", protect: tuple[str, ...] = (), background: bool = False) -> Saving:
    """Plan checkpoint ``step`` and write this rank's files into ``step_N.tmp`` (collective); with ``background``
    the files are written by a thread from a host copy of the state, so training may go on. ``run`` is the lineage
    id recorded in it and ``protect`` names checkpoints pruning must keep (both used on rank 0). Finish it with
    :meth:`Saving.finish`. A failed plan removes the partial ``.tmp`` and raises :class:`CheckpointError`."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    root = Path(root)
    tmp_name = step_name(step) + TMP
    on_rank0(groups, lambda: (disk.remove(root, tmp_name), (root / tmp_name).mkdir(parents=True)),
             f"cannot create '{root / tmp_name}'")
    optimizer.sync_params()
    sd = sharded_state_dict(model, groups, per_rank)
    sd.update(optimizer.state_for_save(model, groups))
    sd["common"] = dict(common, layout=_layout(groups), per_rank_keys=sorted(per_rank),
                        optim_step=optimizer.updates(), optim_main_params=optimizer.main_params_saved)
    saving = Saving(root, step, groups, None, keep_last, run, protect, next(model.parameters()).device)
    try:
        request = dist_checkpointing.save(sd, str(root / tmp_name), async_sharded_save=True, async_strategy="mcore")
        saving.job = WriteJob(request, root / tmp_name, background)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP reports a rank's failure on every rank
        saving._fail(e)
    return saving


def save(root: str | Path, step: int, model: nn.Module, optimizer: TrainOptimizer,
         groups: ParallelGroups, common: dict[str, Any], per_rank: dict[str, Any], keep_last: int = 2,
         run: str = "", protect: tuple[str, ...] = ()) -> Path:
    """:func:`start_save` and :meth:`Saving.finish` in one: write checkpoint ``step`` atomically (collective);
    returns its directory."""
    return start_save(root, step, model, optimizer, groups, common, per_rank, keep_last, run, protect).finish()


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    disk.fsync_dir(path)


def checkpoint_bytes(model: nn.Module, groups: ParallelGroups, with_optimizer: bool = True) -> int:
    """Bytes one checkpoint of ``model`` takes (weights in fp32, AdamW's two moments, buffers, 64 KiB per rank of
    metadata and RNG/data state); collective over the world."""
    copies = 3 if with_optimizer else 1
    local = sum(p.numel() * 4 * copies for _, p, spec in named_specs(model) if is_writer(spec, groups))
    if groups.tp_rank == 0 and groups.dp_rank == 0:
        local += sum(b.numel() * b.element_size() for b in _persistent_buffers(model).values())
    total = torch.tensor([float(local + (64 << 10))], dtype=torch.float64, device=next(model.parameters()).device)
    if groups.world_size > 1:
        dist.all_reduce(total)
    return int(total.item())


def load_common(ckpt_dir: str | Path) -> dict[str, Any]:
    """The common state (step, config, layout, counters) of a checkpoint, after checking the sizes of its files
    and the checksums of the small ones (:func:`checkpoint_manifest.problem`); allowlisted unpickling only."""
    from megatron.core import dist_checkpointing

    damaged = manifest.problem(Path(ckpt_dir), distcp=False)
    if damaged:
        raise CheckpointError(damaged)
    with _loading(ckpt_dir):
        return dist_checkpointing.load_common_state_dict(str(ckpt_dir))["common"]


@contextlib.contextmanager
def _loading(ckpt_dir: str | Path):
    """Restricted unpickling for a load; any failure becomes one :class:`CheckpointError` line."""
    from torch.distributed.checkpoint.api import CheckpointException

    from launcher.train.safe_load import NOT_ALLOWED, restricted_unpickling

    try:
        with restricted_unpickling():
            yield
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - every load failure becomes one line
        cause = root_cause(e)
        text = first_line(cause)
        if NOT_ALLOWED in text:  # torch DCP may re-raise a metadata error as text only
            what = re.split(r"[;,)\s]", text.split(NOT_ALLOWED, 1)[1], maxsplit=1)[0]
            raise CheckpointError(f"refusing to load '{ckpt_dir}': it holds a pickled object outside the checkpoint "
                                  f"allowlist ({what}); it was not written by moetron or was altered, so use "
                                  "another checkpoint") from None
        raise CheckpointError(f"cannot load checkpoint '{ckpt_dir}': {type(cause).__name__}: "
                              f"{first_line(cause)}") from None


def verify(ckpt_dir: Path, groups: ParallelGroups) -> None:
    """Check every file of the checkpoint against its manifest, each rank the checksums of its share of the
    ``.distcp`` files (collective); a damaged file raises the same :class:`CheckpointError` line on every rank."""
    damaged = manifest.problem(ckpt_dir, groups.rank, groups.world_size)
    if groups.world_size > 1:
        found: list[Optional[str]] = [None] * groups.world_size
        dist.all_gather_object(found, damaged)
        damaged = next((text for text in found if text), None)
    if damaged:
        raise CheckpointError(damaged)


def load(ckpt_dir: str | Path, model: nn.Module, optimizer: Optional[TrainOptimizer],
         groups: ParallelGroups, per_rank_templates: Optional[dict[str, Any]] = None) -> tuple[dict, dict]:
    """Load into ``model``/``optimizer`` in place (any layout). Returns (common, per_rank) with the per-rank objects
    that still apply (:func:`_per_rank_targets`). Only allowlisted types are unpickled
    (``safe_load.py``); a crafted or unreadable checkpoint raises :class:`CheckpointError`."""
    from megatron.core import dist_checkpointing

    common = load_common(ckpt_dir)
    verify(Path(ckpt_dir), groups)
    targets = _per_rank_targets(per_rank_templates or {}, set(common.get("per_rank_keys", ())),
                                common.get("layout"), groups)
    with_main = bool(common.get("optim_main_params", False))
    sd = sharded_state_dict(model, groups, loading=True)
    sd.update(targets)
    if optimizer is not None:
        sd.update(optimizer.state_for_load(model, groups, with_main))
    with _loading(ckpt_dir):
        # after a DP-size change every rank reads DP rank 0's data state and the others' stay unread, which
        # megatron-core's access check would take for a missing shard
        loaded = dist_checkpointing.load(sd, str(ckpt_dir), validate_access_integrity=_same_dp(common, groups))
    with torch.no_grad():
        for name, p, _ in named_specs(model):
            p.copy_(loaded[f"model.{name}"])
        for name, buf in _persistent_buffers(model).items():
            buf.copy_(loaded[f"buffer.{name}"])
        if optimizer is not None:
            optimizer.restore(loaded, model, int(common.get("optim_step", 0)), with_main)
    return common, {k: loaded[k] for k in targets}


_verified_whole: set[str] = set()
"""Checkpoints :func:`load_slices` has checked whole in this process (it reads one in many small batches)."""


def load_slices(ckpt_dir: str | Path, wanted: dict[Any, tuple[str, Optional[int], tuple[int, ...]]]) -> dict:
    """Read only some tensors of a checkpoint: ``wanted`` maps any key to (checkpoint key, row, shape): the whole
    fp32 tensor when ``row`` is None, else row ``row`` (shape ``[1, ...]``) of a ``shape[0]``-row tensor (one expert
    of a stack). Memory holds just these tensors (``moetron convert to-hf`` streams a checkpoint this way). The first
    call for a checkpoint checks all its files against the manifest (this process reads every checksum)."""
    from megatron.core.dist_checkpointing import ShardedTensor, load as dcp_load

    if str(Path(ckpt_dir).resolve()) not in _verified_whole:
        damaged = manifest.problem(Path(ckpt_dir))
        if damaged:
            raise CheckpointError(damaged)
        _verified_whole.add(str(Path(ckpt_dir).resolve()))
    sd = {}
    for handle, (key, row, shape) in wanted.items():
        if row is None:
            sd[handle] = ShardedTensor.from_rank_offsets(key, torch.empty(shape), replica_id=0)
        else:
            sd[handle] = ShardedTensor.from_rank_offsets(key, torch.empty(1, *shape[1:]), (0, row, shape[0]),
                                                         replica_id=0)
    with _loading(ckpt_dir):  # a subset: the rest of the checkpoint is deliberately not accessed
        return dcp_load(sd, str(ckpt_dir), validate_access_integrity=False)


def persistent_buffer_names(model: nn.Module) -> set[str]:
    """Names of the buffers a checkpoint holds (under ``buffer.<name>``; parameters are under ``model.<name>``)."""
    return set(_persistent_buffers(model))


def _saved_dp(layout: dict) -> int:
    return layout["world"] // (layout["tp"] * layout["pp"])


def _same_dp(common: dict, groups: ParallelGroups) -> bool:
    return not common.get("layout") or _saved_dp(common["layout"]) == groups.dp_size


def _per_rank_targets(templates: dict[str, Any], saved_keys: set[str], saved_layout: Optional[dict],
                      groups: ParallelGroups) -> dict[str, Any]:
    """The per-rank objects this rank can restore from a checkpoint written at ``saved_layout``: per-global-rank ones
    (RNG) only at the same layout; per-data-parallel-rank ones (``dp.*``, the data position) always: this DP rank's
    own when the DP size is unchanged (TP/PP/EP may differ: exact), else DP rank 0's, from whose global sample count
    the loader derives this rank's position."""
    from megatron.core.dist_checkpointing import ShardedObject

    if not saved_layout:
        return {}
    saved_dp = _saved_dp(saved_layout)
    targets = {}
    for key, value in templates.items():
        if key not in saved_keys:
            continue
        if key.startswith("dp."):  # replica 0 on exactly one of the ranks that read the same object
            own = saved_dp == groups.dp_size
            targets[key] = ShardedObject(key, value, (saved_dp,), (groups.dp_rank if own else 0,),
                                         replica_id=groups.tp_rank * groups.pp_size + groups.pp_rank if own
                                         else groups.rank)
        elif saved_layout == _layout(groups):
            targets[key] = ShardedObject(key, value, (groups.world_size,), (groups.rank,), replica_id=0)
    return targets


