"""Loader: DP x worker split, exact resume, corrupt shards, config checks, synthetic source."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch

from launcher.config import Config, ConfigError
from launcher.data.build import build_loader
from launcher.data.format import DataError, read_index
from launcher.data.preprocess import main as preprocess_main
from launcher.data.synthetic import markov_entropy_nats
from tests.launcher.data.helpers import SEQ, resume_after, shard_config, take


def _rows(batches) -> list[tuple]:
    """Each sample as a hashable tuple of its (input tokens, last label)."""
    return [tuple(t.tolist()) + (int(l[-1]),) for b in batches for t, l in zip(b["tokens"], b["labels"])]


def _all_samples(path) -> set[tuple]:
    cfg = shard_config(path, valid_path=str(path))
    cfg.train.micro_batch_size = 1
    loader = build_loader(cfg, "valid", 0, 1)
    return set(_rows(take(loader, read_index(path)["splits"]["train"]["num_samples"])))


def test_dp2_workers2_disjoint_and_cover_the_epoch(shards):
    cfg = shard_config(shards, num_workers=2, shuffle_buffer=16)
    loaders = [build_loader(cfg, "train", r, 2) for r in range(2)]
    per_rank = loaders[0].plan.batches_per_epoch
    assert per_rank == loaders[1].plan.batches_per_epoch > 0  # equal batch counts: no DP rank waits at epoch end
    seen = [_rows(take(l, per_rank)) for l in loaders]
    everything = _all_samples(shards)
    flat = seen[0] + seen[1]
    assert len(set(flat)) == len(flat)  # disjoint across ranks and workers (every sample is unique text)
    assert set(flat) <= everything
    assert len(everything) - len(flat) < 2 * 2 * cfg.train.micro_batch_size  # only the documented remainder
    assert all(l.state_dict()["epoch"] == 1 and l.state_dict()["batch_in_epoch"] == 0 for l in loaders)
    # the next epoch is another order of the same kind of coverage
    nxt = _rows(take(loaders[0], per_rank))
    assert nxt != seen[0] and len(set(nxt)) == len(nxt)


@pytest.mark.parametrize("workers, k", [(2, 5), (0, 7)])
def test_resume_mid_epoch_matches_uninterrupted(shards, workers, k):
    cfg = shard_config(shards, num_workers=workers, shuffle_buffer=32)
    per_rank = build_loader(cfg, "train", 1, 2).plan.batches_per_epoch
    ref, resumed = resume_after(cfg, k, per_rank + 6)  # crosses an epoch boundary after resuming
    assert resumed.state_dict() == ref.state_dict()


def test_resume_with_another_layout_keeps_the_global_position(shards):
    cfg = shard_config(shards, num_workers=0)
    loader = build_loader(cfg, "train", 0, 2)
    take(loader, 6)
    state = loader.state_dict()
    cfg.data.num_workers = 2
    other = build_loader(cfg, "train", 0, 1)
    with pytest.warns(UserWarning, match="approximate"):
        other.load_state_dict(state)
    assert other.state_dict()["epoch_samples_consumed"] == state["epoch_samples_consumed"] == 6 * 4 * 2


def test_valid_split_is_in_order_and_repeatable(shards):
    cfg = shard_config(shards, valid_path=str(shards))
    a, b = build_loader(cfg, "valid", 0, 1), build_loader(cfg, "valid", 0, 1)
    for x, y in zip(take(a, 3), take(b, 3)):
        assert torch.equal(x["tokens"], y["tokens"])
    assert torch.equal(x["tokens"][0, 1:], x["labels"][0, :-1])  # labels are the next tokens


def test_missing_valid_split_is_a_clear_error(shards):
    with pytest.raises(DataError, match="--valid-fraction"):
        build_loader(shard_config(shards), "valid", 0, 1)


def _copy(shards, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(shards, dst)
    return dst


def test_truncated_shard_fails_before_training(shards, tmp_path):
    path = _copy(shards, tmp_path)
    shard = path / "train-000003.tar"
    shard.write_bytes(shard.read_bytes()[:20_000])
    with pytest.raises(DataError, match="train-000003.tar.*truncated"):
        build_loader(shard_config(path), "train", 0, 1)
    (path / "train-000004.tar").unlink()
    assert preprocess_main(["--verify", str(path)]) == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_raises_during_streaming_without_hanging(shards, tmp_path, workers):
    path = _copy(shards, tmp_path)
    for shard in read_index(path)["splits"]["train"]["shards"]:  # same size, garbage in the middle of every shard
        data = bytearray((path / shard["name"]).read_bytes())
        data[4096:6144] = b"\xff" * 2048
        (path / shard["name"]).write_bytes(bytes(data))
    loader = build_loader(shard_config(path, num_workers=workers), "train", 0, 1)
    with pytest.raises(DataError, match=r"shard '.*train-0000\d\d\.tar'.*(corrupt|unreadable)"):
        take(loader, 40)
    loader.close()
    assert preprocess_main(["--verify", str(path)]) == 1


def test_each_shard_is_hashed_once_per_process_before_its_first_sample(shards, tmp_path, monkeypatch):
    """Two epochs read every shard twice; each is hashed only the first time it is opened."""
    from launcher.data import reader

    path = _copy(shards, tmp_path)
    hashed, sha256 = [], reader.file_sha256
    monkeypatch.setattr(reader, "_VERIFIED", set())
    monkeypatch.setattr(reader, "file_sha256", lambda p: hashed.append(p.name) or sha256(p))
    loader = build_loader(shard_config(path), "train", 0, 1)
    take(loader, 2 * loader.plan.batches_per_epoch)
    names = [s["name"] for s in read_index(path)["splits"]["train"]["shards"]]
    assert sorted(hashed) == sorted(names)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()


def test_sample_decoding_is_strict(shards):
    plan = build_loader(shard_config(shards), "train", 0, 1).plan
    good = np.arange(SEQ + 1, dtype=np.uint16)
    np.testing.assert_array_equal(plan._decode("s.tar", "k", _npy(good)), good)
    bad = {"wrong dtype": _npy(good.astype(np.int32)), "too long": _npy(np.zeros(SEQ + 2, np.uint16)),
           "one token": _npy(np.zeros(1, np.uint16)), "id >= vocab": _npy(np.full(SEQ, 300, np.uint16)),
           "cut short": _npy(good)[:-3], "garbage": b"\x00" * 64}
    for what, raw in bad.items():
        with pytest.raises(DataError, match="s.tar' sample k is corrupt"):
            plan._decode("s.tar", "k", raw)


def test_vocab_and_seq_length_must_fit_the_shards(shards):
    cfg = shard_config(shards)
    cfg.model.vocab_size = 256
    with pytest.raises(ConfigError, match="model.vocab_size .256. is smaller .* set model.vocab_size >= 300"):
        build_loader(cfg, "train", 0, 1)
    cfg = shard_config(shards)
    cfg.model.seq_length = 64
    with pytest.raises(ConfigError, match="--seq-length 64"):
        build_loader(cfg, "train", 0, 1)


def test_too_many_workers_for_the_data_is_a_clear_error(shards):
    cfg = shard_config(shards, num_workers=64)
    cfg.train.micro_batch_size = 8
    with pytest.raises(DataError, match="fewer data.num_workers"):
        build_loader(cfg, "train", 0, 2)


def _synthetic(seed=3) -> Config:
    cfg = Config()
    cfg.model.vocab_size, cfg.model.seq_length, cfg.train.micro_batch_size, cfg.train.seed = 64, 16, 2, seed
    return cfg


def test_synthetic_is_deterministic_per_rank_and_resumable():
    cfg = _synthetic()
    a, b, other = build_loader(cfg, "train", 0, 2), build_loader(cfg, "train", 0, 2), build_loader(cfg, "train", 1, 2)
    xa, xb, xo = take(a, 3), take(b, 3), take(other, 3)
    assert all(torch.equal(p["tokens"], q["tokens"]) for p, q in zip(xa, xb))
    assert not torch.equal(xa[0]["tokens"], xo[0]["tokens"])
    c = build_loader(cfg, "train", 0, 2)
    c.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert torch.equal(next(c)["tokens"], next(a)["tokens"])
    batch = xa[0]
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (2, 16)
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1]) and bool((batch["loss_mask"] == 1).all())


def test_synthetic_has_learnable_structure():
    """Every transition is one of 4 fixed successors, so the conditional entropy is far below log(V)."""
    cfg = _synthetic()
    loader = build_loader(cfg, "train", 0, 1)
    pairs = torch.cat([torch.stack([b["tokens"].flatten(), b["labels"].flatten()], 1) for b in take(loader, 200)])
    counts = torch.zeros(64, 64)
    counts.index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(len(pairs)), accumulate=True)
    assert int((counts > 0).sum(1).max()) <= 4
    p = counts / counts.sum(1, keepdim=True).clamp(min=1)
    ent = float(-(counts * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum() / counts.sum())
    assert abs(ent - markov_entropy_nats()) < 0.1 and markov_entropy_nats() < 0.5 * np.log(64)
