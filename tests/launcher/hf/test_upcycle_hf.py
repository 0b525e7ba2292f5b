"""`moetron convert upcycle`: a tiny random dense Qwen3 / Llama built by transformers (fp32) -> a moetron MoE
checkpoint whose step-0 logits equal the dense model's within 1e-5 (plain, granular, Matryoshka at its eval k with
raw gates, a shared expert), from which 20 steps of pretraining run on CPU; bad arguments are one line, exit 2,
nothing written."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch

from launcher.hf import convert
from tests.helpers.dist import run_distributed
from tests.launcher.hf.test_families import TOKENS, _load
from tests.moe_core.test_hf_families import CASES, hf_model

RUNS = {  # name: (dense family, upcycle arguments, moe settings the checkpoint must have)
    "plain": ("qwen3", ["--experts", "4", "--top-k", "2"], dict(num_experts=4, top_k=2, expert_ffn_hidden_size=48)),
    "granular": ("qwen3", ["--experts", "8", "--top-k", "4", "--granularity", "2"],
                 dict(num_experts=8, top_k=4, expert_ffn_hidden_size=24)),
    "matryoshka": ("llama", ["--experts", "4", "--top-k", "2", "--matryoshka", "1:2"],
                   dict(num_experts=4, top_k=2, renormalise_gates=False)),
    "shared": ("llama", ["--experts", "4", "--top-k", "1", "--shared-expert", "--norm-topk-prob", "true"],
               dict(num_experts=4, top_k=1, shared_expert_ffn_hidden_size=48)),
}
SETTINGS = ["data.source=synthetic", "logging.tensorboard=false", "train.micro_batch_size=2",
            "train.global_batch_size=2", "train.steps=20", "optim.warmup_steps=2", "logging.log_interval=100"]


def _upcycle(rank, world_size, root, args):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = convert.main(["upcycle", "--hf", f"{root}/hf", "--output", f"{root}/ckpt", *args, *SETTINGS])
    if rc:
        return rc, err.getvalue(), None, None
    model = _load(f"{root}/ckpt")
    with torch.no_grad():
        logits = model(TOKENS)
    moe = convert.checkpoint_config(convert.checkpoint.find_latest(f"{root}/ckpt")).moe
    return rc, err.getvalue() + out.getvalue(), logits, moe


def _pretrain(rank, world_size, root):
    from launcher.config import load_config
    from launcher.train.trainer import Trainer
    from parallel import groups as pgroups

    trainer = Trainer(load_config(f"{root}/ckpt/config.yaml"), pgroups.initialize(1, 1, 1))
    result = trainer.fit()
    return result.final_step, result.losses


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    done = {}

    def get(name: str):
        if name not in done:
            family, args, _ = RUNS[name]
            root = tmp_path_factory.mktemp(name)
            hf = hf_model(family, CASES[family][0])
            hf.save_pretrained(root / "hf")
            with torch.no_grad():
                dense_logits = hf(TOKENS).logits
            done[name] = (root, dense_logits, *run_distributed(_upcycle, 1, str(root), args, timeout=600)[0])
        return done[name]

    return get


@pytest.mark.parametrize("name", list(RUNS))
def test_upcycled_logits_equal_the_dense_model(upcycled, name):
    root, dense_logits, rc, printed, logits, moe = upcycled(name)
    assert rc == 0, printed
    assert {k: getattr(moe, k) for k in RUNS[name][2]} == RUNS[name][2]
    assert moe.matryoshka.enabled == (name == "matryoshka")
    torch.testing.assert_close(logits, dense_logits, rtol=1e-5, atol=1e-5)
    assert f"moetron pretrain --recipe {root / 'ckpt' / 'config.yaml'}" in printed


def test_twenty_steps_of_pretraining_continue_from_the_upcycled_checkpoint(upcycled):
    root = upcycled("plain")[0]
    final_step, losses = run_distributed(_pretrain, 1, str(root), timeout=600)[0]
    assert final_step == 20 and sorted(losses) == list(range(20)), losses
    assert torch.isfinite(torch.tensor(list(losses.values()))).all()


@pytest.mark.parametrize("args, message", [
    (["--experts", "4", "--top-k", "2", "--granularity", "5"], "granularity 5 must be >= 1 and divide"),
    (["--experts", "6", "--top-k", "3", "--granularity", "2"], "must be multiples of the granularity (2)"),
    (["--experts", "4", "--top-k", "2", "--matryoshka", "1:2", "--granularity", "2"],
     "granular upcycling needs renormalised gates")])
def test_bad_arguments_are_one_line_and_write_nothing(upcycled, tmp_path, args, message):
    root = upcycled("plain")[0]
    (tmp_path / "hf").symlink_to(root / "hf")
    rc, err, _, _ = run_distributed(_upcycle, 1, str(tmp_path), args)[0]
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
