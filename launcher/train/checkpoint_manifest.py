"""Each checkpoint's manifest ``moetron.json``: its step, the id of the run (lineage) that wrote it, and the size and
CRC-32 of every file in it, so that a truncated or altered file is found before anything reads it.

Save: every rank records the files it wrote (:func:`records`, right after writing them, while they are in the page
cache); rank 0 gathers the records, adds the files written last (``.metadata``, ``metadata.json``), checks that
they cover every file of the directory and writes the manifest before the directory is committed
(``checkpoint.save``). Load: :func:`problem` compares the size of every file and the checksums of a rank's share
of them; ``checkpoint.load`` runs it on every rank (each file is read by one rank), ``checkpoint.load_common`` for
the sizes and the small files it reads itself. CRC-32 (zlib, streamed in 4 MiB chunks; about 6 GB/s on one core)
finds damage (truncation, bit rot, an overwritten or replaced file), not a deliberate forgery; unpickling is
allowlisted regardless (``safe_load.py``).

Manifest::

    {"step": 200, "run": "3d559d5d48f2", "files": {"__0_0.distcp": {"bytes": 622862, "crc32": "1c291ca3"}, ...}}
"""
from __future__ import annotations

import json
import logging
import os
import re
import stat
import zlib
from pathlib import Path
from typing import Optional

from launcher.train.checkpoint_root import CheckpointError

log = logging.getLogger(__name__)
MANIFEST = "moetron.json"
_CHUNK = 4 << 20
_MAX_MANIFEST_BYTES = 64 << 20
_FILE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_legacy_warned: set[str] = set()


def file_record(path: Path) -> dict:
    """``{"bytes": size, "crc32": 8 hex digits}`` of the file at ``path``, read in 4 MiB chunks."""
    crc, size = 0, 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return {"bytes": size, "crc32": f"{crc:08x}"}


def records(directory: Path, names: list[str]) -> dict[str, dict]:
    """:func:`file_record` of each of ``names`` in ``directory``."""
    return {name: file_record(directory / name) for name in names}


def write(directory: Path, step: int, run: str, files: dict[str, dict]) -> None:
    """Write the manifest of the checkpoint being committed in ``directory`` (fsynced). Raises
    :class:`CheckpointError` when ``files`` does not cover every file there (a rank's files went unrecorded)."""
    present = {p.name for p in directory.iterdir()} - {MANIFEST}
    if present != set(files):
        odd = sorted(present ^ set(files))
        raise CheckpointError(f"checkpoint '{directory}' cannot be committed: its files and the records of what the "
                              f"ranks wrote differ ({', '.join(odd[:3])}); it was left uncommitted, the previous "
                              "checkpoint stays 'latest'")
    with open(directory / MANIFEST, "w") as fh:
        json.dump({"step": step, "run": run, "files": dict(sorted(files.items()))}, fh)
        fh.flush()
        os.fsync(fh.fileno())


def read(ckpt: Path) -> Optional[dict]:
    """The manifest of ``ckpt``; None when it has none. Raises :class:`CheckpointError` when it is not one."""
    path = ckpt / MANIFEST
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointError(f"cannot read '{path}': {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_MANIFEST_BYTES:
            raise ValueError("not a regular file of at most 64 MiB")
        value = json.loads(path.read_bytes())
        files = value.get("files", {})
        if not isinstance(value.get("step"), int) or not isinstance(files, dict) or not all(
                isinstance(name, str) and _FILE_NAME.fullmatch(name) and name not in (".", "..")
                and isinstance(r, dict) and isinstance(r.get("bytes"), int)
                and isinstance(r.get("crc32"), str) for name, r in files.items()):
            raise ValueError("unexpected structure")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"'{path}' is not a moetron checkpoint manifest ({e}): the checkpoint was altered; "
                              "use another one") from None
    return value


def run_of(ckpt: Path) -> str:
    """The run (lineage) id recorded in ``ckpt``'s manifest; "" when there is none or it is unreadable."""
    try:
        value = read(Path(ckpt))
    except CheckpointError:
        return ""
    return str(value.get("run", "")) if value else ""


def problem(ckpt: Path, rank: int = 0, world: int = 1, distcp: bool = True) -> Optional[str]:
    """What is wrong with the bytes of ``ckpt`` (one line), or None. Checks the size of every file the manifest
    lists and the checksums of the small files and, with ``distcp``, of the ``.distcp`` files ``i`` with
    ``i % world == rank``. A checkpoint without checksums (saved by an older moetron) is loaded with a warning."""
    ckpt = Path(ckpt)
    manifest = read(ckpt)
    if manifest is None or "files" not in manifest:
        if str(ckpt) not in _legacy_warned and rank == 0:
            _legacy_warned.add(str(ckpt))
            log.warning(f"'{ckpt}' has no file checksums (saved before moetron recorded them): its bytes are not "
                        "verified")
        return None
    files = manifest["files"]
    shards = [name for name in sorted(files) if name.endswith(".distcp")]
    mine = {name for name in files if not name.endswith(".distcp")}
    if distcp:
        mine |= set(shards[rank::world])
    for name in sorted(files):
        found = _mismatch(ckpt / name, files[name], name in mine)
        if found:
            return (f"checkpoint '{ckpt}' is damaged: '{name}' {found}; it was truncated or altered after it was "
                    "saved: use another checkpoint (an earlier step_NNNNNNN) or restore the file")
    return None


def _mismatch(path: Path, expected: dict, checksum: bool) -> Optional[str]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "is missing"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_size != expected["bytes"]:
        return f"has {st.st_size:,} bytes, the manifest {MANIFEST} says {expected['bytes']:,}"
    if checksum:
        actual = file_record(path)["crc32"]
        if actual != expected["crc32"]:
            return f"has CRC-32 {actual}, the manifest {MANIFEST} says {expected['crc32']}"
    return None
