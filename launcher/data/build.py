"""Training/validation batches for the trainer, with an exactly resumable position: the loader of the config.

    loader = build_loader(cfg, "train", dp_rank, dp_size)
    batch = next(loader)           # tokens_BS, labels_BS (int64, labels = next token), loss_mask_BS (float32)
    state = loader.state_dict()    # small dict of ints/strings: save it per DP rank in the checkpoint
    loader.load_state_dict(state)  # the next batch is the one an uninterrupted run would have produced

Sources (``data.source``):
- ``shards``: webdataset tar shards written by ``moetron preprocess`` (format: ``launcher/data/format.py``),
  streamed with webdataset's tar reader (:mod:`launcher.data.reader`).
- ``shards`` with ``data.paths``: a weighted mixture of such directories (:mod:`launcher.data.mixture`).
- ``synthetic``: a fixed random Markov chain over ``model.vocab_size`` (:mod:`launcher.data.synthetic`).

Resume: :mod:`launcher.data.loader`.

Validation batches are read in order (a fresh loader repeats the same batches), in-process (no workers), from
``data.valid_path`` (its ``valid`` shards if it has any, else its training shards) or else from the ``valid``
shards of ``data.path`` (whole held-out documents, ``preprocess --valid-fraction``), or for a mixture from the
``valid`` shards of every source, mixed by the same rule (each source needs them; reading past one is an error).
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from launcher.config import Config, ConfigError
from launcher.data.batch import SPLIT_CODES, derive_seed
from launcher.data.format import DataError, read_index
from launcher.data.loader import Loader, MixtureLoader
from launcher.data.mixture import Blend, MixturePlan
from launcher.data.reader import ShardPlan, check_shard_files
from launcher.data.synthetic import SyntheticSource


def _shard_dir_and_split(cfg: Config, split: str) -> tuple[str, str, dict]:
    """Directory, split name inside it and its index for the requested split (see the module docstring)."""
    if split == "train" or cfg.data.valid_path is None:
        index = read_index(cfg.data.path)
        if not index["splits"][split]["shards"]:
            hint = ("re-run preprocess with --valid-fraction > 0 or set data.valid_path" if split == "valid"
                    else "the corpus produced no training samples")
            raise DataError(f"'{cfg.data.path}' has no {split} shards: {hint}")
        return cfg.data.path, split, index
    index = read_index(cfg.data.valid_path)
    has_valid = bool(index["splits"]["valid"]["shards"])
    return cfg.data.valid_path, "valid" if has_valid else "train", index


def _shard_plan(cfg: Config, data_dir: str, shard_split: str, index: dict, split: str, dp_rank: int, dp_size: int,
                micro_batch_size: int) -> tuple[ShardPlan, str]:
    """The plan for one directory's ``shard_split`` and its fingerprint (tokenizer, split and shard hashes)."""
    tok = index["tokenizer"]
    if cfg.model.vocab_size < tok["vocab_size"]:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                          f"({tok['vocab_size']}) of '{data_dir}': set model.vocab_size >= {tok['vocab_size']}")
    if cfg.model.seq_length != index["seq_length"]:
        raise ConfigError(f"model.seq_length ({cfg.model.seq_length}) differs from the shards' seq_length "
                          f"({index['seq_length']}) in '{data_dir}': set model.seq_length={index['seq_length']} or "
                          f"re-run preprocess with --seq-length {cfg.model.seq_length}")
    shards = index["splits"][shard_split]["shards"]
    check_shard_files(data_dir, shards)
    workers = max(1, cfg.data.num_workers) if split == "train" else 1
    plan = ShardPlan(data_dir=str(data_dir), shard_names=tuple(s["name"] for s in shards),
                     shard_sizes=tuple(s["num_samples"] for s in shards),
                     shard_sha256=tuple(s["sha256"] for s in shards), split=split, seed=cfg.train.seed,
                     dp_rank=dp_rank, dp_size=dp_size, workers=workers, micro_batch_size=micro_batch_size,
                     seq_length=index["seq_length"], shuffle_buffer=cfg.data.shuffle_buffer if split == "train" else 0,
                     eos_id=tok["eos_id"], token_vocab=tok["vocab_size"], dtype=index["dtype"])
    if plan.per_slot == 0:
        raise DataError(f"'{data_dir}' {shard_split} split has {sum(plan.shard_sizes)} samples, fewer than "
                        f"dp_size * workers * micro_batch_size = {dp_size}*{workers}*{micro_batch_size}: "
                        "use fewer data.num_workers or more data")
    digest = hashlib.sha256("".join([tok["id"], shard_split] + [s["sha256"] for s in shards]).encode())
    return plan, digest.hexdigest()[:16]


def source_names(paths: list[str]) -> tuple[str, ...]:
    """Each mixture source's name in metrics: its directory's name, prefixed by its position where two share
    one."""
    names = [Path(p).name or str(p) for p in paths]
    return tuple(f"{i}_{n}" if names.count(n) > 1 else n for i, n in enumerate(names))


def _mixture_loader(cfg: Config, split: str, dp_rank: int, dp_size: int) -> MixtureLoader:
    """The mixture of ``data.paths`` for ``split``: their train splits, or (validation without data.valid_path)
    their valid splits, every source needing one, with the same weights."""
    sources, tokenizer = [], None
    rank_step_samples = cfg.train.global_batch_size // dp_size if split == "train" else cfg.train.micro_batch_size
    for i, entry in enumerate(cfg.data.paths):
        index = read_index(entry.path)
        if tokenizer is None:
            tokenizer = index["tokenizer"]["id"]
        elif index["tokenizer"]["id"] != tokenizer:
            raise DataError(f"data.paths[{i}].path '{entry.path}' was tokenized with another tokenizer (id "
                            f"{index['tokenizer']['id'][:12]}) than data.paths[0].path (id {tokenizer[:12]}): a "
                            "mixture needs one vocabulary; preprocess every source with the same --tokenizer")
        if not index["splits"][split]["shards"]:
            hint = ("re-run preprocess with --valid-fraction > 0 or set data.valid_path" if split == "valid"
                    else "the corpus produced no training samples")
            raise DataError(f"data.paths[{i}].path '{entry.path}' has no {split} shards: {hint}")
        plan, fingerprint = _shard_plan(cfg, entry.path, split, index, split, dp_rank, dp_size, 1)
        sources.append((replace(plan, seed=derive_seed(cfg.train.seed, i)), fingerprint))  # an own order per source
    total = sum(entry.weight for entry in cfg.data.paths)
    plans, fingerprints = zip(*sources)
    weights = tuple(entry.weight / total for entry in cfg.data.paths)
    mixture = MixturePlan(sources=plans, names=source_names([e.path for e in cfg.data.paths]), blend=Blend(weights),
                          dp_rank=dp_rank, dp_size=dp_size, workers=plans[0].workers,
                          micro_batch_size=cfg.train.micro_batch_size, rank_step_samples=rank_step_samples)
    digest = hashlib.sha256(repr((fingerprints, weights)).encode()).hexdigest()[:16]
    return MixtureLoader(mixture, cfg.data.num_workers if split == "train" else 0, digest)


def build_loader(cfg: Config, split: str, dp_rank: int, dp_size: int) -> Loader:
    """The micro-batch iterator of one DP rank for ``split`` ("train" or "valid")."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
    if cfg.data.source == "synthetic":
        synthetic = SyntheticSource(cfg.model.vocab_size, cfg.model.seq_length, cfg.train.micro_batch_size,
                                    cfg.train.seed, split, dp_rank)
        return Loader(None, synthetic, 0, f"synthetic-v{cfg.model.vocab_size}-s{cfg.train.seed}")
    if cfg.data.paths and (split == "train" or cfg.data.valid_path is None):
        return _mixture_loader(cfg, split, dp_rank, dp_size)
    data_dir, shard_split, index = _shard_dir_and_split(cfg, split)
    plan, fingerprint = _shard_plan(cfg, data_dir, shard_split, index, split, dp_rank, dp_size,
                                    cfg.train.micro_batch_size)
    return Loader(plan, None, cfg.data.num_workers if split == "train" else 0, fingerprint)
