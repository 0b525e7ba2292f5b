"""One typed config tree for a moetron run.

Sources, in order of precedence (later wins): dataclass defaults < YAML recipe < dotted CLI overrides
(``moe.num_experts=8``). Unknown keys and wrong types fail with the full key path named; every cross-field
invariant lives in :func:`validate`, which runs before any process group is created. The resolved config is
written into the run directory (:func:`save_resolved`) so every run can be reproduced from its own folder.

Errors are :class:`ConfigError` (one line, names the key and what to do); the CLI prints them without a trace.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from moe_core.config import ModelConfig
from parallel.config import FP8Config, ParallelConfig, ParallelMoEConfig


class ConfigError(ValueError):
    """A recipe or override is invalid. The message is one line naming the key path."""


@dataclass
class TrainConfig:
    seed: int = 1234
    steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 8
    """Sequences per optimizer step over all DP ranks; grad accumulation = global / (micro * dp)."""
    precision: Literal["fp32", "bf16", "fp8"] = "fp32"
    max_consecutive_nonfinite: int = 5
    """Steps whose loss is NaN/inf are skipped and counted; this many in a row stops the run."""
    exit_interval: int = 0
    """Save a checkpoint and exit cleanly when the step count reaches a multiple of N (0 = never); for
    time-sliced allocations. The LR schedule still spans train.steps, so a later run resumes seamlessly."""
    eval_interval: int = 0
    """Validation every N steps (0 = never during training)."""
    eval_batches: int = 4


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 10
    decay: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global grad-norm clip (0 disables)."""


@dataclass
class DataConfig:
    source: Literal["synthetic", "shards"] = "synthetic"
    """synthetic = deterministic random tokens (tests, benchmarks); shards = webdataset shards from preprocess."""
    path: Optional[str] = None
    """Directory of training shards (with index.json) when source = shards."""
    valid_path: Optional[str] = None
    """Directory of validation shards; None uses held-out synthetic data or the training shards' tail."""
    num_workers: int = 0
    shuffle_buffer: int = 256


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Checkpoint root; None means <run_dir>/checkpoints."""
    interval: int = 0
    """Save every N steps (0 = only at the end)."""
    keep_last: int = 2
    save_at_end: bool = True
    """Save when training finishes (turn off for throughput benchmarks)."""
    resume: Literal["auto", "never"] = "auto"
    """auto resumes from the latest complete checkpoint under dir if one exists."""


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    log_interval: int = 1
    tensorboard: bool = True
    peak_tflops: Optional[float] = None
    """Per-device peak TFLOP/s for MFU; None picks a known value per device (CPU: measured matmul peak)."""


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


# ---------------------------------------------------------------- parsing

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check/convert ``value`` to type ``tp``; raise ConfigError naming ``path`` if it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported field type {_type_name(tp)}")  # a bug in this file, not in the recipe


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_dict(cls: type, data: dict, path: str) -> Any:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{path}.{key}" if path else key
            raise ConfigError(f"unknown key '{full}' (valid keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """CLI values are YAML scalars/lists: 8, 0.5, true, null, [1,2], 'abc'."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(raw: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` override to the raw (dict) tree in place."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key.path=value (e.g. moe.num_experts=8)")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
    node[parts[-1]] = _parse_scalar(text)


def load_config(recipe: Optional[str | Path] = None, overrides: list[str] = ()) -> Config:
    """Build and validate a Config from an optional YAML recipe plus dotted overrides."""
    raw: dict = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe '{path}' not found (pass a YAML file, e.g. recipes/smoke_cpu.yaml)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe '{path}' must be a mapping of sections (model:, moe:, ...)")
    for ov in overrides:
        apply_override(raw, ov)
    cfg = _from_dict(Config, raw, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> Config:
    """Rebuild and validate a Config from a (resolved) dict, e.g. the one stored in a checkpoint."""
    cfg = _from_dict(Config, data, "")
    validate(cfg)
    return cfg


def save_resolved(cfg: Config, run_dir: str | Path) -> Path:
    """Write the fully resolved config as YAML into the run directory; returns the file path."""
    out = Path(run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(out)
    return out


# ---------------------------------------------------------------- cross-field checks

def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return world_size // (cfg.parallel.tp * cfg.parallel.pp)


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """All cross-field invariants, in one place. ``world_size`` adds the checks that depend on it."""
    m, moe, par, tr = cfg.model, cfg.moe, cfg.parallel, cfg.train
    for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "seq_length"):
        _require(getattr(m, name) > 0, f"model.{name} must be > 0, got {getattr(m, name)}")
    _require(m.num_attention_heads % m.num_query_groups == 0,
             f"model.num_query_groups ({m.num_query_groups}) must divide model.num_attention_heads "
             f"({m.num_attention_heads})")
    if m.head_dim is None:
        _require(m.hidden_size % m.num_attention_heads == 0,
                 f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads "
                 f"({m.num_attention_heads}), or set model.head_dim")
    for i in m.dense_layers:
        _require(0 <= i < m.num_layers, f"model.dense_layers: layer {i} is outside [0, {m.num_layers})")
    _require(moe.num_experts >= 1, f"moe.num_experts must be >= 1, got {moe.num_experts}")
    _require(1 <= moe.top_k <= moe.num_experts,
             f"moe.top_k ({moe.top_k}) must be in [1, moe.num_experts={moe.num_experts}]")
    _require(moe.capacity_factor is None or moe.capacity_factor > 0,
             f"moe.capacity_factor must be > 0 or null (dropless), got {moe.capacity_factor}")
    _require(0.0 < moe.mone.keep_ratio <= 1.0, f"moe.mone.keep_ratio must be in (0, 1], got {moe.mone.keep_ratio}")
    mm = moe.matryoshka
    if mm.enabled:
        _require(1 <= mm.k_min <= mm.k_max <= moe.num_experts,
                 f"moe.matryoshka needs 1 <= k_min ({mm.k_min}) <= k_max ({mm.k_max}) <= moe.num_experts "
                 f"({moe.num_experts})")
        _require(mm.tau > 0, f"moe.matryoshka.tau must be > 0, got {mm.tau}")
    if mm.eval_k is not None:
        ks = mm.eval_k if isinstance(mm.eval_k, list) else [mm.eval_k]
        for k in ks:
            _require(1 <= k <= moe.num_experts, f"moe.matryoshka.eval_k: k={k} outside [1, {moe.num_experts}]")
        n_moe = m.num_layers - len(set(m.dense_layers))
        _require(not isinstance(mm.eval_k, list) or len(mm.eval_k) == n_moe,
                 f"moe.matryoshka.eval_k lists {len(ks)} values but the model has {n_moe} MoE layers")
    _require(not (moe.mone.enabled and moe.mone.balance_loss_coeff > 0 and par.ep > 1),
             "moe.mone.balance_loss_coeff > 0 is only defined without expert parallelism (each EP rank would "
             "normalise over its own experts): set it to 0 or use parallel.ep=1")
    _require(moe.dispatcher != "llep" or moe.capacity_factor is None,
             "moe.dispatcher=llep is dropless: set moe.capacity_factor=null")
    for name in ("tp", "pp", "ep"):
        _require(getattr(par, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(par, name)}")
    _require(moe.num_experts % par.ep == 0,
             f"moe.num_experts ({moe.num_experts}) must be divisible by parallel.ep ({par.ep})")
    _require(m.num_attention_heads % par.tp == 0 and m.num_query_groups % par.tp == 0,
             f"parallel.tp ({par.tp}) must divide model.num_attention_heads ({m.num_attention_heads}) and "
             f"model.num_query_groups ({m.num_query_groups})")
    _require(m.vocab_size % par.tp == 0, f"parallel.tp ({par.tp}) must divide model.vocab_size ({m.vocab_size})")
    _require(m.num_layers % par.pp == 0,
             f"parallel.pp ({par.pp}) must divide model.num_layers ({m.num_layers})")
    _require((tr.micro_batch_size * m.seq_length) % par.tp == 0,
             f"train.micro_batch_size * model.seq_length must be divisible by parallel.tp ({par.tp})")
    _require(tr.steps >= 1, f"train.steps must be >= 1, got {tr.steps}")
    _require(tr.exit_interval >= 0, f"train.exit_interval must be >= 0, got {tr.exit_interval}")
    _require(cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    _require(cfg.data.source != "shards" or cfg.data.path is not None,
             "data.path is required when data.source=shards (run `moetron preprocess` to make shards)")
    if cfg.data.source == "shards" and cfg.data.path is not None:
        _require(Path(cfg.data.path).is_dir(),
                 f"data.path '{cfg.data.path}' does not exist (run `moetron preprocess` to make shards)")
    if tr.precision == "fp8":
        from parallel.fp8 import fp8_unavailable_here  # lazy: TE is only imported when fp8 is asked for

        reason = fp8_unavailable_here(cfg.fp8)
        _require(reason is None, str(reason))
    if world_size is not None:
        validate_world(cfg, world_size)


def validate_world(cfg: Config, world_size: int) -> None:
    """Checks that need the world size; run before any process group is created."""
    par, tr = cfg.parallel, cfg.train
    mp = par.tp * par.pp
    _require(world_size % mp == 0,
             f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {par.tp}*{par.pp}")
    dp = world_size // mp
    _require((par.tp * dp) % par.ep == 0,
             f"parallel.ep ({par.ep}) must divide parallel.tp * data-parallel size ({par.tp}*{dp}) "
             f"at world size {world_size}")
    _require(tr.eval_interval == 0 or tr.eval_batches % dp == 0,
             f"train.eval_batches ({tr.eval_batches}) must be a multiple of the data-parallel size ({dp}): "
             "validation batches are split evenly over DP ranks")
    _require(tr.global_batch_size % (tr.micro_batch_size * dp) == 0,
             f"train.global_batch_size ({tr.global_batch_size}) must be divisible by train.micro_batch_size * "
             f"data-parallel size ({tr.micro_batch_size}*{dp})")
