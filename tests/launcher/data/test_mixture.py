"""Data mixtures (``data.paths``, issue 18 item 10): the realised mixture matches the weights within 1% over 10k
samples, exact resume, resume at another DP size, the mixed validation split, bad configs (one line, exit 2 through
``launcher.pretrain.main``) and the per-source token counts in TensorBoard, across a real checkpoint resume."""
from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from launcher import pretrain
from launcher.config import Config
from launcher.config_sections import DataSource
from launcher.data.build import build_loader
from launcher.data.format import DataError
from launcher.data.loader import MixtureLoader
from launcher.data.mixture import Blend
from tests.helpers.dist import free_port
from tests.launcher.data.helpers import SEQ, corpus_docs, preprocess, resume_after, shard_config, take, write_jsonl
from tests.launcher.test_bad_inputs import TINY, _one_error_line

WEIGHTS = (0.5, 0.3, 0.2)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """a, b, c: disjoint documents, one tokenizer (a's), 30% held out; e: a's tokenizer, no valid split;
    other: its own tokenizer."""
    root = tmp_path_factory.mktemp("mixture")
    docs = corpus_docs(80_000)
    out: dict[str, Path] = {}
    for i, name in enumerate("abce"):
        tokenizer = ["--tokenizer", str(out["a"] / "tokenizer.json")] if out else []
        valid = ["--valid-fraction", "0.3"] if name != "e" else []
        preprocess([write_jsonl(root / f"{name}.jsonl", docs[i::4])], root / name, *valid, *tokenizer)
        out[name] = root / name
    preprocess([write_jsonl(root / "other.jsonl", docs[3::4])], root / "other")
    return {**out, "other": root / "other"}


def _config(paths: list[Path], weights=WEIGHTS, micro_batch=4, global_batch=16, **data) -> Config:
    cfg = shard_config(paths[0], **data)
    cfg.data.path = None
    cfg.data.paths = [DataSource(str(p), w) for p, w in zip(paths, weights)]
    cfg.train.micro_batch_size, cfg.train.global_batch_size = micro_batch, global_batch
    return cfg


def _row_keys(batch) -> list[bytes]:
    """Each sample of a batch as bytes: its input tokens and last label (every sample of the corpus is unique)."""
    return [t.numpy().tobytes() + l[-1:].numpy().tobytes() for t, l in zip(batch["tokens"], batch["labels"])]


def _split_rows(path: Path, split: str) -> set[bytes]:
    """Every sample of one directory's split (one epoch of the single-source loader, one sample per batch)."""
    cfg = shard_config(path, shuffle_buffer=0)
    cfg.train.micro_batch_size = 1
    loader = build_loader(cfg, split, 0, 1)
    return {key for _ in range(loader.plan.batches_per_epoch) for key in _row_keys(next(loader))}


@pytest.fixture(scope="module")
def rows(sources) -> dict[str, list[set[bytes]]]:
    """Per split, the sample sets of a, b, c, to tell which source a mixed sample came from; the few samples two
    sources share (boilerplate of the corpus) tell nothing and are left out."""
    out = {}
    for split in ("train", "valid"):
        sets = [_split_rows(sources[n], split) for n in "abc"]
        shared = set.union(*(a & b for i, a in enumerate(sets) for b in sets[i + 1:]))
        assert len(shared) < 0.005 * sum(map(len, sets))
        out[split] = [rows - shared for rows in sets]
    return out


def _source_ids(batches, row_sets: list[set[bytes]]) -> np.ndarray:
    """Which source each sample came from, by content; -1 for the few shared samples."""
    return np.asarray([next((j for j, rows in enumerate(row_sets) if key in rows), -1)
                       for batch in batches for key in _row_keys(batch)])


def _same_sources(ids: np.ndarray, expected: np.ndarray) -> bool:
    """The content-identified sources agree with ``expected`` wherever the sample can be told apart (>= 99%)."""
    known = ids >= 0
    return known.mean() >= 0.99 and np.array_equal(ids[known], expected[known])


def test_blend_rule_matches_the_weights_over_every_prefix_and_dp_rank():
    for weights in [(0.7, 0.3), WEIGHTS, (0.6, 0.25, 0.1, 0.04, 0.01)]:
        blend = Blend(weights)
        ids = blend.source_of(np.arange(10_000))
        prefix_counts = np.stack([np.cumsum(ids == j) for j in range(len(weights))])  # [sources, 10k]
        target = np.outer(weights, np.arange(1, 10_001))
        assert np.abs(prefix_counts - target).max() < 4  # w * N + O(log N) samples for every N <= 10k
        assert np.array_equal(blend.counts(0, 10_000), prefix_counts[:, -1])
        assert np.array_equal(blend.counts(2_500, 10_000), prefix_counts[:, -1] - prefix_counts[:, 2_499])
    blend = Blend((0.5, 0.5))  # Megatron's greedy index would alternate and give each DP rank a single source
    for rank in range(4):
        g = (np.arange(2_500)[:, None] * 4 + rank).ravel()  # one sample per rank and step, 4 ranks
        assert abs(np.mean(blend.source_of(g) == 0) - 0.5) < 0.01


def test_realised_mixture_matches_the_weights_within_1_percent_over_10k_samples(sources, rows):
    cfg = _config([sources[n] for n in "abc"], micro_batch=32, global_batch=64)
    loader = build_loader(cfg, "train", 0, 1)
    assert isinstance(loader, MixtureLoader)
    batches = take(loader, 313)  # 10,016 samples: each source wraps its epochs several times
    ids = _source_ids(batches, rows["train"])
    known = ids[ids >= 0]
    assert len(known) >= 0.99 * len(ids)
    shares = np.bincount(known, minlength=3) / len(known)
    assert np.abs(shares - WEIGHTS).max() < 0.01, shares
    # the order is the blend's: sample g of the run comes from source blend(g)
    blend = loader.mixture.blend
    assert _same_sources(ids, blend.source_of(np.arange(len(ids))))
    # tokens per source: the 156 completed steps of 64 samples
    assert loader.source_tokens() == dict(zip("abc", (blend.counts(0, 156 * 64) * SEQ).tolist()))


@pytest.mark.parametrize("workers, k", [(2, 37), (0, 5)])
def test_mixture_resume_is_exact(sources, workers, k):
    cfg = _config([sources[n] for n in "ace"], num_workers=workers, shuffle_buffer=16)
    total = 160
    ref, resumed = resume_after(cfg, k, total)
    per_worker = total * 4 / max(1, workers)  # every source passes an epoch end of its slot
    assert all(per_worker * w > 1.2 * p.per_slot for p, w in zip(ref.mixture.sources, WEIGHTS))
    assert resumed.state_dict() == ref.state_dict()
    assert resumed.source_tokens() == ref.source_tokens()
    ref.close()
    resumed.close()


def test_resume_at_another_dp_size_continues_the_mixture(sources, rows):
    cfg = _config([sources[n] for n in "abc"])
    before = build_loader(cfg, "train", 0, 2)  # 2 micro-batches of 4 per rank and step of 16
    take(before, 10)
    state = before.state_dict()
    assert state["global_samples"] == 5 * 16
    after = build_loader(cfg, "train", 0, 1)
    with pytest.warns(UserWarning, match="approximate"):
        after.load_state_dict(state)
    assert after.source_tokens() == before.source_tokens()
    ids = _source_ids(take(after, 4), rows["train"])  # the next step, 16 samples, all on this rank
    blend = after.mixture.blend
    assert _same_sources(ids, blend.source_of(np.arange(80, 96)))  # exactly the uninterrupted run's sources
    assert list(after.source_tokens().values()) == (blend.counts(0, 96) * SEQ).tolist()


def test_switching_between_one_directory_and_a_mixture_starts_the_new_data(sources):
    single = build_loader(shard_config(sources["a"]), "train", 0, 1)
    take(single, 3)
    mixture = build_loader(_config([sources[n] for n in "abc"]), "train", 0, 1)
    fresh = build_loader(_config([sources[n] for n in "abc"]), "train", 0, 1)
    with pytest.warns(UserWarning, match=r"data changed since the checkpoint \(data.path -> data.paths"):
        mixture.load_state_dict(single.state_dict())
    assert torch.equal(next(mixture)["tokens"], next(fresh)["tokens"])  # from the mixture's beginning
    with pytest.warns(UserWarning, match=r"data.paths \(a mixture\) -> data.path\)"):
        single.load_state_dict(mixture.state_dict())
    synthetic = {"source": "synthetic", "batches_seen": 3}
    with pytest.raises(DataError, match="state is for data.source=synthetic, this run reads data.paths"):
        mixture.load_state_dict(synthetic)


def test_validation_mixes_the_sources_valid_splits(sources, rows):
    cfg = _config([sources[n] for n in "abc"])
    valid = build_loader(cfg, "valid", 0, 1)
    batches = take(valid, 3)
    ids = _source_ids(batches, rows["valid"])  # only held-out samples, in the blend's order
    assert _same_sources(ids, valid.mixture.blend.source_of(np.arange(12)))
    again = take(build_loader(cfg, "valid", 0, 1), 3)  # a fresh loader repeats the same batches
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(batches, again))
    with pytest.raises(DataError, match=r"validation reads more than the \d+ samples of the valid split of .*"
                                         r"lower train.eval_batches"):
        take(valid, 1000)
    cfg.data.valid_path = str(sources["a"])  # data.valid_path wins: one directory, read in order
    assert not isinstance(build_loader(cfg, "valid", 0, 1), MixtureLoader)


@pytest.fixture
def world(monkeypatch):
    """A one-rank world for ``pretrain.main`` in this process; afterwards the signal handlers its preemption
    handling installs are put back (a process forked later, e.g. preprocess's pool, would ignore SIGTERM)."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _paths(*entries) -> str:
    return "data.paths=[" + ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in e.items()) + "}" for e in entries) + "]"


BAD = {  # id: (overrides from the source dirs, the error line's text)
    "path_and_paths": (lambda s: ["data.path=" + str(s["a"]), _paths({"path": s["b"], "weight": 1})],
                       "data.path and data.paths are mutually exclusive"),
    "weight_zero": (lambda s: [_paths({"path": s["a"], "weight": 1}, {"path": s["b"], "weight": 0})],
                    "data.paths[1].weight: 0.0 is outside the allowed range (0, inf)"),
    "weight_inf": (lambda s: [_paths({"path": s["a"], "weight": 1}, {"path": s["b"], "weight": "-.inf"})],
                   "data.paths[1].weight: -inf is outside the allowed range (0, inf)"),
    "no_weight": (lambda s: [_paths({"path": s["a"], "weight": 1}, {"path": s["b"]})],
                  "data.paths[1].weight is required"),
    "no_path": (lambda s: [_paths({"weight": 1})], "data.paths[0].path is required"),
    "missing_dir": (lambda s: [_paths({"path": s["a"], "weight": 1}, {"path": "/nonexistent/x", "weight": 1})],
                    "data.paths[1].path '/nonexistent/x' does not exist"),
    "same_dir_twice": (lambda s: [_paths({"path": s["a"], "weight": 1}, {"path": str(s["a"]) + "/", "weight": 2})],
                       "data.paths[1].path '{a}/' repeats data.paths[0].path"),
    "unknown_key": (lambda s: [_paths({"path": s["a"], "wieght": 1})],
                    "unknown key 'data.paths[0].wieght' (valid keys here: path, weight)"),
    "megatron_list": (lambda s: ["data.paths=[0.7, a]"],
                      "data.paths[0]: expected a mapping of DataSource fields, got 0.7"),
    "synthetic": (lambda s: ["data.source=synthetic", _paths({"path": s["a"], "weight": 1})],
                  "data.paths needs data.source=shards"),
    "other_tokenizer": (lambda s: [_paths({"path": s["a"], "weight": 1}, {"path": s["other"], "weight": 1})],
                        "data.paths[1].path '{other}' was tokenized with another tokenizer"),
    "no_valid_split": (lambda s: [_paths({"path": s["a"], "weight": 1}, {"path": s["e"], "weight": 1}),
                                  "train.eval_interval=1"],
                       ("data.paths[1].path '{e}' has no valid shards: re-run preprocess with --valid-fraction > 0 "
                        "or set data.valid_path")),
}


@pytest.mark.parametrize("overrides, message", BAD.values(), ids=BAD.keys())
def test_bad_mixture_configs_are_one_line_exit_2(sources, world, tmp_path, capsys, overrides, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    argv = ["--recipe", str(recipe), *TINY, "data.source=shards", f"logging.run_dir={tmp_path / 'run'}",
            *overrides(sources)]
    line = _one_error_line(capsys, pretrain.main, argv)
    assert message.format(**{k: str(v) for k, v in sources.items()}) in line, line


def _tokens_in_events(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag.rsplit("/", 1)[1]: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"] if tag.startswith("train_data/tokens/")}


def test_per_source_token_counts_reach_tensorboard_across_a_resume(sources, world, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    run_dir = tmp_path / "run"
    argv = ["--recipe", str(recipe), *TINY, "data.source=shards", "logging.tensorboard=true",
            f"logging.run_dir={run_dir}", "checkpoint.resume=auto", "checkpoint.interval=2",
            "train.global_batch_size=4", _paths(*({"path": sources[n], "weight": w} for n, w in zip("abc", WEIGHTS)))]
    assert pretrain.main(argv) == 0  # steps 0, 1; checkpoint at 2
    assert "data        mixture of 0.5 " in capsys.readouterr().out
    assert pretrain.main([*argv, "train.steps=4"]) == 0  # resumes at step 2, runs steps 2, 3
    blend, events = Blend(WEIGHTS), _tokens_in_events(run_dir)
    assert sorted(events) == ["a", "b", "c"]
    for j, name in enumerate("abc"):  # cumulative over all DP ranks and over the resume: samples x seq_length
        assert events[name] == [(s, float(blend.counts(0, (s + 1) * 4)[j] * SEQ)) for s in range(4)]
