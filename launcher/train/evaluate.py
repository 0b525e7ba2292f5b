"""`moetron evaluate --checkpoint DIR [--k 1,2,4 | --k-list 1,2,2,4] [--batches N] [key.path=value ...]`: validation
loss and perplexity of a checkpoint, optionally swept over the MoE k (elastic inference of M-MoE models).

Single process: `python -m launcher.evaluate --checkpoint runs/smoke --k 1,2,4`
Any layout:     `torchrun --nproc-per-node 4 -m launcher.evaluate --checkpoint runs/smoke parallel.tp=2 parallel.ep=2`

``DIR`` is a checkpoint (``step_XXXXXXX``), a checkpoint root (holding ``latest``) or a run directory (holding
``checkpoints/``); the checkpoint ``latest`` names is used (its files are checked against its manifest first). The
config is the one stored in the checkpoint; dotted overrides change it (parallel layout, ``data.path`` /
``data.valid_path``, ``train.micro_batch_size``, ``moe.matryoshka.eval_k``, ...), but not its model: an override
of a ``model.*``/``moe.*`` setting that a resumed run could not change either is refused in one line. The
layout defaults to the checkpoint's when the world size is the training's, else to tp = pp = ep = 1.
``--k 1,2,4`` evaluates each k in every MoE layer; ``--k-list 1,2,2,4`` one run with one k per MoE layer; neither
evaluates the checkpoint's eval k (``moe.matryoshka.eval_k``, else ``k_max`` for M-MoE, else ``top_k``).
``--batches`` (default ``train.eval_batches``) counts micro-batches of the valid split over all ranks: the same
samples at every layout (see ``Trainer.evaluate``), so the numbers compare across layouts.

The table goes to stdout and as JSON to ``<run_dir>/eval/step_XXXXXXX.json``, ``run_dir`` being ``DIR`` when it
is a run directory and ``logging.run_dir`` otherwise.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from launcher import env, log as console
from launcher.errors import ArgumentParser, MoetronError, report
from launcher.train import checkpoint
from launcher.train.checkpoint_config import model_changes
from launcher.config import (Config, ConfigError, apply_override, check_data_dirs, config_from_dict, resolve,
                             to_dict, validate_world)
from moe_core.config import check_eval_k
from moe_core.matryoshka import EvalK

if TYPE_CHECKING:  # imported in main() once the config is valid, as launcher.pretrain does
    from launcher.train.trainer import Trainer

log = logging.getLogger(__name__)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"k values must be >= 1, got {text!r}")
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv):
    p = ArgumentParser(prog="moetron evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint, checkpoint root or run directory")
    ks = p.add_mutually_exclusive_group()
    ks.add_argument("--k", type=_int_list, help="sweep: evaluate each k (all MoE layers), e.g. 1,2,4")
    ks.add_argument("--k-list", type=_int_list, help="one evaluation with one k per MoE layer, e.g. 1,2,2,4")
    p.add_argument("--batches", type=_positive, help="validation micro-batches (default train.eval_batches)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 data.path=data/smoke")
    console.add_verbosity_flags(p)
    return p.parse_args(argv)


def resolve_checkpoint(path: Path) -> tuple[Path, Optional[Path]]:
    """(checkpoint directory, run directory or None) for a checkpoint, checkpoint root or run directory."""
    if (path / "metadata.json").is_file():
        return path, None
    for root, run_dir in ((path, None), (path / "checkpoints", path)):
        ckpt = checkpoint.find_latest(root)
        if ckpt is not None:
            return ckpt, run_dir
    raise ConfigError(f"no checkpoint found at '{path}': pass a step_XXXXXXX directory, a checkpoint root (with "
                      "'latest') or a run directory with checkpoints/")


def eval_config(common: dict, overrides: list[str], world_size: int) -> Config:
    """The checkpoint's resolved config with the overrides applied. The parallel layout is the checkpoint's when
    this world has the training world's size, else tp = pp = ep = 1 without sequence parallelism (checkpoints load
    at any layout); overrides win. Eval never trains: the global batch becomes one micro-batch per DP rank and
    TensorBoard is off. The result is resolved (:func:`launcher.config.resolve`) for ``world_size`` ranks."""
    raw = copy.deepcopy(common["config"])
    if common.get("layout", {}).get("world") != world_size:
        raw["parallel"].update(tp=1, pp=1, ep=1, sequence_parallel=False)
    for ov in [*overrides, "logging.tensorboard=false"]:
        apply_override(raw, ov)
    cfg = config_from_dict(raw)
    cfg.train.global_batch_size = cfg.train.micro_batch_size * max(1, cfg.parallel.data_parallel_size(world_size))
    validate_world(cfg, world_size)  # before any process group exists
    cfg = resolve(cfg, world_size)
    diffs = model_changes(common["config"], to_dict(cfg), world_size)
    if diffs:
        raise ConfigError(f"the overrides change the checkpoint's model ({', '.join(diffs)}): drop them; evaluation "
                          "uses the checkpoint's own model settings (the eval k, batch sizes, data and layout may "
                          "change)")
    check_data_dirs(cfg.data)
    return cfg


def k_values(args: argparse.Namespace, cfg: Config) -> list[EvalK]:
    """The k settings to evaluate, checked against the model before any process starts working."""
    n_moe = len(cfg.model.moe_layer_indices)
    try:
        for k in args.k or []:
            check_eval_k(k, cfg.moe.num_experts, n_moe, "--k")
        check_eval_k(args.k_list, cfg.moe.num_experts, n_moe, "--k-list")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.k is not None:
        return list(args.k)
    return [list(args.k_list)] if args.k_list is not None else [None]


def format_table(rows: list[dict]) -> str:
    lines = [f"{'k':<16} {'val loss':>10} {'perplexity':>12}"]
    lines += [f"{row['k_label']:<16} {row['loss']:>10.4f} {row['perplexity']:>12.2f}" for row in rows]
    return "\n".join(lines)


def _k_label(k: EvalK) -> str:
    if k is None:
        return "default"
    return ",".join(map(str, k)) if isinstance(k, list) else str(k)


def run_eval(trainer: Trainer, ks: list[EvalK], batches: int) -> list[dict]:
    """Validation loss and perplexity at each k (collective: every rank runs it)."""
    rows = []
    for k in ks:
        loss = trainer.evaluate(k, batches)
        rows.append({"k": k, "k_label": _k_label(k), "loss": loss, "perplexity": math.exp(loss)})
    return rows


def write_report(run_dir: Path, ckpt: Path, step: int, cfg: Config, batches: int, rows: list[dict]) -> Path:
    out = run_dir / "eval" / f"step_{step:07d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": str(ckpt), "step": step, "batches": batches,
              "samples": batches * cfg.train.micro_batch_size, "seq_length": cfg.model.seq_length,
              "layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "ep": cfg.parallel.ep},
              "results": [{k: row[k] for k in ("k", "loss", "perplexity")} for row in rows]}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console.setup(args.quiet, args.verbose)
    env.cuda_connection_default()
    try:
        ckpt, run_dir = resolve_checkpoint(args.checkpoint)
        common = checkpoint.load_common(ckpt)
        cfg = eval_config(common, args.overrides, env.world_size())
        ks = k_values(args, cfg)
    except MoetronError as e:  # every rank reads the same checkpoint and config: one line for the whole job
        return report(e, every_rank=False)
    from launcher.train.summary import data_description
    from launcher.train.trainer import Trainer

    par = cfg.parallel
    with env.parallel_session(par.tp, par.pp, par.ep, par.backend, cfg.train.cpu_threads) as groups:
        log.info(f"evaluating {ckpt} on {data_description(cfg)}")
        try:
            trainer = Trainer(cfg, groups)
            checkpoint.load(ckpt, trainer.model, None, groups)
            batches = args.batches or cfg.train.eval_batches
            rows = run_eval(trainer, ks, batches)
        except MoetronError as e:
            return report(e)
        step = int(common["step"])
        log.log(console.RESULT, f"{ckpt} (step {step}): validation loss over {batches} micro-batches of "
                f"{cfg.train.micro_batch_size}x{cfg.model.seq_length} tokens\n{format_table(rows)}")
        if groups.rank == 0:  # the report file is rank 0's to write
            out = write_report(run_dir or Path(cfg.logging.run_dir), ckpt, step, cfg, batches, rows)
            log.info(f"wrote {out}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
