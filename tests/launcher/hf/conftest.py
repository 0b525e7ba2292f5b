"""Shared fixture: three tiny models (MoE, MoNE + expert bias, Matryoshka MoE) trained one step each at TP=2/EP=2
in ONE 4-rank gloo world, their eval logits at two k values, and their to-hf exports (one 1-rank world)."""
from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.dist import run_distributed

VOCAB = 320  # >= the 257 tokens a byte-level BPE needs, divisible by TP
BASE = ["model.vocab_size=320", "model.hidden_size=32", "model.num_layers=3", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.seq_length=16", "model.dense_layers=[0]",
        "model.dense_ffn_hidden_size=48", "moe.num_experts=4", "moe.top_k=2", "moe.expert_ffn_hidden_size=24",
        "train.steps=1", "train.micro_batch_size=2", "train.global_batch_size=4", "optim.warmup_steps=1",
        "data.source=synthetic", "logging.tensorboard=false", "logging.log_interval=100"]
VARIANTS = {
    "moe": [],
    "mone": ["moe.mone.enabled=true", "moe.mone.keep_ratio=0.5", "moe.expert_bias=true",
             "moe.expert_bias_update_rate=0.01"],
    "mmoe": ["moe.matryoshka.enabled=true", "moe.matryoshka.k_min=1", "moe.matryoshka.k_max=3"],
}
K_VALUES = (1, 3)


def probe_tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


def _train_variants(rank, world_size, root):
    """Train every variant at tp=2, ep=2 (dp=2); return this rank's vocab shard of the eval logits per k."""
    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel import groups as pgroups

    groups = pgroups.initialize(2, 1, 2)
    logits = {}
    for name, overrides in VARIANTS.items():
        cfg = load_config(None, BASE + overrides + ["parallel.tp=2", "parallel.ep=2",
                                                    f"checkpoint.dir={root}/{name}/ckpt",
                                                    f"logging.run_dir={root}/{name}/run"])
        trainer = Trainer(cfg, groups)
        trainer.fit()
        trainer.model.eval()
        with torch.no_grad():
            for k in K_VALUES:
                trainer.model.set_eval_k(k)
                logits[(name, k)] = trainer.model(probe_tokens())
    return {"tp_rank": groups.tp_rank, "dp_rank": groups.dp_rank, "logits": logits}


def _convert_variants(rank, world_size, root, tokenizer):
    from launcher.hf import convert

    rcs = {}
    for name in VARIANTS:
        extra = ["--tokenizer", tokenizer, "--max-shard-size", "40KB"] if name == "moe" else []
        rcs[name] = convert.main(["to-hf", "--checkpoint", f"{root}/{name}/ckpt", "--output", f"{root}/{name}/hf",
                                  *extra])
    return rcs


def write_tokenizer(path) -> str:
    from launcher.data.tokenizer import train_tokenizer

    docs = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog."] * 20
    tok = train_tokenizer(iter(docs), 300, "<|endoftext|>")
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """{"root": dir, "ref": {(variant, k): full-vocab moetron logits}}; HF dirs at <root>/<variant>/hf."""
    root = tmp_path_factory.mktemp("convert")
    os.environ.setdefault("HF_MODULES_CACHE", str(root / "hf_modules"))
    results = run_distributed(_train_variants, 4, str(root))
    tp_shards = sorted((r for r in results if r["dp_rank"] == 0), key=lambda r: r["tp_rank"])
    ref = {key: torch.cat([r["logits"][key] for r in tp_shards], dim=-1) for key in tp_shards[0]["logits"]}
    tokenizer = write_tokenizer(root / "tokenizer.json")
    rcs = run_distributed(_convert_variants, 1, str(root), tokenizer)[0]
    assert rcs == {name: 0 for name in VARIANTS}
    return {"root": root, "ref": ref}
