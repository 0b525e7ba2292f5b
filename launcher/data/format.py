"""The shard format ``moetron preprocess`` writes and the loader reads (version ``FORMAT``): file names,
``index.json`` and its schema, token dtypes, shard hashing. Writer (:mod:`launcher.data.writer`) and reader
(:mod:`launcher.data.reader`) both import this module, never each other.

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

``verify_shards`` re-hashes every shard of an output (``moetron preprocess --verify DIR``). This module does not
import torch (fast CLI, cheap worker processes).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np

from launcher.errors import MoetronError

FORMAT = "moetron-shards/1"
INDEX_NAME = "index.json"
TOKENIZER_NAME = "tokenizer.json"
SAMPLE_EXT = "tokens.npy"
SPLITS = ("train", "valid")


class DataError(MoetronError):
    """Bad input data or shards. The message is one line naming the file and what to do."""

    kind = "data"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


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
