"""`moetron evaluate` on a tiny M-MoE checkpoint trained in-process, periodic validation scalars, and the recipes.

The checkpoint is trained once per module (synthetic Markov data, 4 steps, validation every 2 steps). Checks: the
eval's k sweep gives a different loss per k and writes the JSON; the loss at a k equals the one periodic
validation logged at the same step (same weights, same batches); ``--k-list k,k`` equals ``--k k``; the same
checkpoint evaluated at EP=2 x DP=2, at PP=2 and at the default layout of a 2-rank world (DP=2) gives the
single-process losses; the eval layout falls back to tp = pp = ep = 1 when the world size is not the training's;
bad k values fail before any work with a message naming the fix.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from launcher import pretrain
from launcher.train import evaluate
from launcher.config import load_config, to_dict, validate_world
from tests.helpers.dist import free_port, run_distributed

REPO = Path(__file__).resolve().parents[3]
STEPS, K_MAX = 4, 4
TINY = ["data.source=synthetic", "model.vocab_size=64", "model.hidden_size=32", "model.num_layers=2",
        "model.num_attention_heads=2", "model.num_query_groups=2", "model.seq_length=16", "moe.num_experts=4",
        "moe.expert_ffn_hidden_size=32", "moe.matryoshka.enabled=true", "moe.matryoshka.k_min=1",
        f"moe.matryoshka.k_max={K_MAX}", "train.micro_batch_size=2", "train.global_batch_size=4",
        f"train.steps={STEPS}", "train.eval_interval=2", "train.eval_batches=2", "optim.lr=0.01",
        "optim.warmup_steps=1", "logging.log_interval=1", "logging.tensorboard=true", "checkpoint.interval=0",
        "checkpoint.resume=never"]


def _single_rank_env(mp: pytest.MonkeyPatch) -> None:
    """A fresh one-rank torchrun-style environment (restored by ``mp``), so in-process runs never share a port."""
    mp.setenv("RANK", "0")
    mp.setenv("WORLD_SIZE", "1")
    mp.setenv("LOCAL_RANK", "0")
    mp.setenv("LOCAL_WORLD_SIZE", "1")
    mp.setenv("MASTER_ADDR", "127.0.0.1")
    mp.setenv("MASTER_PORT", str(free_port()))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("mmoe") / "run"
    with pytest.MonkeyPatch.context() as mp:
        _single_rank_env(mp)
        recipe = str(REPO / "recipes" / "smoke_cpu.yaml")
        assert pretrain.main(["--recipe", recipe, *TINY, f"logging.run_dir={run}"]) == 0
    return run


def _eval(args: list[str], *overrides: str) -> int:
    with pytest.MonkeyPatch.context() as mp:
        _single_rank_env(mp)
        return evaluate.main([*args, *overrides])


def _results(json_path: Path) -> list[dict]:
    return json.loads(json_path.read_text())["results"]


def _tb_scalars(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing import event_accumulator

    out: dict[str, dict[int, float]] = {}
    for f in (run / "tb").glob("events.out.tfevents.*"):
        acc = event_accumulator.EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def test_periodic_validation_logs_loss_per_k(run_dir):
    scalars = _tb_scalars(run_dir)
    tags = [f"valid/loss_k{k}" for k in range(1, K_MAX + 1)]
    for tag in ["valid/loss", *tags]:
        assert sorted(scalars[tag]) == [2, 4], tag
    for step in (2, 4):
        assert scalars["valid/loss"][step] == scalars[f"valid/loss_k{K_MAX}"][step]  # eval k defaults to k_max
        assert len({round(scalars[t][step], 6) for t in tags}) == K_MAX
    assert scalars["valid/loss"][4] < scalars["valid/loss"][2]  # the model learns between the validations


def test_eval_sweep_over_k(run_dir, capsys):
    assert _eval(["--checkpoint", str(run_dir), "--k", "1,2,3,4", "--batches", "2"]) == 0
    report = json.loads((run_dir / "eval" / f"step_{STEPS:07d}.json").read_text())
    assert report["step"] == STEPS and report["batches"] == 2 and report["samples"] == 4
    rows = report["results"]
    assert [r["k"] for r in rows] == [1, 2, 3, 4]
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses) and len({round(v, 6) for v in losses}) == 4
    for r in rows:
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-12)
    logged = _tb_scalars(run_dir)  # periodic validation after the last step: same weights, same batches
    for r in rows:
        assert r["loss"] == pytest.approx(logged[f"valid/loss_k{r['k']}"][STEPS], abs=1e-5)
    table = capsys.readouterr().out
    assert re.search(r"^3\s+\d+\.\d{4}\s+\d+\.\d{2}$", table, re.M), table


def test_eval_k_list_per_layer(run_dir, tmp_path):
    ckpt = str(run_dir / "checkpoints")  # a checkpoint root works too; the JSON goes to logging.run_dir
    assert _eval(["--checkpoint", ckpt, "--k", "2", "--batches", "2"], f"logging.run_dir={tmp_path / 'a'}") == 0
    assert _eval(["--checkpoint", ckpt, "--k-list", "2,2", "--batches", "2"], f"logging.run_dir={tmp_path / 'b'}") == 0
    assert _eval(["--checkpoint", ckpt, "--k-list", "1,4", "--batches", "2"], f"logging.run_dir={tmp_path / 'c'}") == 0
    (uniform,), (as_list,), (mixed,) = (_results(tmp_path / d / "eval" / f"step_{STEPS:07d}.json") for d in "abc")
    assert as_list["k"] == [2, 2] and as_list["loss"] == uniform["loss"]
    assert mixed["k"] == [1, 4] and mixed["loss"] != uniform["loss"]


@pytest.mark.parametrize("args, message", [
    (["--k", "1,5"], "--k: k=5 must be an int in [1, moe.num_experts=4]"),
    (["--k-list", "1,2,3"], "--k-list gives 3 values but the model has 2 MoE layers"),
])
def test_eval_rejects_bad_k(run_dir, capsys, args, message):
    assert _eval(["--checkpoint", str(run_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_eval_rejects_missing_checkpoint(tmp_path, capsys):
    assert _eval(["--checkpoint", str(tmp_path)]) == 2
    assert f"no checkpoint found at '{tmp_path}'" in capsys.readouterr().err


def test_eval_layout_defaults_to_the_checkpoints_when_the_world_matches():
    trained = load_config(None, ["parallel.tp=2", "parallel.ep=2", "parallel.sequence_parallel=true",
                                 "train.micro_batch_size=2", "train.global_batch_size=8"])
    common = {"config": to_dict(trained), "layout": {"world": 2, "tp": 2, "pp": 1, "ep": 2}}
    same = evaluate.eval_config(common, [], world_size=2)
    assert (same.parallel.tp, same.parallel.ep, same.train.global_batch_size) == (2, 2, 2)
    single = evaluate.eval_config(common, [], world_size=1)
    assert (single.parallel.tp, single.parallel.ep, single.train.global_batch_size) == (1, 1, 2)
    assert same.parallel.sequence_parallel and not single.parallel.sequence_parallel  # needs tp > 1
    four = evaluate.eval_config(common, ["parallel.ep=4"], world_size=4)
    assert (four.parallel.tp, four.parallel.ep, four.train.global_batch_size) == (1, 4, 8)
    assert not four.logging.tensorboard


def _eval_on_rank(rank, world_size, ckpt: str, out: str, overrides: list[str]) -> list[dict]:
    assert evaluate.main(["--checkpoint", ckpt, "--k", "1,3", "--batches", "2", f"logging.run_dir={out}",
                          *overrides]) == 0
    return _results(Path(out) / "eval" / f"step_{STEPS:07d}.json") if rank == 0 else []


@pytest.mark.parametrize("layout", [["parallel.ep=2"], ["parallel.pp=2"], []], ids=["ep2_dp2", "pp2", "default"])
def test_eval_matches_single_process_at_other_layouts(run_dir, tmp_path, layout):
    ckpt = str(run_dir / "checkpoints" / f"step_{STEPS:07d}")
    assert _eval(["--checkpoint", ckpt, "--k", "1,3", "--batches", "2"], f"logging.run_dir={tmp_path / 'ref'}") == 0
    reference = _results(tmp_path / "ref" / "eval" / f"step_{STEPS:07d}.json")
    distributed = run_distributed(_eval_on_rank, 2, ckpt, str(tmp_path / "dist"), layout)[0]
    assert [r["k"] for r in distributed] == [1, 3]
    for got, want in zip(distributed, reference):
        assert got["loss"] == pytest.approx(want["loss"], abs=2e-5)


# ---------------------------------------------------------------- recipes

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def _header_command(recipe: Path) -> tuple[int, str]:
    """(processes, recipe path) of the training command written in the recipe's header comment (torchrun's
    processes, or the ``WORLD_SIZE=N`` of a dry-run command)."""
    text = recipe.read_text()
    m = re.search(r"^#.*?(?:torchrun .*?--nproc-per-node (\d+) -m|(?:WORLD_SIZE=(\d+) )?python3? -m) "
                  r"launcher\.pretrain --recipe (\S+)", text, re.M)
    assert m, f"{recipe.name}: the header names no `launcher.pretrain --recipe` command"
    return int(m.group(1) or m.group(2) or 1), m.group(3)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_loads_and_fits_its_launch_command(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "smoke").mkdir(parents=True)  # data.path must exist; the shards are not read here
    processes, named = _header_command(recipe)
    assert named == f"recipes/{recipe.name}"
    cfg = load_config(recipe)
    validate_world(cfg, processes)
    dp = processes // (cfg.parallel.tp * cfg.parallel.pp)
    assert cfg.train.eval_interval == 0 or cfg.train.eval_batches % dp == 0  # validation splits batches over DP


SCALE_RECIPES = ["qwen3_30b_a3b", "qwen3_235b_a22b", "deepseek_v3_671b"]


@pytest.mark.parametrize("name", SCALE_RECIPES)
def test_scale_recipes_dry_run_at_their_layout_and_fit_80_gb(name, capsys):
    """docs/scale.md: each published-size recipe's --dry-run at the world size its header names, and its settings
    fit an 80 GB GPU (the estimate, before allocator slack)."""
    from launcher import pretrain
    from launcher.train.memory import estimate

    recipe = REPO / "recipes" / f"{name}.yaml"
    processes, _ = _header_command(recipe)
    cfg = load_config(recipe)
    assert processes >= 64 and cfg.train.recompute != "none"
    assert estimate(cfg, processes).total < 80e9
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORLD_SIZE", str(processes))
        assert pretrain.main(["--recipe", str(recipe), "--dry-run"]) == 0
    assert f"dry run: {processes} rank(s)" in capsys.readouterr().out


def _recipe(name: str):
    return load_config(REPO / "recipes" / f"{name}.yaml", ["data.source=synthetic"])


def test_recipes_have_their_own_run_dirs():
    """checkpoint.resume=auto would otherwise resume another recipe's checkpoint."""
    run_dirs = [load_config(r, ["data.source=synthetic"]).logging.run_dir for r in RECIPES]
    assert len(set(run_dirs)) == len(run_dirs), run_dirs


def test_variant_recipes_enable_their_variant():
    mone, mmoe, both = (_recipe(n).moe for n in ("smoke_mone", "smoke_matryoshka", "smoke_mone_matryoshka"))
    assert (mone.mone.enabled, mone.matryoshka.enabled) == (True, False)
    assert (mmoe.mone.enabled, mmoe.matryoshka.enabled) == (False, True)
    assert (both.mone.enabled, both.matryoshka.enabled) == (True, True)
    llep, tp2_ep2, pp2 = (_recipe(n) for n in ("smoke_llep_ep4", "smoke_tp2_ep2", "smoke_pp2"))
    assert (llep.moe.dispatcher, llep.parallel.ep) == ("llep", 4)
    assert (tp2_ep2.parallel.tp, tp2_ep2.parallel.ep, tp2_ep2.parallel.pp) == (2, 2, 1)
    assert (pp2.parallel.tp, pp2.parallel.pp) == (1, 2)
