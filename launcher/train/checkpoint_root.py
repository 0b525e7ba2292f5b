"""The checkpoint root's directory protocol: the ``latest`` pointer, committing ``step_N.tmp`` as ``step_N``,
removing and pruning checkpoints, and tidying up after a kill (``launcher/train/checkpoint.py`` says what is in a
checkpoint; ``checkpoint_manifest.py`` checks its bytes).

Every name read from disk is hostile until checked. ``latest`` must be a regular file holding one
``step_NNNNNNN`` (``step_NNNNNNN.new`` for the instant of a re-save's commit) that names a real directory (not a
symbolic link) directly inside the root holding a complete checkpoint; anything else is one
:class:`CheckpointError` line raised before anything is touched. Deletion goes through :func:`remove` only, which
deletes nothing but real directories directly inside the root that carry a name this protocol gives (``step_N``,
``step_N.tmp``, ``step_N.new``, ``*.removing.tmp``) and never follows a symbolic link; pruning also requires
the checkpoint's manifest to name the pruning run as its writer.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Optional

from launcher.errors import MoetronError

LATEST = "latest"
TMP, NEW, REMOVING = ".tmp", ".new", ".removing.tmp"
_STEP = re.compile(r"step_(\d{7})")
_POINTER = re.compile(rb"step_\d{7}(?:\.new)?")
_LEFTOVER = re.compile(r"step_\d{7}(?:\.new)?(?:\.tmp|\.removing\.tmp)?")
"""Names the protocol creates (``step_N.tmp`` being written, ``step_N.new`` a staged re-save, ``*.removing.tmp``
being deleted) besides the committed ``step_N``; only these are ever deleted."""
_MAX_POINTER_BYTES = 64
COMPLETE_MARKER = "metadata.json"
"""megatron-core writes it last (after every rank's files and ``.metadata``): a directory without it is no
checkpoint."""


class CheckpointError(MoetronError):
    """A checkpoint directory or checkpoint cannot be used; the message is one line: what, and what to do."""

    kind = "checkpoint"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def os_reason(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, "")
    reason = f"{e.strerror or e} ({name})" if name else str(e)
    return f"{reason}: '{e.filename}'" if e.filename else reason


def _kind(mode: int) -> str:
    return ("a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode)
            else "a regular file" if stat.S_ISREG(mode) else "a special file")


def _lstat(path: Path) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _pointer_error(root: Path, what: str) -> CheckpointError:
    marker = root / LATEST
    return CheckpointError(f"'{marker}' {what}; it must be a file naming a checkpoint directory inside '{root}' "
                           f"(step_NNNNNNN): write the name of one of them into it, or remove it to start from "
                           "scratch (nothing was changed)")


def read_pointer(root: Path) -> Optional[str]:
    """The checkpoint name ``<root>/latest`` holds (``step_NNNNNNN`` or ``step_NNNNNNN.new``); None when there is
    no ``latest``. Raises :class:`CheckpointError` for anything else (a directory, a symbolic link, binary or
    empty content, a path, a ``.tmp`` name) without touching anything."""
    marker = root / LATEST
    try:
        st = _lstat(marker)
        if st is None:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise _pointer_error(root, f"is {_kind(st.st_mode)}")
        with open(marker, "rb") as fh:
            raw = fh.read(_MAX_POINTER_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"cannot read '{marker}': {os_reason(e)}") from None
    name = raw.strip()
    if not _POINTER.fullmatch(name):
        shown = repr(raw[:40]) + ("..." if len(raw) > 40 else "")
        raise _pointer_error(root, "is empty" if not name else f"holds {shown}, not a checkpoint name")
    return name.decode("ascii")


def checkpoint_dir_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a real directory (no symbolic link) holding a complete checkpoint; None when it is."""
    st = _lstat(path)
    if st is None:
        return "does not exist"
    if not stat.S_ISDIR(st.st_mode):
        return f"is {_kind(st.st_mode)}, not a checkpoint directory (links are not followed)"
    marker = _lstat(path / COMPLETE_MARKER)
    if marker is None or not stat.S_ISREG(marker.st_mode):
        return f"is not a complete checkpoint (it has no {COMPLETE_MARKER})"
    return None


def find_latest(root: str | Path) -> Optional[Path]:
    """The checkpoint ``<root>/latest`` names; None when there is no ``latest``. Raises :class:`CheckpointError`
    when ``latest`` is not a checkpoint name (:func:`read_pointer`) or names no complete checkpoint directory
    (never silently starts over). A missing ``X.new`` means ``X`` (a commit killed between its last renames)."""
    root = Path(root)
    name = read_pointer(root)
    if name is None:
        return None
    candidate = name if name == name.removesuffix(NEW) or _lstat(root / name) is not None else name.removesuffix(NEW)
    problem = checkpoint_dir_problem(root / candidate)
    if problem:
        raise _pointer_error(root, f"names '{candidate}', which {problem}")
    return root / candidate


def committed(root: Path) -> dict[int, Path]:
    """Committed checkpoints under ``root`` by step: real directories (no links) named ``step_NNNNNNN``."""
    out = {}
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        with os.scandir(root) as entries:
            for entry in entries:
                m = _STEP.fullmatch(entry.name)
                if m and entry.is_dir(follow_symlinks=False):
                    out[int(m.group(1))] = root / entry.name
    return out


def remove(root: Path, name: str) -> None:
    """Delete the checkpoint-protocol directory ``<root>/<name>`` so that no crash leaves it half-deleted under a
    checkpoint name: rename to ``*.removing.tmp`` (atomic), then delete. Only a real directory with a protocol name
    is deleted; anything else there (a link, a file) raises :class:`CheckpointError` and stays."""
    if not _LEFTOVER.fullmatch(name):
        raise CheckpointError(f"refusing to delete '{root / name}': not a name moetron gives checkpoints")
    path = root / name
    st = _lstat(path)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"'{path}' is {_kind(st.st_mode)}, not a checkpoint directory moetron wrote; moetron "
                              f"never deletes it: move it out of '{root}'")
    if not name.endswith(TMP):
        trash = name + REMOVING
        remove(root, trash)
        os.replace(path, root / trash)
        path = root / trash
    shutil.rmtree(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_latest(root: Path, name: str) -> None:
    """Point ``latest`` at ``name`` atomically (temp file + ``os.replace``, which replaces a link itself, never
    what it points at)."""
    tmp = root / f"{LATEST}{TMP}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    with open(tmp, "x") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / LATEST)
    fsync_dir(root)


def commit(root: Path, tmp_name: str, final_name: str) -> None:
    """Give the complete ``<root>/<tmp_name>`` the name ``final_name`` and point ``latest`` at it; ``latest`` names a
    complete checkpoint at every instant. When the final name exists and ``latest`` names it, the new copy first
    becomes ``final.new`` and ``latest`` names that while the old copy is removed (:func:`find_latest` maps a missing
    ``X.new`` to ``X`` for the one rename in between)."""
    if _lstat(root / final_name) is not None and read_pointer(root) == final_name:
        staged = final_name + NEW
        remove(root, staged)
        os.replace(root / tmp_name, root / staged)
        write_latest(root, staged)
        tmp_name = staged
    remove(root, final_name)  # an older copy of this step that `latest` does not name (another run, a branch)
    os.replace(root / tmp_name, root / final_name)
    write_latest(root, final_name)


def prune(root: Path, keep_last: int, run: str, step: int, protect: tuple[str, ...], run_of) -> None:
    """Keep the newest ``keep_last`` checkpoints of run ``run`` up to ``step`` (0 keeps all) plus ``latest``'s and
    the protected ones; the run's checkpoints above ``step`` are an abandoned branch (``latest`` was moved back) and
    go too. Only checkpoints whose manifest (``run_of(path)``) names ``run`` are candidates: other runs', and
    anything moetron did not write, are never touched."""
    if keep_last <= 0 or not run:
        return
    keep = {read_pointer(root), *protect}
    mine = sorted((s, p) for s, p in committed(root).items() if run_of(p) == run)
    doomed = [p for s, p in mine if s <= step][:-keep_last] + [p for s, p in mine if s > step]
    for p in doomed:
        if p.name not in keep:
            remove(root, p.name)


def tidy(root: Path, resume: bool) -> Optional[list[str]]:
    """Start of a run (rank 0): check ``latest`` and what it names (:func:`find_latest`, before touching anything),
    finish or roll back a commit a kill interrupted, remove the protocol's leftovers (``*.tmp``, ``*.new``) and,
    unless ``resume``, detach ``latest``. Returns the committed checkpoints ``latest`` no longer names after a
    detach, else None."""
    find_latest(root)
    name = read_pointer(root)
    if name is not None and name.endswith(NEW):  # killed inside commit(): finish it
        final = name.removesuffix(NEW)
        if _lstat(root / name) is not None:
            remove(root, final)
            os.replace(root / name, root / final)
        write_latest(root, final)
    with os.scandir(root) as entries:
        leftovers = [e.name for e in entries if e.is_dir(follow_symlinks=False) and e.name.endswith((TMP, NEW))
                     and _LEFTOVER.fullmatch(e.name)]
    for leftover in leftovers:
        remove(root, leftover)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(root / f"{LATEST}{TMP}")
    if resume or name is None:
        return None
    os.unlink(root / LATEST)
    return sorted(p.name for p in committed(root).values())
