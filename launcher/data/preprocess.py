"""``moetron preprocess``: raw text -> tokenized, packed webdataset shards + ``index.json``.

    python -m launcher.preprocess --input recipes/data/python_reference.jsonl --output data/smoke \\
        --vocab-size 1024 --seq-length 128

Inputs: ``.txt`` / ``.md`` (one document per file), ``.jsonl`` (one JSON object per line, text under
``--text-field``), ``.parquet`` (needs pyarrow); directories are searched recursively, files are read in sorted
order so the output is a pure function of the inputs. Tokenizer: a local Hugging Face ``tokenizer.json``
(``--tokenizer``) or a byte-level BPE trained on the corpus by this command (``--vocab-size``); never a download.

Output format (version ``FORMAT``), everything the loader (``launcher/data/loader.py``) needs:
- Each document is tokenized and followed by one EOS token; documents are concatenated into one token stream
  per split. Sample ``i`` of a split is ``stream[i*S : i*S + S + 1]`` (S = ``--seq-length``): S inputs plus the
  next token as the last label, so consecutive samples overlap by one token (as Megatron's GPTDataset) and no
  label is lost at sample boundaries. Only the split's last sample may be shorter (>= 2 tokens); the loader pads
  it and masks the padding out of the loss. ``concat(sample[:-1] for all samples) + last[-1:]`` is the stream.
- Samples go in order into ``{split}-NNNNNN.tar`` webdataset shards, ``--samples-per-shard`` each, as one member
  ``{index:09d}.tokens.npy`` (uint16 when the vocabulary fits, else uint32). Tars are byte-reproducible.
- ``--valid-fraction`` of the documents (spread evenly, whole documents) go to the ``valid`` split.
- ``index.json`` (written last, atomically: no index means an unfinished run) holds the tokenizer id (sha256 of
  its JSON), vocab size, EOS id, seq_length, dtype, per shard its sample/token counts, byte size and sha256, and
  the input statistics (documents, skipped empty files, lines that were not JSON, ...).

Bad input never stops silently: missing paths, unsupported files and binary files (a NUL byte, or mostly bytes
that are not UTF-8, in the first 8 KiB) are errors before any work, one line each (exit code 2); empty files and
documents, lines that are not JSON (malformed, nested deeper than the parser goes, integers over Python's digit
limit), records without the text field and records whose text is not Unicode (a lone surrogate escape such as
``"\\ud800"``) are skipped and counted; bytes that are not UTF-8 are replaced by U+FFFD and the document is
counted. ``--verify DIR`` re-hashes every shard of an output; the loader verifies each shard's sha256 once per
process, when it first opens it. This module does not import torch (fast CLI, cheap worker processes).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import os
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from launcher.errors import ArgumentParser, OneLineError

FORMAT = "moetron-shards/1"
INDEX_NAME = "index.json"
TOKENIZER_NAME = "tokenizer.json"
SAMPLE_EXT = "tokens.npy"
SPLITS = ("train", "valid")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl",
                 ".parquet": "parquet"}
_MAX_WARNINGS = 5
_SNIFF_BYTES = 8192  # how much of each text input is looked at to tell text from a binary file
_MAX_NON_UTF8 = 0.3  # more than this fraction of undecodable bytes in the sniffed block: binary


class DataError(OneLineError):
    """Bad input data or shards. The message is one line naming the file and what to do."""


# ---------------------------------------------------------------- reading inputs

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
            print(f"preprocess: warning: {message}", file=sys.stderr)


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


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(docs: Iterable[str], vocab_size: int, eos_token: str):
    """Byte-level BPE (GPT-2 style pre-tokenizer, every byte in the alphabet: any text encodes losslessly)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise DataError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs 256 byte tokens, "
                        "EOS and at least one merge (use >= 258)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return tok


def load_tokenizer(path: str):
    from tokenizers import Tokenizer

    if not Path(path).is_file():
        raise DataError(f"tokenizer '{path}' not found: pass a local tokenizer.json file "
                        "(nothing is downloaded) or omit --tokenizer and give --vocab-size to train one")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception on bad JSON
        raise DataError(f"tokenizer '{path}' could not be loaded ({e}); pass a Hugging Face tokenizer.json") from None


def find_eos(tok, eos_token: Optional[str]) -> tuple[str, int]:
    candidates = [eos_token] if eos_token else list(EOS_CANDIDATES)
    for name in candidates:
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return name, token_id
    raise DataError(f"tokenizer has none of the EOS tokens {candidates}: pass the right one with --eos-token")


def tokenizer_id(tok) -> str:
    """Stable identity of a tokenizer: sha256 of its canonical JSON."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---------------------------------------------------------------- tokenizing (worker processes)

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    from tokenizers import Tokenizer

    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _encode_batch(args: tuple[list[str], int]) -> list[np.ndarray]:
    """Each document's ids followed by EOS, as uint32 arrays."""
    texts, eos_id = args
    encodings = _WORKER_TOKENIZER.encode_batch(texts, add_special_tokens=False)
    return [np.array(enc.ids + [eos_id], dtype=np.uint32) for enc in encodings]


def _batched(docs: Iterator[str], max_docs: int, max_bytes: int = 1 << 22) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if len(batch) >= max_docs or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_documents(docs: Iterator[str], tok, eos_id: int, workers: int) -> Iterator[np.ndarray]:
    """Token ids (+EOS) per document, in input order, tokenized by ``workers`` processes."""
    batches = ((batch, eos_id) for batch in _batched(docs, max_docs=64))
    if workers <= 1:
        _init_worker(tok.to_str())
        for batch in batches:
            yield from _encode_batch(batch)
        return
    # Each worker is single-threaded; the tokenizers library would otherwise oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # spawn, not fork: a process that already runs threads (torch, gloo, a data loader: any in-process caller)
    # can be forked while one of them holds a lock, and the child then hangs on it forever
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tok.to_str(),)) as pool:
        for encoded in pool.imap(_encode_batch, batches, chunksize=1):
            yield from encoded


# ---------------------------------------------------------------- packing and shards

class ShardSink:
    """Writes samples, in order, into ``{split}-NNNNNN.tar`` shards of ``samples_per_shard`` samples each.

    The tars are plain USTAR webdataset shards (member ``KEY.tokens.npy``), written with Python's tarfile and
    fixed metadata (mtime 0, no owner) so the same input gives byte-identical shards (``import webdataset``
    would pull in torch here)."""

    def __init__(self, out_dir: Path, split: str, samples_per_shard: int, dtype: np.dtype):
        self.out_dir, self.split, self.per_shard, self.dtype = out_dir, split, samples_per_shard, dtype
        self.shards: list[dict] = []
        self.num_samples = 0
        self._tar: Optional[tarfile.TarFile] = None
        self._current: Optional[dict] = None

    def write(self, sample: np.ndarray) -> None:
        if self._tar is None:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self._current = {"name": name, "num_samples": 0, "num_tokens": 0}
            self._tar = tarfile.open(self.out_dir / (name + ".tmp"), "w", format=tarfile.USTAR_FORMAT)
        payload = io.BytesIO()
        np.lib.format.write_array(payload, sample.astype(self.dtype), allow_pickle=False)
        info = tarfile.TarInfo(f"{self.num_samples:09d}.{SAMPLE_EXT}")
        info.size, info.mode = payload.tell(), 0o444
        payload.seek(0)
        self._tar.addfile(info, payload)
        self._current["num_samples"] += 1
        self._current["num_tokens"] += len(sample) - 1  # label positions
        self.num_samples += 1
        if self._current["num_samples"] == self.per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self._tar.close()
        tmp = self.out_dir / (self._current["name"] + ".tmp")
        data = tmp.read_bytes()
        self._current.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        tmp.replace(self.out_dir / self._current["name"])
        self.shards.append(self._current)
        self._tar, self._current = None, None

    def close(self) -> None:
        if self._tar is not None:
            self._finish_shard()


class Packer:
    """Cuts a document stream into samples of ``seq_length + 1`` tokens overlapping by one (see module doc)."""

    def __init__(self, seq_length: int, sink: ShardSink):
        self.seq_length, self.sink = seq_length, sink
        self.buffer = np.zeros(0, dtype=np.uint32)
        self.stream_tokens = 0
        self.documents = 0

    def add(self, doc_ids: np.ndarray) -> None:
        self.documents += 1
        self.stream_tokens += len(doc_ids)
        self.buffer = np.concatenate([self.buffer, doc_ids])
        S = self.seq_length
        n_full = (len(self.buffer) - 1) // S
        for i in range(n_full):
            self.sink.write(self.buffer[i * S: i * S + S + 1])
        self.buffer = self.buffer[n_full * S:]

    def finish(self) -> None:
        if len(self.buffer) >= 2:  # a last, shorter sample: padded and loss-masked by the loader
            self.sink.write(self.buffer)
        self.sink.close()


def is_valid_document(doc_index: int, valid_fraction: float) -> bool:
    """Whole documents, spread evenly: document i is held out when floor((i+1)f) > floor(i f)."""
    return int((doc_index + 1) * valid_fraction) > int(doc_index * valid_fraction)


# ---------------------------------------------------------------- index

_SHARD_ENTRY = {"name": str, "num_samples": int, "bytes": int, "sha256": str}
_SPLIT_ENTRY = {"num_samples": int, "shards": [_SHARD_ENTRY]}
INDEX_SCHEMA = {"format": str, "tokenizer": {"id": str, "vocab_size": int, "eos_id": int}, "seq_length": int,
                "dtype": str, "splits": {split: _SPLIT_ENTRY for split in SPLITS}}
"""What the loader reads from ``index.json``: keys, JSON types (integers are >= 0) and nesting."""
_TOKEN_DTYPES = ("uint16", "uint32")


def _schema_problem(value, schema, where: str) -> Optional[str]:
    """The first place where ``value`` does not have the shape of ``schema``, as one phrase, or None."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"'{where}' is not an object"
        for key, sub in schema.items():
            inner = f"{where}.{key}" if where else key
            if key not in value:
                return f"'{inner}' is missing"
            problem = _schema_problem(value[key], sub, inner)
            if problem:
                return problem
        return None
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"'{where}' is not a list"
        return next(filter(None, (_schema_problem(v, schema[0], f"{where}[{i}]") for i, v in enumerate(value))),
                    None)
    if schema is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        return f"'{where}' is {value!r}, not a non-negative integer"
    if not isinstance(value, schema):
        return f"'{where}' is {value!r}, not a {schema.__name__}"
    return None


def _index_problem(index) -> Optional[str]:
    problem = _schema_problem(index, INDEX_SCHEMA, "")
    if problem:
        return problem
    if index["dtype"] not in _TOKEN_DTYPES:
        return f"'dtype' is {index['dtype']!r}, not one of {list(_TOKEN_DTYPES)}"
    for split in SPLITS:
        for shard in index["splits"][split]["shards"]:
            if Path(shard["name"]).name != shard["name"] or shard["name"].startswith("."):
                return f"shard name {shard['name']!r} is not a file name inside the directory"
    return None


def read_index(data_dir: str | Path) -> dict:
    """Load and check ``index.json`` of a preprocess output directory (format, and the shape of everything the
    loader reads: :data:`INDEX_SCHEMA`). Any problem is one :class:`DataError` naming the file and the key."""
    path = Path(data_dir) / INDEX_NAME
    if not path.is_file():
        raise DataError(f"'{path}' not found: '{data_dir}' is not a finished preprocess output "
                        "(run `moetron preprocess --input ... --output DIR`)")
    try:
        index = json.loads(path.read_bytes())
    except OSError as e:
        raise DataError(f"'{path}' cannot be read ({e.strerror})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bytes that are not UTF-8, absurd nesting
        raise DataError(f"'{path}' is not valid JSON ({getattr(e, 'msg', type(e).__name__)}); re-run preprocess "
                        "(--overwrite)") from None
    fmt = index.get("format") if isinstance(index, dict) else None
    if fmt != FORMAT:
        raise DataError(f"'{path}' has format {fmt!r}, this moetron reads {FORMAT!r}; re-run preprocess (--overwrite)")
    problem = _index_problem(index)
    if problem:
        raise DataError(f"'{path}' is damaged or incomplete: {problem}; re-run preprocess (--overwrite)")
    return index


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, streamed (shards need not fit in memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_shards(data_dir: str | Path) -> list[str]:
    """Re-hash every shard listed in the index; returns one line per problem (empty list = all good)."""
    index = read_index(data_dir)
    problems = []
    for split in SPLITS:
        for shard in index["splits"][split]["shards"]:
            path = Path(data_dir) / shard["name"]
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif file_sha256(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 mismatch (corrupt or modified)")
    return problems


# ---------------------------------------------------------------- the command

def _prepare_output(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--output '{out_dir}' is a file; pass a directory")
    if (out_dir / INDEX_NAME).exists() and not overwrite:
        raise DataError(f"output '{out_dir}' already holds a preprocess result; pass --overwrite to replace it")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("train-*.tar*"), *out_dir.glob("valid-*.tar*"), out_dir / INDEX_NAME]:
        stale.unlink(missing_ok=True)


def _progress(files: list[Path], desc: str):
    from launcher.progress import progress

    return progress(sum(p.stat().st_size for p in files), desc, unit="B")


def run(args: argparse.Namespace) -> dict:
    """Preprocess as the CLI arguments say; returns the index that was written."""
    if args.seq_length < 1:
        raise DataError(f"--seq-length must be >= 1, got {args.seq_length}")
    if not 0.0 <= args.valid_fraction < 1.0:
        raise DataError(f"--valid-fraction must be in [0, 1), got {args.valid_fraction}")
    if args.samples_per_shard < 1:
        raise DataError(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
    files = find_inputs(args.input)
    out_dir = Path(args.output)
    _prepare_output(out_dir, args.overwrite)
    start = time.perf_counter()
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    else:
        with _progress(files, "train tokenizer") as bar:
            tok = train_tokenizer(iter_documents(files, args.text_field, InputStats(), bar), args.vocab_size,
                                  args.eos_token or EOS_CANDIDATES[0])
    eos_name, eos_id = find_eos(tok, args.eos_token)
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    tok.save(str(out_dir / TOKENIZER_NAME))

    stats = InputStats()
    packers = {split: Packer(args.seq_length, ShardSink(out_dir, split, args.samples_per_shard, dtype))
               for split in SPLITS}
    tok_start = time.perf_counter()
    with _progress(files, "tokenize") as bar:
        docs = iter_documents(files, args.text_field, stats, bar)
        # closing(): an error mid-stream shuts the tokenizer pool down now, not when the generator is collected
        with contextlib.closing(encode_documents(docs, tok, eos_id, args.workers)) as encoded:
            for i, ids in enumerate(encoded):
                packers["valid" if is_valid_document(i, args.valid_fraction) else "train"].add(ids)
    for packer in packers.values():
        packer.finish()
    if stats.documents == 0:
        raise DataError(f"no text found in {len(files)} input file(s) (all empty or skipped; see warnings)")
    if packers["train"].sink.num_samples == 0:
        raise DataError("the corpus is too small for one training sample; add text or lower --seq-length")
    elapsed = time.perf_counter() - start
    index = {
        "format": FORMAT,
        "tokenizer": {"file": TOKENIZER_NAME, "id": tokenizer_id(tok), "vocab_size": vocab_size,
                      "eos_token": eos_name, "eos_id": eos_id, "trained_here": not args.tokenizer},
        "seq_length": args.seq_length,
        "dtype": dtype.name,
        "splits": {split: {"num_samples": p.sink.num_samples, "num_documents": p.documents,
                           "stream_tokens": p.stream_tokens, "shards": p.sink.shards}
                   for split, p in packers.items()},
        "inputs": {"files": [str(p) for p in files], "text_field": args.text_field, **asdict(stats)},
        "valid_fraction": args.valid_fraction,
    }
    _write_json_atomic(out_dir / INDEX_NAME, index)
    tokens = sum(p.stream_tokens for p in packers.values())
    tok_elapsed = time.perf_counter() - tok_start
    print(f"preprocess: {stats.documents} documents ({stats.text_bytes / 1e6:.2f} MB) -> {tokens:,} tokens, "
          f"vocab {vocab_size}, train {index['splits']['train']['num_samples']} / valid "
          f"{index['splits']['valid']['num_samples']} samples of {args.seq_length}+1 tokens in "
          f"{sum(len(p.sink.shards) for p in packers.values())} shards; {elapsed:.1f} s total, tokenize+pack "
          f"{tokens / tok_elapsed:,.0f} tokens/s ({stats.text_bytes / 1e6 / tok_elapsed:.2f} MB/s) with "
          f"{args.workers} worker(s); skipped: {stats.empty_files} empty files, {stats.empty_documents} empty "
          f"documents, {stats.bad_json_lines} bad JSON lines, {stats.records_without_text} records without text, "
          f"{stats.invalid_unicode_records} records with invalid Unicode; "
          f"{stats.invalid_utf8_documents} documents had invalid UTF-8 -> {out_dir}")
    return index


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="moetron preprocess", description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", help="text files (.txt/.md, .jsonl, .parquet) or directories")
    p.add_argument("--output", help="output directory for shards, tokenizer.json and index.json")
    p.add_argument("--tokenizer", help="local Hugging Face tokenizer.json (default: train a byte-level BPE)")
    p.add_argument("--vocab-size", type=int, default=1024, help="vocabulary size of the trained tokenizer")
    p.add_argument("--eos-token", help=f"EOS token (default: the first of {list(EOS_CANDIDATES)} present)")
    p.add_argument("--seq-length", type=int, default=2048, help="tokens per sample (= model.seq_length)")
    p.add_argument("--samples-per-shard", type=int, default=4096)
    p.add_argument("--valid-fraction", type=float, default=0.0, help="fraction of documents held out as 'valid'")
    p.add_argument("--text-field", default="text", help="JSON key / parquet column holding the text")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="tokenizer processes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--verify", metavar="DIR", help="only re-hash the shards of an existing output and report")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.verify:
            problems = verify_shards(args.verify)
            print("\n".join(problems) or f"preprocess: all shards in {args.verify} match index.json")
            return 1 if problems else 0
        if not args.input or not args.output:
            parser.error("--input and --output are required (or --verify DIR)")
        run(args)
    except DataError as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable output, a full disk, a file that vanished mid-run
        where = f" '{e.filename}'" if e.filename else ""
        print(f"preprocess: error: {e.strerror or e}{where} (check --input/--output and free space)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
