"""One typed config tree for a moetron run.

Sources, in order of precedence (later wins): dataclass defaults < YAML recipe < dotted CLI overrides
(``moe.num_experts=8``), read by :mod:`launcher.config_parse`. Unknown keys and wrong types fail with the full key
path named. Each section checks its own cross-field rules (its ``validate``: moe_core/model_config.py,
moe_core/config.py, parallel/config.py and the sections below) and defines its derived values (properties); :func:`validate` composes them with the rules
that span packages, before any process group is created. Once the world size is known, :func:`resolve` turns every
automatic (null) setting into its value; that resolved config is what the run uses and writes into the run
directory (:func:`save_resolved`), so every run can be reproduced from its own folder.

Errors are :class:`ConfigError` (one line, names the key and what to do); the CLI prints them without a trace.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from launcher.config_parse import ConfigError, apply_override, from_dict, read_recipe
from launcher.errors import ArgumentParser, report
from launcher.config_sections import CheckpointConfig, DataConfig, LoggingConfig, OptimConfig, TrainConfig
from moe_core.model_config import ModelConfig
from parallel.config import FP8Config, ParallelConfig, ParallelMoEConfig


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: ParallelMoEConfig = field(default_factory=ParallelMoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fp8: FP8Config = field(default_factory=FP8Config)


def load_config(recipe: Optional[str | Path] = None, overrides: list[str] = ()) -> Config:
    """Build and validate a Config from an optional YAML recipe plus dotted overrides (automatic settings stay
    null until :func:`resolve`)."""
    raw = read_recipe(recipe) if recipe is not None else {}
    for ov in overrides:
        apply_override(raw, ov)
    return config_from_dict(raw)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> Config:
    """Rebuild and validate a Config from a raw or resolved dict, e.g. the one stored in a checkpoint."""
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def resolve(cfg: Config, world_size: int) -> Config:
    """A copy of ``cfg`` with every automatic (null) setting replaced by its value for a run of ``world_size``
    ranks on this machine: what the run uses and records (``<run_dir>/config.yaml``, TensorBoard, checkpoints).
    Idempotent: a resolved config (or its config.yaml read back as a recipe) resolves to itself. Nulls that mean
    "off" (``moe.capacity_factor``, ``data.valid_path``, an unknown ``logging.peak_tflops``, ``train.cpu_threads``
    where CUDA is available, ``parallel.pp_layout``: the even split) stay null."""
    out = copy.deepcopy(cfg)
    o, dp = out.optim, out.parallel.data_parallel_size(world_size)
    if out.model.attention == "gqa":  # MLA's head widths are its own fields
        out.model.head_dim = out.model.head_width
    out.moe.matryoshka.eval_k = out.moe.default_eval_k
    out.moe.norm_topk_prob = out.moe.normalised_topk_prob
    if out.model.rope_scaling.type == "yarn":
        out.model.rope_scaling.attention_factor = out.model.rope_scaling.cos_sin_scale
    o.min_lr = o.final_lr
    if o.distributed is None:  # bf16/fp8 parameters take their fp32 main weights from the distributed optimizer
        o.distributed = dp > 1 or out.train.precision != "fp32"
    if o.overlap_param_gather is None:  # megatron-core's gather hooks would break compiled blocks' graphs
        o.overlap_param_gather = not out.train.compile
    if o.bucket_size is None:  # megatron-core's default (DistributedDataParallel.__init__)
        o.bucket_size = max(40_000_000, 1_000_000 * dp)
    if out.checkpoint.dir is None:
        out.checkpoint.dir = str(Path(out.logging.run_dir) / "checkpoints")
    if out.train.cpu_threads is None:
        from launcher.env import cpu_threads

        threads = cpu_threads()
        out.train.cpu_threads = None if threads is None else threads[0]
    if out.logging.peak_tflops is None:
        from launcher.train.metrics import datasheet_peak_tflops  # lazy: torch

        out.logging.peak_tflops = datasheet_peak_tflops(out.train.precision)
    return out


def resolved_dict(data: dict, world_size: int) -> dict:
    """A config dict stored by an earlier run (a checkpoint's), resolved as :func:`resolve` does, so that its
    automatic settings compare as values with a resolved config's; a dict this version cannot read (another
    version's keys) is returned as it is."""
    try:
        resolved = to_dict(resolve(from_dict(Config, data), world_size))
    except ConfigError:
        return data
    return _overlay(data, resolved)


def _overlay(data: dict, values: dict) -> dict:
    """``data``'s keys (only those: keys it lacks stay absent) with the values of ``values``."""
    return {k: _overlay(v, values[k]) if isinstance(v, dict) else values[k] for k, v in data.items()}


def save_resolved(cfg: Config, run_dir: str | Path) -> Path:
    """Write ``cfg`` as YAML to ``<run_dir>/config.yaml``, readable as a recipe; returns the file path. A run writes
    its resolved config (:func:`resolve`); ``moetron convert`` writes a recipe whose automatic settings the run
    that reads it resolves."""
    out = Path(run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(out)
    return out


# ---------------------------------------------------------------- checks that span packages

def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Every section's own checks (its ``validate``) and the rules that span packages; each field's own range is
    declared next to it and checked when the config is parsed. ``world_size`` adds :func:`validate_world`. Whether
    data directories exist is the run's check (:func:`check_data_dirs`), not the config's."""
    m, o, tr = cfg.model, cfg.optim, cfg.train
    try:
        m.validate()
        cfg.moe.validate(m)
        cfg.parallel.validate(m, cfg.moe)
        tr.validate()
        o.validate()
        cfg.data.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require((tr.micro_batch_size * m.seq_length) % cfg.parallel.tp == 0,
             f"train.micro_batch_size * model.seq_length must be divisible by parallel.tp ({cfg.parallel.tp})")
    _require(o.distributed is not False or tr.precision == "fp32",
             f"optim.distributed=false needs train.precision=fp32: {tr.precision} parameters take their fp32 main "
             "weights from the distributed optimizer (leave optim.distributed unset, or true)")
    _require(not (tr.compile and o.overlap_param_gather),
             "optim.overlap_param_gather=true cannot go with train.compile=true: megatron-core's parameter all-gather "
             "runs from forward pre-hooks inside the compiled blocks and breaks their graphs; leave "
             "optim.overlap_param_gather unset (null: off with compile)")
    _validate_recompute(cfg)
    _validate_device_needs(cfg)
    if tr.precision == "fp8":
        from parallel.fp8.swap import fp8_unavailable_here  # lazy: TE is only imported when fp8 is asked for

        reason = fp8_unavailable_here(cfg)
        _require(reason is None, str(reason))
    if world_size is not None:
        validate_world(cfg, world_size)


def _validate_recompute(cfg: Config) -> None:
    """train.recompute_modules that name a part this model lacks, and recompute with TE's FP8 (its delayed scaling
    would update the amax history again in the recomputed forward)."""
    mods, m = cfg.train.recompute_modules, cfg.model
    _require("mla_up_proj" not in mods or m.attention == "mla",
             "train.recompute_modules: mla_up_proj needs model.attention=mla (this model uses gqa)")
    _require("mlp" not in mods or bool(m.dense_layers),
             "train.recompute_modules: mlp recomputes the dense layers' FFN and model.dense_layers is empty")
    _require("shared_experts" not in mods or cfg.moe.shared_expert_ffn_hidden_size > 0,
             "train.recompute_modules: shared_experts needs moe.shared_expert_ffn_hidden_size > 0")
    _require(cfg.train.recompute == "none" or cfg.train.precision != "fp8" or cfg.fp8.backend == "torchao",
             "train.recompute with fp8.backend=te is not supported (TE's amax history would be updated again by "
             "the recomputed forward): use fp8.backend=torchao, or train.recompute=none")


def check_data_dirs(data: DataConfig) -> None:
    """ConfigError naming the first ``data.*`` directory that does not exist (when reading shards): the run's
    check, made before it starts; listing settings (``moetron config``) does not need the data."""
    if data.source != "shards":
        return
    for key in ("path", "valid_path"):
        path = getattr(data, key)
        _require(path is None or Path(path).is_dir(),
                 f"data.{key} '{path}' does not exist (run `moetron preprocess` to make shards)")
    for i, entry in enumerate(data.paths):
        _require(Path(entry.path).is_dir(), f"data.paths[{i}].path '{entry.path}' does not exist (run `moetron "
                                            "preprocess` to make shards)")


def _validate_device_needs(cfg: Config) -> None:
    """Settings that need a CUDA GPU fail here, in one line, instead of as a traceback after start-up."""
    if not (cfg.parallel.backend == "nccl" or (cfg.moe.mone.enabled and cfg.moe.mone.backend == "triton")):
        return
    import os

    import torch

    if torch.cuda.is_available():
        return
    _require(cfg.parallel.backend != "nccl",
             "parallel.backend=nccl needs CUDA GPUs and none is visible: use parallel.backend=auto (gloo on CPU)")
    _require(os.environ.get("TRITON_INTERPRET") == "1",
             "moe.mone.backend=triton needs a CUDA GPU and none is visible: use moe.mone.backend=auto (the torch "
             "path on CPU), or TRITON_INTERPRET=1 for Triton's slow interpreter")


def check_eval_batches(batches: int, dp_size: int, key: str, group: int = 1) -> None:
    """ConfigError unless ``batches`` validation micro-batches split evenly over ``dp_size`` DP ranks, each rank's
    share a multiple of ``group`` (``ParallelConfig.micro_batch_group``)."""
    _require(batches >= 1 and batches % dp_size == 0,
             f"{key} ({batches}) must be a positive multiple of the data-parallel size ({dp_size}): validation "
             "batches are split evenly over DP ranks")
    _require((batches // dp_size) % group == 0,
             f"{key} ({batches}) / data-parallel size ({dp_size}) must be a multiple of parallel.pp ({group}) with "
             "parallel.virtual_pp > 1: the interleaved schedule runs micro-batches in groups of pp")


def validate_world(cfg: Config, world_size: int) -> None:
    """Checks that need the world size; run before any process group is created."""
    par, tr = cfg.parallel, cfg.train
    try:
        par.validate_world(world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dp = par.data_parallel_size(world_size)
    if tr.eval_interval:
        check_eval_batches(tr.eval_batches, dp, "train.eval_batches", par.micro_batch_group)
    _require(tr.global_batch_size % (tr.micro_batch_size * dp) == 0,
             f"train.global_batch_size ({tr.global_batch_size}) must be divisible by train.micro_batch_size * "
             f"data-parallel size ({tr.micro_batch_size}*{dp})")
    micro = tr.global_batch_size // (tr.micro_batch_size * dp)
    _require(micro % par.micro_batch_group == 0,
             f"parallel.virtual_pp > 1 needs the micro-batches per step ({micro} = train.global_batch_size / "
             f"(train.micro_batch_size * data-parallel size)) divisible by parallel.pp ({par.pp})")


def main(argv: Optional[list[str]] = None) -> int:
    """``moetron config [--recipe R] [key.path=value ...]``: the config, every key with its value, type, default,
    allowed range and meaning (the dataclasses' own documentation). Automatic settings show as null (a run resolves
    them: :func:`resolve`); the data directories need not exist yet."""
    from launcher.config_doc import describe

    p = ArgumentParser(prog="moetron config", description=main.__doc__.split("\n\n")[0])
    p.add_argument("--recipe", help="YAML recipe (see recipes/); without it, the defaults")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. moe.num_experts=8")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        return report(e)
    print(describe(cfg))  # the command's product: stdout, as it is
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
