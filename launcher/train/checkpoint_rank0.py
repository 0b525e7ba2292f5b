"""Rank 0's work on the checkpoint root, made collective: every file operation of ``checkpoint_root.py`` runs on rank
0 only, and its failure reaches every rank as the same one-line :class:`CheckpointError` (:func:`on_rank0`). Here:
the start of a run (:func:`prepare`, :func:`preflight_space`), moving ``latest`` (:func:`set_latest`) and the
one-line account of a failed save (:func:`save_failure`)."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

from launcher.train import checkpoint_root as disk
from launcher.train.checkpoint_manifest import run_of
from launcher.train.checkpoint_root import LATEST, TMP, CheckpointError, os_reason
from parallel.groups import ParallelGroups

log = logging.getLogger(__name__)


def on_rank0(groups: ParallelGroups, fn: Callable[[], None], what: str,
             cleanup: Optional[Callable[[], None]] = None) -> None:
    """Run ``fn`` on rank 0 (collective); an OSError or :class:`CheckpointError` there (after ``cleanup``) raises
    :class:`CheckpointError` on every rank."""
    error = None
    if groups.rank == 0:
        try:
            fn()
        except (OSError, CheckpointError) as e:
            if cleanup is not None:
                with contextlib.suppress(OSError, CheckpointError):
                    cleanup()
            error = str(e) if isinstance(e, CheckpointError) else f"{what}: {os_reason(e)}"
    if groups.world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise CheckpointError(error)


def prepare(root: str | Path, groups: ParallelGroups, resume: bool,
            writable: tuple[Path, ...] = ()) -> Optional[Path]:
    """Start of a training run (collective): check that ``root`` and ``writable`` can be written and that ``latest``
    is sound (:func:`checkpoint_root.read_pointer`: a hostile one is one line, nothing touched), finish or roll back
    a commit a kill interrupted, remove ``*.tmp`` left by killed saves, and return the checkpoint to resume from
    (None when ``resume`` is false: ``latest`` is then detached, so this directory belongs to the new run)."""
    root = Path(root)

    def tidy() -> None:
        for d in (root, *writable):
            _probe_writable(Path(d))
        detached = disk.tidy(root, resume)
        if detached is not None:
            log.info(f"checkpoint.resume=never: '{root}' holds checkpoints of an earlier run "
                     f"({', '.join(detached) or 'none'}); 'latest' no longer names them, they are kept until this "
                     "run saves the same step")

    on_rank0(groups, tidy, "checkpoint directory not usable")
    return disk.find_latest(root) if resume else None


def _probe_writable(path: Path) -> None:
    """Create ``path`` if missing; raise OSError unless this process may create files in it (``access(2)``: also
    false on a read-only mount, even for root). Writes nothing when it exists."""
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise OSError(errno.EROFS if _read_only_mount(path) else errno.EACCES, "not writable", str(path))


def _read_only_mount(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def set_latest(root: str | Path, ckpt: Path, groups: ParallelGroups) -> None:
    """Point ``latest`` at the complete checkpoint ``ckpt`` (collective; rank 0 writes)."""
    on_rank0(groups, lambda: disk.write_latest(Path(root), ckpt.name), f"cannot update '{Path(root) / LATEST}'")


def free_bytes(path: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def preflight_space(root: str | Path, groups: ParallelGroups, per_checkpoint: int, saves: int, keep_last: int,
                    run: str) -> None:
    """Raise :class:`CheckpointError` (every rank) unless ``root`` has room for what this run will write: ``saves``
    checkpoints of ``per_checkpoint`` bytes, of which at most ``keep_last`` + 1 exist at once (the one being
    written before pruning) counting run ``run``'s checkpoints already there."""
    root = Path(root)

    def check() -> None:
        existing = sum(1 for p in disk.committed(root).values() if run_of(p) == run)
        count = saves if keep_last <= 0 else min(saves, max(1, keep_last + 1 - existing))
        free, need = free_bytes(root), per_checkpoint * count
        if free is not None and free < need:
            raise OSError(errno.ENOSPC, f"{free:,} bytes free but this run needs {need:,} bytes ({count} more "
                                        f"checkpoint(s) of {per_checkpoint:,} bytes with checkpoint.keep_last="
                                        f"{keep_last}): free space, lower checkpoint.keep_last or use another "
                                        "checkpoint.dir")

    if saves > 0:
        on_rank0(groups, check, f"checkpoint.dir '{root}' is too small")


def save_failure(e: BaseException, root: Path, final: Path) -> str:
    """One line for a failed save: ENOSPC anywhere in the failure (or a full disk) is said as such; anything else
    by its innermost message."""
    cause = root_cause(e)
    if isinstance(cause, CheckpointError):
        return str(cause)
    free = free_bytes(root)
    no_space = (isinstance(cause, OSError) and cause.errno == errno.ENOSPC) or "No space left" in str(e) \
        or (free is not None and free < 1 << 20)
    what = (f"no space left on device ({free:,} bytes free)" if no_space and free is not None else
            "no space left on device" if no_space else f"{type(cause).__name__}: {first_line(cause)}")
    return (f"saving checkpoint '{final}' failed: {what}; its partial {final.name}{TMP} was removed and "
            f"'{root / LATEST}' still names the last complete checkpoint: free space (or lower "
            "checkpoint.keep_last) and restart to resume from it")


def root_cause(e: BaseException) -> BaseException:
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


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
