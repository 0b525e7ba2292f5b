"""Distributed checkpoints (megatron-core ``dist_checkpointing``) that resume exactly and reshard.

Layout of ``<root>``::

    step_0000100/        a complete checkpoint (megatron-core torch_dist format + moetron.json: step, run id)
    step_0000200.tmp/    being written (or, ``*.removing.tmp``, being deleted); never read, removed at start
    step_0000200.new/    a complete re-save of the step ``latest`` names, for the moment it replaces it
    latest               text file naming the checkpoint to resume from

Atomicity: every rank writes into ``step_N.tmp``; after a barrier rank 0 fsyncs it, renames it to ``step_N`` and
then replaces ``latest`` through a temp file + ``os.replace``. Re-saving the step ``latest`` names goes through
``step_N.new``: ``latest`` names the new copy before the old one is removed (:func:`_commit`). Directories are
deleted by renaming them to ``*.removing.tmp`` first, so no half-deleted checkpoint keeps a checkpoint name. A kill
at any point leaves ``latest`` naming a complete checkpoint (or nothing); ``prepare`` finishes or rolls back an
interrupted commit and removes ``*.tmp`` at the next start.

Runs: each checkpoint records the id of the run (lineage) that wrote it; a resumed run keeps its checkpoint's id,
a ``resume=never`` run starts a new one and detaches ``latest``. ``keep_last`` prunes only the run's own
checkpoints, never the one ``latest`` names nor the protected one (the newest saved before a non-finite streak).
Loading unpickles only allowlisted types (``safe_load.py``); the model/MoE config must match on resume.

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
import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from launcher.errors import MoetronError
from parallel.groups import ParallelGroups
from parallel.optim.optimizer import TrainOptimizer
from parallel.sharding import is_writer, named_specs, sharded_tensor

log = logging.getLogger(__name__)
LATEST = "latest"
SIDECAR = "moetron.json"
TMP, NEW = ".tmp", ".new"
_STEP_DIR = re.compile(r"^step_(\d{7})$")
RESUME_MAY_DIFFER = ("moe.dispatcher", "moe.llep", "moe.mone.backend", "moe.matryoshka.eval_k", "moe.aux_loss_coeff",
                     "moe.aux_loss_scope", "moe.z_loss_coeff", "moe.expert_bias_update_rate",
                     "moe.mone.balance_loss_coeff")
"""model.*/moe.* keys a resumed run may change: how tokens travel, which kernel runs, and the weights of the
auxiliary losses (training settings, not the model that is computed)."""


class CheckpointError(MoetronError):
    """A checkpoint directory or checkpoint cannot be used; the message is one line: what, and what to do."""

    kind = "checkpoint"


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


def save(root: str | Path, step: int, model: nn.Module, optimizer: TrainOptimizer,
         groups: ParallelGroups, common: dict[str, Any], per_rank: dict[str, Any], keep_last: int = 2,
         run: str = "", protect: tuple[str, ...] = ()) -> Path:
    """Write checkpoint ``step`` atomically (collective over the world); returns its directory. ``run`` is the
    lineage id recorded in it and ``protect`` names checkpoints pruning must keep (both used on rank 0). A failed
    write (e.g. ENOSPC) removes the partial ``.tmp`` and raises :class:`CheckpointError` on every rank."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    root = Path(root)
    final, tmp = root / step_name(step), root / (step_name(step) + TMP)
    _on_rank0(groups, lambda: (_remove(tmp), tmp.mkdir(parents=True)), f"cannot create '{tmp}'")
    optimizer.sync_params()
    sd = sharded_state_dict(model, groups, per_rank)
    sd.update(optimizer.state_for_save(model, groups))
    sd["common"] = dict(common, layout=_layout(groups), per_rank_keys=sorted(per_rank),
                        optim_step=optimizer.updates(), optim_main_params=optimizer.main_params_saved)
    try:
        dist_checkpointing.save(sd, str(tmp))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP reports a rank's failure on every rank
        if groups.rank == 0:
            _remove(tmp)
        raise CheckpointError(_save_failure(e, root, final)) from None
    dist.barrier()

    def commit() -> None:
        _fsync_tree(tmp)
        _write_json(tmp / SIDECAR, {"step": step, "run": run})
        _commit(root, tmp, final)
        _prune(root, keep_last, run, step, protect)

    _on_rank0(groups, commit, f"cannot commit checkpoint '{final}'", cleanup=lambda: _remove(tmp))
    return final


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def _on_rank0(groups: ParallelGroups, fn, what: str, cleanup=None) -> None:
    """Run ``fn`` on rank 0 (collective); an OSError there raises :class:`CheckpointError` on every rank."""
    error = None
    if groups.rank == 0:
        try:
            fn()
        except OSError as e:
            if cleanup is not None:
                with contextlib.suppress(OSError):
                    cleanup()
            error = f"{what}: {_os_reason(e)}"
    if groups.world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise CheckpointError(error)


def _os_reason(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, "")
    reason = f"{e.strerror or e} ({name})" if name else str(e)
    return f"{reason}: '{e.filename}'" if e.filename else reason


def _save_failure(e: BaseException, root: Path, final: Path) -> str:
    """One line for a failed ``dist_checkpointing.save``: ENOSPC anywhere in the failure (or a full disk) is said
    as such; anything else by its innermost message."""
    cause = _root_cause(e)
    free = _free_bytes(root)
    no_space = (isinstance(cause, OSError) and cause.errno == errno.ENOSPC) or "No space left" in str(e) \
        or (free is not None and free < 1 << 20)
    what = (f"no space left on device ({free:,} bytes free)" if no_space and free is not None else
            "no space left on device" if no_space else f"{type(cause).__name__}: {_first_line(cause)}")
    return (f"saving checkpoint '{final}' failed: {what}; its partial {final.name}{TMP} was removed and "
            f"'{root / LATEST}' still names the last complete checkpoint: free space (or lower "
            "checkpoint.keep_last) and restart to resume from it")


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception of ``e``, following DCP's per-rank failures and ``__cause__``/``__context__``."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict) and failures:
            e = next(iter(failures.values()))[0]
        elif e.__cause__ is not None or e.__context__ is not None:
            e = e.__cause__ or e.__context__
        else:
            break
    return e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _free_bytes(path: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, value: dict) -> None:
    with open(path, "w") as fh:
        json.dump(value, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f"{LATEST}{TMP}"
    with open(tmp, "w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def _latest_name(root: Path) -> Optional[str]:
    marker = root / LATEST
    return marker.read_text().strip() if marker.is_file() else None


def _remove(path: Path) -> None:
    """Delete a directory so that no crash leaves it half-deleted under a checkpoint name: rename to
    ``*.removing.tmp`` (atomic), then delete."""
    if not path.exists():
        return
    if not path.name.endswith(TMP):
        trash = path.with_name(f"{path.name}.removing{TMP}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        path = trash
    shutil.rmtree(path)


def _commit(root: Path, tmp: Path, final: Path) -> None:
    """Give the complete ``tmp`` the name ``final`` and point ``latest`` at it; ``latest`` names a complete
    checkpoint at every instant. When ``final`` exists and ``latest`` names it, the new copy first becomes
    ``final.new`` and ``latest`` names that while the old copy is removed (:func:`find_latest` maps a missing
    ``X.new`` to ``X`` for the one rename in between)."""
    if final.exists() and _latest_name(root) == final.name:
        staged = final.with_name(final.name + NEW)
        _remove(staged)
        os.replace(tmp, staged)
        _write_latest(root, staged.name)
        tmp = staged
    _remove(final)  # an older copy of this step that `latest` does not name (another run, an abandoned branch)
    os.replace(tmp, final)
    _write_latest(root, final.name)


def run_of(ckpt: Path) -> str:
    """The run (lineage) id recorded in checkpoint ``ckpt``; "" for checkpoints written before ids existed."""
    try:
        return str(json.loads((Path(ckpt) / SIDECAR).read_text()).get("run", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _checkpoints(root: Path) -> dict[int, Path]:
    """Committed checkpoints under ``root`` by step."""
    out = {}
    for p in root.iterdir() if root.is_dir() else ():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return out


def _prune(root: Path, keep_last: int, run: str, step: int, protect: tuple[str, ...]) -> None:
    """Keep the newest ``keep_last`` checkpoints of run ``run`` up to ``step`` (0 keeps all) plus ``latest``'s and
    the protected ones; the run's checkpoints above ``step`` are an abandoned branch (``latest`` was moved back)
    and go too. Other runs' checkpoints are never touched."""
    if keep_last <= 0:
        return
    keep = {_latest_name(root), *protect}
    mine = sorted((s, p) for s, p in _checkpoints(root).items() if run_of(p) == run)
    live = [p for s, p in mine if s <= step]
    doomed = live[:-keep_last] + [p for s, p in mine if s > step]
    for p in doomed:
        if p.name not in keep:
            _remove(p)


def find_latest(root: str | Path) -> Optional[Path]:
    """The checkpoint ``<root>/latest`` names; None when there is no ``latest``. Raises :class:`CheckpointError`
    when ``latest`` names a directory that does not exist (never silently starts over)."""
    root = Path(root)
    name = _latest_name(root)
    if name is None:
        return None
    for candidate in (root / name, root / name.removesuffix(NEW)):
        if candidate.is_dir():
            return candidate
    raise CheckpointError(f"'{root / LATEST}' names '{name}', which does not exist: restore that checkpoint, or "
                          f"remove '{root / LATEST}' to start from scratch")


def set_latest(root: str | Path, ckpt: Path, groups: ParallelGroups) -> None:
    """Point ``latest`` at the complete checkpoint ``ckpt`` (collective; rank 0 writes)."""
    _on_rank0(groups, lambda: _write_latest(Path(root), ckpt.name), f"cannot update '{Path(root) / LATEST}'")


def prepare(root: str | Path, groups: ParallelGroups, resume: bool,
            writable: tuple[Path, ...] = ()) -> Optional[Path]:
    """Start of a training run (collective): check that ``root`` and ``writable`` can be written, finish or roll
    back a commit a kill interrupted, remove ``*.tmp`` left by killed saves, and return the checkpoint to resume
    from (None when ``resume`` is false: ``latest`` is then detached, so this directory belongs to the new run)."""
    root = Path(root)

    def tidy() -> None:
        for d in (root, *writable):
            _probe_writable(Path(d))
        name = _latest_name(root)
        if name is not None and name.endswith(NEW):  # killed inside _commit: finish it
            staged, final = root / name, root / name.removesuffix(NEW)
            if staged.is_dir():
                _remove(final)
                os.replace(staged, final)
            _write_latest(root, final.name)
        for p in root.iterdir():
            if p.is_dir() and (p.name.endswith(TMP) or p.name.endswith(NEW)) and p.name.startswith("step_"):
                _remove(p)
        (root / f"{LATEST}{TMP}").unlink(missing_ok=True)
        if not resume and (root / LATEST).exists():
            others = sorted(p.name for p in _checkpoints(root).values())
            os.remove(root / LATEST)
            log.info(f"checkpoint.resume=never: '{root}' holds checkpoints of an earlier run "
                     f"({', '.join(others) or 'none'}); 'latest' no longer names them, they are kept until this run "
                     "saves the same step")

    _on_rank0(groups, tidy, "checkpoint directory not usable")
    return find_latest(root) if resume else None


def _probe_writable(path: Path) -> None:
    """Create ``path`` if missing; raise OSError unless this process may create files in it (``access(2)``: also
    false on a read-only mount, even for root). Writes nothing when it exists."""
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise OSError(errno.EROFS if _read_only_mount(path) else errno.EACCES, "not writable", str(path))


def _read_only_mount(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


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


def preflight_space(root: str | Path, groups: ParallelGroups, per_checkpoint: int, saves: int, keep_last: int,
                    run: str) -> None:
    """Raise :class:`CheckpointError` (every rank) unless ``root`` has room for what this run will write: ``saves``
    checkpoints of ``per_checkpoint`` bytes, of which at most ``keep_last`` + 1 exist at once (the one being
    written before pruning) counting run ``run``'s checkpoints already there."""
    root = Path(root)

    def check() -> None:
        existing = sum(1 for p in _checkpoints(root).values() if run_of(p) == run)
        count = saves if keep_last <= 0 else min(saves, max(1, keep_last + 1 - existing))
        free, need = _free_bytes(root), per_checkpoint * count
        if free is not None and free < need:
            raise OSError(errno.ENOSPC, f"{free:,} bytes free but this run needs {need:,} bytes ({count} more "
                                        f"checkpoint(s) of {per_checkpoint:,} bytes with checkpoint.keep_last="
                                        f"{keep_last}): free space, lower checkpoint.keep_last or use another "
                                        "checkpoint.dir")

    if saves > 0:
        _on_rank0(groups, check, f"checkpoint.dir '{root}' is too small")


def load_common(ckpt_dir: str | Path) -> dict[str, Any]:
    """The common state (step, config, layout, counters) of a checkpoint; allowlisted unpickling only."""
    from megatron.core import dist_checkpointing

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
        cause = _root_cause(e)
        text = _first_line(cause)
        if NOT_ALLOWED in text:  # torch DCP may re-raise a metadata error as text only
            what = re.split(r"[;,)\s]", text.split(NOT_ALLOWED, 1)[1], maxsplit=1)[0]
            raise CheckpointError(f"refusing to load '{ckpt_dir}': it holds a pickled object outside the checkpoint "
                                  f"allowlist ({what}); it was not written by moetron or was altered, so use "
                                  "another checkpoint") from None
        raise CheckpointError(f"cannot load checkpoint '{ckpt_dir}': {type(cause).__name__}: "
                              f"{_first_line(cause)}") from None


def config_differences(saved: dict, current: dict) -> list[str]:
    """``key saved -> current`` for every model.* / moe.* value that differs (except :data:`RESUME_MAY_DIFFER`);
    keys one side lacks (older checkpoints) are not compared."""
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    return [f"{key} {flat_saved[key]!r} -> {flat_current[key]!r}" for key in sorted(flat_saved)
            if key.split(".")[0] in ("model", "moe") and key in flat_current
            and not any(key == k or key.startswith(k + ".") for k in RESUME_MAY_DIFFER)
            and flat_saved[key] != flat_current[key]]


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load(ckpt_dir: str | Path, model: nn.Module, optimizer: Optional[TrainOptimizer],
         groups: ParallelGroups, per_rank_templates: Optional[dict[str, Any]] = None) -> tuple[dict, dict]:
    """Load into ``model``/``optimizer`` in place (any layout). Returns (common, per_rank) with the per-rank objects
    that still apply (:func:`_per_rank_targets`). Only allowlisted types are unpickled
    (``safe_load.py``); a crafted or unreadable checkpoint raises :class:`CheckpointError`."""
    from megatron.core import dist_checkpointing

    common = load_common(ckpt_dir)
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


def load_slices(ckpt_dir: str | Path, wanted: dict[Any, tuple[str, Optional[int], tuple[int, ...]]]) -> dict:
    """Read only some tensors of a checkpoint: ``wanted`` maps any key to (checkpoint key, row, shape): the whole
    fp32 tensor when ``row`` is None, else row ``row`` (shape ``[1, ...]``) of a ``shape[0]``-row tensor (one expert
    of a stack). Memory holds just these tensors (``moetron convert to-hf`` streams a checkpoint this way)."""
    from megatron.core.dist_checkpointing import ShardedTensor, load as dcp_load

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


