"""Resuming at another parallel layout continues the data where the checkpoint stopped: exactly when only TP/PP/EP
change (the data-parallel layout is the same), and at the same global sample count when the DP size changes. Before,
any layout change restarted the epoch, so steps 3-5 re-read steps 0-2's samples (repro 15)."""
import hashlib

import pytest

from tests.helpers.dist import run_distributed
from tests.launcher.data.helpers import SEQ, corpus_docs, preprocess, write_jsonl


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout_shards")
    preprocess([write_jsonl(root / "docs.jsonl", corpus_docs(40_000))], root / "out")
    return root / "out"


def _overrides(run_dir, shards, *extra):
    return ["model.vocab_size=320", "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4",
            "model.num_query_groups=2", f"model.seq_length={SEQ}", "moe.num_experts=4", "moe.top_k=2",
            "moe.expert_ffn_hidden_size=32", "train.micro_batch_size=2", "train.global_batch_size=8",
            "train.steps=6", "data.source=shards", f"data.path={shards}", f"logging.run_dir={run_dir}",
            "logging.tensorboard=false", "checkpoint.interval=3", *extra]


def _train(rank, world, overrides):
    import torch.distributed as dist

    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize

    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep))
    forward, seen = trainer._forward, []

    def recording(model, mb, x):
        if model.training:
            seen.extend((trainer.step, hashlib.sha1(row.numpy().tobytes()).hexdigest()) for row in mb["tokens"])
        return forward(model, mb, x)

    trainer._forward = recording
    trainer.fit()
    everyone = [None] * world
    dist.all_gather_object(everyone, seen)
    return sorted({s for rank_seen in everyone for s in rank_seen})


def _steps(samples, first, last):
    return {h for step, h in samples if first <= step <= last}


def test_new_model_parallel_layout_continues_the_data_exactly(tmp_path, shards):
    reference = run_distributed(_train, 2, _overrides(tmp_path / "a", shards, "parallel.tp=2"))[0]
    first = run_distributed(_train, 2, _overrides(tmp_path / "b", shards, "parallel.tp=2", "train.exit_interval=3"))[0]
    resumed = run_distributed(_train, 2, _overrides(tmp_path / "b", shards, "parallel.pp=2"))[0]
    assert _steps(first, 0, 2) == _steps(reference, 0, 2)
    assert _steps(resumed, 3, 5) == _steps(reference, 3, 5)  # the same samples as the uninterrupted run
    assert not _steps(resumed, 3, 5) & _steps(first, 0, 2)


def test_new_data_parallel_size_continues_from_the_global_sample_count(tmp_path, shards):
    """A DP=2 run stopped after step 2 and resumed at DP=1 reads, in steps 3-5, exactly what a DP=1 run reads at
    that global position (the 24 samples consumed are kept; which samples those were depends on the DP size, so
    within the interrupted epoch a few may repeat, as the loader documents and warns)."""
    reference = run_distributed(_train, 1, _overrides(tmp_path / "d", shards))[0]  # DP=1 throughout
    first = run_distributed(_train, 2, _overrides(tmp_path / "c", shards, "train.exit_interval=3"))[0]  # DP=2
    resumed = run_distributed(_train, 1, _overrides(tmp_path / "c", shards))[0]  # DP=1
    assert len(_steps(first, 0, 2)) == 24
    assert _steps(resumed, 3, 5) == _steps(reference, 3, 5)
