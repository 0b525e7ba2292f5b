"""Where ``moetron preprocess`` writes: an output directory is replaced only by a complete new output, and only
files that preprocess wrote are ever replaced or deleted.

- Files preprocess owns in a directory: those its ``index.json`` accounts for (the shards it lists,
  ``tokenizer.json`` and the index itself). Anything else is the user's and is never touched
  (``train-notes.tar.md`` included).
- :func:`check_output` refuses, even with ``--overwrite``, a directory holding files preprocess would write or
  that look like its output (any ``*.tar``, ``*.tar.tmp``, ``tokenizer.json``, ``index.json``) that no index of
  ours accounts for: they may be another tool's shards or the tokenizer the user passed in. A directory holding a
  previous output of ours needs ``--overwrite``.
- :class:`Staging` writes the new output into a fresh hidden directory inside the output directory
  (``.preprocess-XXXXXXXX``, same file system) and, on success only, moves it in: the previous index first
  (without it the directory reads as unfinished), then the new files, then the previous output's files that the
  new one does not reuse, and the new ``index.json`` last. A failure before that (a bad input, a full disk, Ctrl-C)
  removes the staging directory and leaves the previous output as it was. A process killed outright leaves a
  ``.preprocess-*`` directory behind, which is safe to delete.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

from launcher.data.format import INDEX_NAME, SPLITS, TOKENIZER_NAME, DataError, read_index

STAGING_PREFIX = ".preprocess-"


def looks_like_output(name: str) -> bool:
    """Whether a file name is one preprocess writes or that could be mistaken for its output."""
    return name in (INDEX_NAME, TOKENIZER_NAME) or name.endswith((".tar", ".tar.tmp"))


def owned_files(out_dir: Path) -> Optional[set[str]]:
    """The file names the index of ``out_dir`` accounts for, or None when it has no readable index of ours."""
    try:
        index = read_index(out_dir)
    except DataError:
        return None
    shards = {s["name"] for split in SPLITS for s in index["splits"][split]["shards"]}
    return shards | {INDEX_NAME, TOKENIZER_NAME}


def check_output(out_dir: Path, overwrite: bool) -> set[str]:
    """Refuse ``out_dir`` unless preprocess may write there (module docstring); returns the previous output's
    file names (empty when there is none), which :meth:`Staging.commit` replaces."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--output '{out_dir}' is a file; pass a directory")
    if not out_dir.is_dir():
        return set()
    owned = owned_files(out_dir) or set()
    present = {p.name for p in out_dir.iterdir() if not p.name.startswith(STAGING_PREFIX)}
    foreign = sorted(name for name in present - owned if looks_like_output(name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise DataError(f"output '{out_dir}' holds {shown}, which no preprocess index there accounts for: move "
                        "them away or pass another --output (preprocess never replaces files it did not write)")
    previous = owned & present
    if previous and not overwrite:
        raise DataError(f"output '{out_dir}' already holds a preprocess result of other inputs or settings; pass "
                        "--overwrite to replace it (it stays as it is until the new one is complete)")
    return previous


class Staging:
    """A fresh directory for the new output inside ``out_dir`` (module docstring). ``with Staging(out_dir,
    previous) as tmp: ...write into tmp...; commit()``; leaving the block without :meth:`commit` deletes ``tmp``
    (and ``out_dir`` when this created it and it is empty)."""

    def __init__(self, out_dir: Path, previous: set[str]):
        self.out_dir, self.previous = out_dir, previous
        self.created = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
        self.committed = False

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)  # created by mkdtemp above: only our files are in it
        if self.created and not self.committed:
            try:
                self.out_dir.rmdir()
            except OSError:  # not empty: someone else put something there meanwhile
                pass

    def commit(self) -> None:
        """Move the complete new output in (module docstring for the order)."""
        new = {p.name for p in self.path.iterdir()}
        if INDEX_NAME not in new:
            raise RuntimeError("Staging.commit: the new output has no index.json")  # a bug in preprocess
        (self.out_dir / INDEX_NAME).unlink(missing_ok=True)  # from here the directory reads as unfinished
        for name in sorted(new - {INDEX_NAME}):
            (self.path / name).replace(self.out_dir / name)
        for name in sorted(self.previous - new):
            (self.out_dir / name).unlink(missing_ok=True)
        (self.path / INDEX_NAME).replace(self.out_dir / INDEX_NAME)
        self.committed = True
