"""Reading raw text inputs for ``moetron preprocess``: finding the files, telling text from binary, and the
documents of each file.

Inputs: ``.txt`` / ``.md`` (one document per file), ``.jsonl`` (one JSON object per line, text under
``--text-field``), ``.parquet`` (needs pyarrow); directories are searched recursively, files are read in sorted
order so the output is a pure function of the inputs.

Bad input never stops silently: missing paths, unsupported files and binary files (a NUL byte, or mostly bytes
that are not UTF-8, in the first 8 KiB) are errors before any work, one line each (exit code 2); empty files and
documents, lines that are not JSON (malformed, nested deeper than the parser goes, integers over Python's digit
limit), records without the text field and records whose text is not Unicode (a lone surrogate escape such as
``"\\ud800"``) are skipped and counted; bytes that are not UTF-8 are replaced by U+FFFD and the document is
counted.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from launcher.data.format import DataError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl",
                 ".parquet": "parquet"}
_MAX_WARNINGS = 5
_SNIFF_BYTES = 8192  # how much of each text input is looked at to tell text from a binary file
_MAX_NON_UTF8 = 0.3  # more than this fraction of undecodable bytes in the sniffed block: binary


@dataclass
class InputStats:
    files: int = 0
    documents: int = 0
    text_bytes: int = 0
    empty_files: int = 0
    empty_documents: int = 0
    invalid_utf8_documents: int = 0
    bad_json_lines: int = 0
    records_without_text: int = 0
    invalid_unicode_records: int = 0

    def warn(self, counter: str, message: str) -> None:
        """Count one skipped/repaired item; print the first few so the user can find them."""
        setattr(self, counter, getattr(self, counter) + 1)
        if getattr(self, counter) <= _MAX_WARNINGS:
            log.warning(message)


def binary_reason(path: Path) -> Optional[str]:
    """Why the start of ``path`` looks binary rather than text (a NUL byte, mostly non-UTF-8 bytes), else None.
    UTF-16 text counts as binary (it is full of NUL bytes)."""
    with path.open("rb") as f:
        head = f.read(_SNIFF_BYTES)
    nul = head.find(b"\0")
    if nul >= 0:
        return f"NUL byte at offset {nul}"
    bad = head.decode("utf-8", errors="replace").count("\ufffd")
    if bad > _MAX_NON_UTF8 * len(head):
        return f"{bad} of its first {len(head)} bytes are not UTF-8"
    return None


def _check_text_file(path: Path) -> Path:
    if TEXT_SUFFIXES[path.suffix.lower()] == "parquet":
        return path
    try:
        reason = binary_reason(path)
    except OSError as e:
        raise DataError(f"input '{path}' cannot be read ({e.strerror})") from None
    if reason is not None:
        raise DataError(f"input '{path}' is a binary file ({reason}), not text: remove it from --input "
                        "(convert UTF-16 text to UTF-8)")
    return path


def find_inputs(paths: Iterable[str]) -> list[Path]:
    """Expand files and directories into a sorted list of readable text files; error on anything unusable
    (missing, unsupported suffix, unreadable, binary)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise DataError(f"input directory '{path}' has no {'/'.join(sorted(TEXT_SUFFIXES))} files")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in TEXT_SUFFIXES:
                raise DataError(f"input '{path}': unsupported file type '{path.suffix}' "
                                f"(use {', '.join(sorted(TEXT_SUFFIXES))})")
            files.append(path)
        else:
            raise DataError(f"input '{path}' does not exist (pass existing files or directories to --input)")
    return [_check_text_file(path) for path in files]


def _decode(data: bytes, where: str, stats: InputStats) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        stats.warn("invalid_utf8_documents", f"{where}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                                             "invalid bytes replaced by U+FFFD")
        return data.decode("utf-8", errors="replace")


def _text_docs(path: Path, text_field: str, stats: InputStats) -> Iterator[str]:
    yield _decode(path.read_bytes(), str(path), stats)


def _jsonl_docs(path: Path, text_field: str, stats: InputStats) -> Iterator[str]:
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(_decode(line, where, stats))
            except json.JSONDecodeError as e:
                stats.warn("bad_json_lines", f"{where}: not JSON ({e.msg}); line skipped")
                continue
            except (ValueError, RecursionError) as e:  # integers over Python's digit limit; nesting too deep
                stats.warn("bad_json_lines", f"{where}: JSON this parser cannot read ({type(e).__name__}: "
                                             f"{str(e).splitlines()[0][:120]}); line skipped")
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                stats.warn("records_without_text", f"{where}: no string field '{text_field}' "
                                                   "(set --text-field); record skipped")
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                stats.warn("invalid_unicode_records", f"{where}: '{text_field}' is not Unicode text (lone surrogate "
                                                      f"{text[e.start]!r} at character {e.start}); record skipped")
                continue
            yield text


def _parquet_docs(path: Path, text_field: str, stats: InputStats) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"input '{path}' is parquet but pyarrow is not installed (pip install pyarrow)") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError/...; all mean a bad file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    if text_field not in table.schema_arrow.names:
        raise DataError(f"{path}: no column '{text_field}' (columns: {table.schema_arrow.names}); "
                        "set --text-field")
    for batch in table.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield text
            else:
                stats.warn("records_without_text", f"{path}: a null/non-string '{text_field}' value; skipped")


_READERS = {"text": _text_docs, "jsonl": _jsonl_docs, "parquet": _parquet_docs}


def iter_documents(files: list[Path], text_field: str, stats: InputStats, progress=None) -> Iterator[str]:
    """Non-empty documents of every file in order; counts what is skipped into ``stats``."""
    for path in files:
        stats.files += 1
        size, reported = path.stat().st_size, 0  # progress: each document's bytes, then the rest of the file
        if size == 0:
            stats.warn("empty_files", f"{path}: empty file skipped")
        else:
            for text in _READERS[TEXT_SUFFIXES[path.suffix.lower()]](path, text_field, stats):
                nbytes = len(text.encode("utf-8"))
                if progress is not None:
                    step = min(nbytes, size - reported)
                    progress.update(step)
                    reported += step
                if not text.strip():
                    stats.empty_documents += 1
                    continue
                stats.documents += 1
                stats.text_bytes += nbytes
                yield text
        if progress is not None:
            progress.update(size - reported)
