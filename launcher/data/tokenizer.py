"""Tokenizers for ``moetron preprocess``: a local Hugging Face ``tokenizer.json`` or a byte-level BPE trained on the
corpus (never a download), its EOS token and identity, and tokenizing documents in worker processes."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from launcher.data.format import DataError

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


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
