"""``moetron preprocess``: raw text -> tokenized, packed webdataset shards + ``index.json``.

    python -m launcher.preprocess --input recipes/data/python_reference.jsonl --output data/smoke \\
        --vocab-size 1024 --seq-length 128

Inputs: ``.txt`` / ``.md`` (one document per file), ``.jsonl`` (one JSON object per line, text under
``--text-field``), ``.parquet`` (needs pyarrow); directories are searched recursively, files are read in sorted
order so the output is a pure function of the inputs. Tokenizer: a local Hugging Face ``tokenizer.json``
(``--tokenizer``) or a byte-level BPE trained on the corpus by this command (``--vocab-size``); never a download.

This module runs the job: the inputs are read by :mod:`launcher.data.inputs` (bad input never stops silently),
tokenized by :mod:`launcher.data.tokenizer` and written by :mod:`launcher.data.writer` in the format that
:mod:`launcher.data.format` defines. The output is written into a fresh staging directory and moved in only when complete;
files preprocess did not write are never replaced or deleted (:mod:`launcher.data.output`). ``--verify DIR`` re-hashes every shard of an output; the loader
verifies each shard's sha256 once per process, when it first opens it. This module does not import torch (fast
CLI, cheap worker processes).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from launcher.data.format import FORMAT, INDEX_NAME, SPLITS, TOKENIZER_NAME, DataError, read_index, token_dtype, \
    verify_shards
from launcher.data.inputs import InputStats, find_inputs, iter_documents
from launcher.data.tokenizer import EOS_CANDIDATES, encode_documents, find_eos, load_tokenizer, tokenizer_id, \
    train_tokenizer
from launcher.data import output
from launcher.data.writer import Packer, ShardSink, is_valid_document
from launcher import log as console
from launcher.errors import ArgumentParser, MoetronError, report

log = logging.getLogger("launcher.data.preprocess")  # by name: run as `python -m`, __name__ is "__main__"


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def _file_stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def build_record(args: argparse.Namespace, files: list[Path]) -> dict:
    """What an output is made from, stored as ``index.json``'s ``build``: each input file's absolute path, size
    and mtime, and every setting that changes the output (``--workers`` does not)."""
    return {"inputs": [_file_stamp(p) for p in files],
            "settings": {"tokenizer": _file_stamp(Path(args.tokenizer)) if args.tokenizer else None,
                         "vocab_size": None if args.tokenizer else args.vocab_size, "eos_token": args.eos_token,
                         "seq_length": args.seq_length, "samples_per_shard": args.samples_per_shard,
                         "valid_fraction": args.valid_fraction, "text_field": args.text_field}}


def _up_to_date(out_dir: Path, build: dict) -> Optional[dict]:
    """The index of ``out_dir`` when it is a complete output of exactly ``build`` (same inputs and settings; its
    tokenizer and every listed shard present at the recorded size; no other file that looks like output), else
    None."""
    try:
        index = read_index(out_dir)
    except DataError:
        return None
    shards = {s["name"]: s["bytes"] for split in SPLITS for s in index["splits"][split]["shards"]}
    looks_like = {p.name for p in out_dir.iterdir() if output.looks_like_output(p.name)}
    if index.get("build") != build or looks_like != {*shards, INDEX_NAME, TOKENIZER_NAME}:
        return None
    return index if all((out_dir / name).stat().st_size == size for name, size in shards.items()) else None


LIMITS = {"seq_length": (1, 1 << 20), "samples_per_shard": (1, 1 << 20), "vocab_size": (1, 1 << 22),
          "workers": (1, 1024)}
"""Allowed ranges of the integer options: the longest sample any model here trains on (2^20 tokens), a shard of at
most 2^20 samples, a vocabulary of at most 2^22 tokens (the lower bound of a trained one is the tokenizer's:
258), and tokenizer processes."""


def check_arguments(args: argparse.Namespace) -> None:
    """One DataError naming the first option outside its range (:data:`LIMITS`, and --valid-fraction in [0, 1))."""
    for name, (low, high) in LIMITS.items():
        value = getattr(args, name)
        if not low <= value <= high:
            raise DataError(f"--{name.replace('_', '-')} must be in [{low:,}, {high:,}], got {value:,}")
    if not 0.0 <= args.valid_fraction < 1.0:
        raise DataError(f"--valid-fraction must be in [0, 1), got {args.valid_fraction}")


def _progress(files: list[Path], desc: str):
    from launcher.progress import progress

    return progress(sum(p.stat().st_size for p in files), desc, unit="B")


def run(args: argparse.Namespace) -> dict:
    """Preprocess as the CLI arguments say; returns the index that was written, or the existing one when the output
    is already up to date (see :func:`build_record`)."""
    check_arguments(args)
    files = find_inputs(args.input)
    log.debug(f"{len(files)} input file(s), {sum(p.stat().st_size for p in files):,} bytes: "
              + ", ".join(map(str, files[:5])) + (", ..." if len(files) > 5 else ""))
    out_dir = Path(args.output)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None  # a missing file: one clear line, first
    build = build_record(args, files)
    done = None if args.overwrite else _up_to_date(out_dir, build)
    if done:
        log.log(console.RESULT, f"up to date: {out_dir} ({done['inputs']['documents']} documents, train "
                f"{done['splits']['train']['num_samples']} / valid {done['splits']['valid']['num_samples']} samples "
                "from the same inputs and settings); nothing to do")
        return done
    staging = output.Staging(out_dir, output.check_output(out_dir, args.overwrite))
    with staging as tmp:
        index, summary = _write(args, files, tok, build, tmp)
        staging.commit()
    log.log(console.RESULT, f"{summary} -> {out_dir}")
    return index


def _write(args: argparse.Namespace, files: list[Path], tok, build: dict, out_dir: Path) -> tuple[dict, str]:
    """Tokenize ``files`` (training the tokenizer when ``tok`` is None) and write a complete output into the
    fresh directory ``out_dir``; returns its index and the summary line."""
    start = time.perf_counter()
    if tok is None:
        with _progress(files, "train tokenizer") as bar:
            tok = train_tokenizer(iter_documents(files, args.text_field, InputStats(), bar), args.vocab_size,
                                  args.eos_token or EOS_CANDIDATES[0])
    eos_name, eos_id = find_eos(tok, args.eos_token)
    log.debug(f"tokenizer: {args.tokenizer or 'trained here'}, vocab {tok.get_vocab_size()}, EOS {eos_name!r} = "
              f"{eos_id}; {args.workers} worker(s)")
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
        "build": build,
    }
    _write_json_atomic(out_dir / INDEX_NAME, index)
    tokens = sum(p.stream_tokens for p in packers.values())
    tok_elapsed = time.perf_counter() - tok_start
    return index, (f"preprocessed {stats.documents} documents ({stats.text_bytes / 1e6:.2f} MB) -> {tokens:,} tokens, "
          f"vocab {vocab_size}, train {index['splits']['train']['num_samples']} / valid "
          f"{index['splits']['valid']['num_samples']} samples of {args.seq_length}+1 tokens in "
          f"{sum(len(p.sink.shards) for p in packers.values())} shards; {elapsed:.1f} s total, tokenize+pack "
          f"{tokens / tok_elapsed:,.0f} tokens/s ({stats.text_bytes / 1e6 / tok_elapsed:.2f} MB/s) with "
          f"{args.workers} worker(s); skipped: {stats.empty_files} empty files, {stats.empty_documents} empty "
          f"documents, {stats.bad_json_lines} bad JSON lines, {stats.records_without_text} records without text, "
          f"{stats.invalid_unicode_records} records with invalid Unicode; "
          f"{stats.invalid_utf8_documents} documents had invalid UTF-8")


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
    console.add_verbosity_flags(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console.setup(args.quiet, args.verbose)
    try:
        if args.verify:
            problems = verify_shards(args.verify)
            for line in problems or [f"all shards in {args.verify} match index.json"]:
                log.log(console.RESULT, line)
            return 1 if problems else 0
        if not args.input or not args.output:
            parser.error("--input and --output are required (or --verify DIR)")
        run(args)
    except MoetronError as e:
        return report(e)
    except OSError as e:  # an unwritable output, a full disk, a file that vanished mid-run
        where = f" '{e.filename}'" if e.filename else ""
        return report(DataError(f"{e.strerror or e}{where} (check --input/--output and free space)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
