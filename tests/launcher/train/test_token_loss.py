"""The loss is the token-weighted mean over the global batch (launcher/train/token_loss.py), for validation and
training alike: every label token weighs the same whatever the micro-batch size or the DP/PP layout.

Validation: 14 samples, the last one short (3 of 16 label tokens, padded and masked as the loader does), evaluated
with micro-batches of 1, 2 and 7 samples and at DP=2 give one loss, the hand-computed token-weighted mean (a mean of
per-micro-batch means gave a different loss per micro-batch size). Training: one step over micro-batches of unequal
label-token counts (unequal per DP rank too) has the loss and the gradient of the token-weighted mean loss of the
whole global batch computed in one forward by hand, single-process and at PP=2 x DP=2.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests.helpers.dist import run_distributed

SEQ, FULL, SHORT_LABELS = 16, 13, 3
VOCAB = 64
TINY = ["model.vocab_size=64", "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=2",
        "model.num_query_groups=2", f"model.seq_length={SEQ}", "moe.num_experts=4", "moe.top_k=2",
        "moe.expert_ffn_hidden_size=32", "train.precision=fp32", "optim.distributed=false", "optim.grad_clip=0",
        "logging.tensorboard=false", "checkpoint.interval=0", "checkpoint.save_at_end=false",
        "model.init_std=0.5"]  # wide logits: per-sample losses differ enough to tell the two means apart


# ---------------------------------------------------------------- validation

@pytest.fixture(scope="module")
def word_shards(tmp_path_factory) -> Path:
    """Shards of one document of FULL * SEQ + SHORT_LABELS + 1 tokens (EOS included) from a word-level tokenizer
    (one word, one token): FULL full samples and a last one with SHORT_LABELS label tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from launcher.data.preprocess import main as preprocess_main

    tmp = tmp_path_factory.mktemp("words")
    words = [f"w{i}" for i in range(VOCAB - 1)]
    tok = Tokenizer(models.WordLevel({"<eos>": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp / "tokenizer.json"))
    rng = random.Random(0)
    doc = " ".join(rng.choice(words) for _ in range(FULL * SEQ + SHORT_LABELS))
    (tmp / "doc.txt").write_text(doc)
    out = tmp / "shards"
    assert preprocess_main(["--input", str(tmp / "doc.txt"), "--output", str(out), "--seq-length", str(SEQ),
                            "--tokenizer", str(tmp / "tokenizer.json"), "--workers", "1"]) == 0
    return out


def _eval_config(data: Path, run_dir: Path, micro: int):
    from launcher.config import load_config

    samples = FULL + 1
    return load_config(None, [*TINY, "data.source=shards", f"data.path={data}", f"data.valid_path={data}",
                              "data.num_workers=0", f"train.micro_batch_size={micro}",
                              f"train.global_batch_size={samples}", f"train.eval_batches={samples // micro}",
                              f"logging.run_dir={run_dir}"])


def _hand_computed(trainer, data: Path, run_dir: Path) -> dict:
    """Per-sample masked loss sums and label counts with the trainer's weights, one sample per forward."""
    import torch.nn.functional as F

    from launcher.data.build import build_loader

    loader = build_loader(_eval_config(data, run_dir, 1), "valid", 0, 1)
    trainer.model.eval()
    sums, counts = [], []
    with torch.no_grad():
        for _ in range(FULL + 1):
            mb = next(loader)
            logits = trainer.model(mb["tokens"]).double()
            ce = F.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), reduction="none")
            sums.append(float((ce * mb["loss_mask"].flatten().double()).sum()))
            counts.append(float(mb["loss_mask"].sum()))
    trainer.model.train()
    return {"sums": sums, "counts": counts}


def _evaluate_at(rank, world_size, data: Path, run_dir: Path, micro_sizes: tuple[int, ...]) -> dict:
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize

    losses = {}
    for micro in micro_sizes:
        trainer = Trainer(_eval_config(data, run_dir, micro), initialize(1, 1, 1))  # DP = world size
        losses[micro] = trainer.evaluate()
    hand = _hand_computed(trainer, data, run_dir) if world_size == 1 else None
    return {"losses": losses, "hand": hand}


def test_validation_loss_is_token_weighted_at_every_micro_batch_size_and_layout(word_shards, tmp_path):
    single = run_distributed(_evaluate_at, 1, word_shards, tmp_path / "single", (1, 2, 7))[0]
    sums, counts = single["hand"]["sums"], single["hand"]["counts"]
    assert counts == [float(SEQ)] * FULL + [float(SHORT_LABELS)]  # the last sample is short, its padding masked
    token_mean = sum(sums) / sum(counts)
    mean_of_sample_means = sum(s / c for s, c in zip(sums, counts)) / len(sums)
    assert abs(mean_of_sample_means - token_mean) > 1e-2  # the data tells the two apart
    for micro, loss in single["losses"].items():
        assert loss == pytest.approx(token_mean, abs=1e-5), (micro, single["losses"], token_mean)
    dp2 = run_distributed(_evaluate_at, 2, word_shards, tmp_path / "dp2", (1, 7))
    for rank in dp2:  # DP rank 1 holds the short sample at micro-batch size 7
        for micro, loss in rank["losses"].items():
            assert loss == pytest.approx(token_mean, abs=1e-5), (micro, rank["losses"], token_mean)


# ---------------------------------------------------------------- training

MICRO, PER_MICRO = 4, 2
LABELS = [[16, 3], [16, 16], [9, 1], [16, 12]]
"""Label tokens of each sample of the step's micro-batches: unequal per micro-batch, and per DP rank at DP=2
(rank 0 takes micro-batches 0 and 2: 29 tokens, rank 1 takes 1 and 3: 60)."""


def _step_batches() -> list[dict]:
    gen = torch.Generator().manual_seed(3)
    seq = torch.randint(0, VOCAB, (MICRO, PER_MICRO, SEQ + 1), generator=gen)
    mask = torch.tensor([[[1.0] * n + [0.0] * (SEQ - n) for n in mb] for mb in LABELS])
    return [{"tokens": seq[i, :, :-1], "labels": seq[i, :, 1:], "loss_mask": mask[i]} for i in range(MICRO)]


def _train_config(run_dir: str, *extra: str):
    from launcher.config import load_config

    return load_config(None, [*TINY, "data.source=synthetic", f"train.micro_batch_size={PER_MICRO}",
                              f"train.global_batch_size={MICRO * PER_MICRO}", "moe.aux_loss_coeff=0",
                              "moe.z_loss_coeff=0", f"logging.run_dir={run_dir}", *extra])


def _reference(cfg) -> tuple[float, dict[str, torch.Tensor]]:
    """The token-weighted mean loss of the whole global batch in one forward, and its gradient (no aux losses:
    they are per-micro-batch means by design, not token losses)."""
    import torch.nn.functional as F

    from parallel.groups import ParallelGroups
    from parallel.model import build_model

    model = build_model(cfg, ParallelGroups.single())
    model.set_step(0)
    batches = _step_batches()
    tokens, labels, mask = (torch.cat([mb[key] for mb in batches]) for key in ("tokens", "labels", "loss_mask"))
    ce = F.cross_entropy(model(tokens).float().flatten(0, 1), labels.flatten(), reduction="none")
    loss = (ce * mask.flatten()).sum() / mask.sum()
    loss.backward()
    return float(loss.detach()), {name: p.grad for name, p in model.named_parameters()}


def _train_step_at(rank, world_size, run_dir: str, pp: int) -> dict:
    from launcher.train.trainer import Trainer
    from parallel.groups import initialize
    from parallel.sharding import get_spec, local_slices

    cfg = _train_config(run_dir, f"parallel.pp={pp}")
    groups = initialize(1, pp, 1)
    want_loss, want_grads = _reference(cfg)
    trainer = Trainer(cfg, groups)
    trainer.loader = iter(_step_batches()[groups.dp_rank::groups.dp_size])  # micro-batches r, r + dp, ...
    loss, _, _, _ = trainer.train_step()
    for name, p in trainer.model.named_parameters():
        expected = want_grads[name][local_slices(get_spec(p), groups)]
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=2e-6, msg=lambda m: f"{name}: {m}")
    return {"loss": loss, "want_loss": want_loss, "checked": sorted(n for n, _ in trainer.model.named_parameters()),
            "reference": sorted(want_grads)}


@pytest.mark.parametrize("world, pp", [(1, 1), (4, 2)], ids=["single", "pp2-dp2"])
def test_training_step_has_the_gradient_of_the_token_weighted_mean(tmp_path, world, pp):
    results = run_distributed(_train_step_at, world, str(tmp_path), pp)
    for r in results:  # every rank reports the same loss, the one-batch token-weighted mean
        assert r["loss"] == pytest.approx(r["want_loss"], abs=1e-5)
    assert set().union(*(r["checked"] for r in results)) == set(results[0]["reference"])  # stages split them
