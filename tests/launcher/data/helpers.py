"""Helpers for the data tests: slices of the shipped corpus, preprocess calls, configs pointing at shards."""
from __future__ import annotations

import json
from pathlib import Path

from launcher.config import Config
from launcher.data.format import read_index
from launcher.data.preprocess import main as preprocess_main

CORPUS = Path(__file__).resolve().parents[3] / "recipes" / "data" / "python_reference.jsonl"
SEQ = 32


def corpus_docs(max_bytes: int) -> list[str]:
    """The first documents of the shipped corpus, up to about ``max_bytes`` of text."""
    docs, size = [], 0
    for line in CORPUS.read_text(encoding="utf-8").splitlines():
        docs.append(json.loads(line)["text"])
        size += len(docs[-1])
        if size >= max_bytes:
            break
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def preprocess(inputs: list[Path], out: Path, *extra: str) -> dict:
    argv = ["--input", *map(str, inputs), "--output", str(out), "--seq-length", str(SEQ), "--vocab-size", "300",
            "--samples-per-shard", "64", "--workers", "1", *extra]
    assert preprocess_main(argv) == 0
    return read_index(out)


def shard_config(path: Path, **data) -> Config:
    cfg = Config()
    cfg.data.source, cfg.data.path = "shards", str(path)
    cfg.model.vocab_size, cfg.model.seq_length = 320, SEQ
    cfg.train.micro_batch_size = 4
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def take(loader, n: int) -> list:
    return [next(loader) for _ in range(n)]


def resume_after(cfg: Config, k: int, total: int, dp_rank: int = 1, dp_size: int = 2):
    """(uninterrupted loader, resumed loader): the resumed one read ``k`` batches, went through a JSON round trip of
    its state (as a checkpoint stores it) into a new loader, and read on to ``total``. Asserts every batch equals
    the uninterrupted loader's."""
    import torch

    from launcher.data.build import build_loader

    ref = build_loader(cfg, "train", dp_rank, dp_size)
    expected = take(ref, total)
    first = build_loader(cfg, "train", dp_rank, dp_size)
    head = take(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    resumed = build_loader(cfg, "train", dp_rank, dp_size)
    resumed.load_state_dict(state)
    for a, b in zip(head + take(resumed, total - k), expected):
        for key in ("tokens", "labels", "loss_mask"):
            assert torch.equal(a[key], b[key])
    return ref, resumed
