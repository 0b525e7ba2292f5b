"""One typed config tree for a moetron run.

Sources, in order of precedence (later wins): dataclass defaults < YAML recipe < dotted CLI overrides
(``moe.num_experts=8``). Unknown keys and wrong types fail with the full key path named; every cross-field
invariant lives in :func:`validate`, which runs before any process group is created. The resolved config is
written into the run directory (:func:`save_resolved`) so every run can be reproduced from its own folder.

Errors are :class:`ConfigError` (one line, names the key and what to do); the CLI prints them without a trace.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml

from launcher.errors import ArgumentParser, OneLineError
from moe_core.config import ModelConfig
from moe_core.config_fields import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range
from parallel.config import FP8Config, ParallelConfig, ParallelMoEConfig


class ConfigError(OneLineError):
    """A recipe or override is invalid. The message is one line naming the key path."""


@dataclass
class TrainConfig:
    seed: NonNegativeInt = 1234
    """Seeds the weight init, the data order, the synthetic data and the M-MoE k draws."""
    steps: PositiveInt = 100
    """Optimizer steps of the whole run (the LR schedule spans them)."""
    micro_batch_size: PositiveInt = 4
    """Sequences per forward/backward on one DP rank."""
    global_batch_size: PositiveInt = 8
    """Sequences per optimizer step over all DP ranks; grad accumulation = global / (micro * dp)."""
    precision: Literal["fp32", "bf16", "fp8"] = "fp32"
    """fp32; bf16 = bf16 compute with fp32 master weights; fp8 = bf16 plus FP8 projections (the fp8 section). fp32 is
    the CPU/reference precision: on a GPU its expert GEMMs run as a per-expert loop with a host sync per layer
    (torch._grouped_mm takes bf16 only on CUDA), so train in bf16 or fp8 there."""
    compile: bool = False
    """torch.compile each transformer block (regional compilation, as torchtitan does; parallel/compile.py): fuses
    norms, RoPE, SwiGLU, the routing math and FP8 casts. The first step pays the compile (tens of seconds per
    distinct block; Matryoshka adds one compile per k in [k_min, k_max]). Needs train.precision bf16 or fp8."""
    max_consecutive_nonfinite: PositiveInt = 5
    """Steps whose loss is NaN/inf are skipped and counted; this many in a row stops the run."""
    exit_interval: NonNegativeInt = 0
    """Save a checkpoint and exit cleanly when the step count reaches a multiple of N (0 = never); for
    time-sliced allocations. The LR schedule still spans train.steps, so a later run resumes seamlessly."""
    eval_interval: NonNegativeInt = 0
    """Validation every N steps (0 = never during training)."""
    eval_batches: PositiveInt = 4
    """Validation micro-batches per evaluation, split evenly over DP ranks."""


@dataclass
class OptimConfig:
    lr: Annotated[float, Range(ge=0, le=10)] = 3e-3
    """Peak learning rate, reached after warmup_steps (AdamW moves each weight by about lr per step: nothing trains
    far above 1, and beyond float32's range torch fails)."""
    min_lr: Optional[NonNegativeFloat] = None
    """Learning rate at the end of the decay (<= lr); null = lr / 10."""
    warmup_steps: NonNegativeInt = 10
    """Steps of linear warmup from lr / warmup_steps to lr."""
    decay: Literal["cosine", "constant"] = "cosine"
    """After warmup: cosine decay to min_lr at train.steps, or constant lr."""
    weight_decay: NonNegativeFloat = 0.1
    """AdamW decoupled weight decay (not applied to 1-D parameters)."""
    beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9
    """AdamW first-moment decay."""
    beta2: Annotated[float, Range(ge=0, lt=1)] = 0.95
    """AdamW second-moment decay."""
    eps: PositiveFloat = 1e-8
    """AdamW denominator epsilon."""
    grad_clip: NonNegativeFloat = 1.0
    """Global grad-norm clip (0 disables)."""
    distributed: Optional[bool] = None
    """megatron-core's distributed optimizer (ZeRO-1, parallel/optimizer.py): fp32 main weights and Adam moments
    sharded over the (expert-)data-parallel group, fp32 gradient buffers reduce-scattered in buckets. null = on when
    the data-parallel size is > 1 or train.precision is bf16/fp8 (bf16 parameters take their fp32 main weights
    from it); false = torch AdamW replicated on every DP rank (fp32 only; the bit-exact reference)."""
    overlap_grad_reduce: bool = True
    """Distributed optimizer: start each bucket's reduce-scatter while backward still runs."""
    overlap_param_gather: Optional[bool] = None
    """Distributed optimizer: all-gather the updated parameters during the next forward, bucket by bucket. null = on,
    except with train.compile: megatron-core starts these all-gathers from forward pre-hooks on every module, which
    would sit inside the compiled blocks and break their graphs (true with train.compile is refused)."""
    bucket_size: Optional[PositiveInt] = None
    """Distributed optimizer: gradient elements per reduce-scatter bucket; null = megatron-core's default
    (max(4e7, 1e6 * data-parallel size))."""


@dataclass
class DataSource:
    path: Optional[str] = None
    """Directory of shards (with index.json) written by `moetron preprocess`; required."""
    weight: Optional[PositiveFloat] = None
    """Share of the mixture's samples, > 0; required. Weights are normalised to sum to 1."""


@dataclass
class DataConfig:
    source: Literal["synthetic", "shards"] = "synthetic"
    """synthetic = deterministic random tokens (tests, benchmarks); shards = webdataset shards from preprocess."""
    path: Optional[str] = None
    """Directory of training shards (with index.json) when source = shards."""
    paths: list[DataSource] = field(default_factory=list)
    """Instead of path: a weighted mixture, [{path: DIR, weight: W > 0}, ...], weights normalised (Megatron's
    --data-path W1 DIR1 W2 DIR2), all tokenized with one tokenizer. Sample g of the run comes from a source chosen
    by a fixed low-discrepancy rule, so every window of N samples holds weight * N + O(log N) of each source
    (launcher/data/loader.py, Blend); each source keeps its own position, resumed exactly."""
    valid_path: Optional[str] = None
    """Directory of validation shards; None uses held-out synthetic data, the valid split of path, or with paths
    the valid splits of all sources mixed with the same weights."""
    num_workers: NonNegativeInt = 0
    """DataLoader worker processes per rank for the training shards (0 = read in the training process)."""
    shuffle_buffer: NonNegativeInt = 256
    """Samples mixed by the streaming shuffle of the training shards (0 or 1 = shard order only)."""


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Checkpoint root; None means <run_dir>/checkpoints."""
    interval: NonNegativeInt = 0
    """Save every N steps (0 = only at the end)."""
    keep_last: NonNegativeInt = 2
    """Checkpoints kept under dir; older ones are removed after each save (0 keeps all)."""
    save_at_end: bool = True
    """Save when training finishes (turn off for throughput benchmarks)."""
    resume: Literal["auto", "never"] = "auto"
    """auto resumes from the latest complete checkpoint under dir if one exists."""


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    """Directory of the run: resolved config.yaml, TensorBoard events and (by default) checkpoints."""
    log_interval: PositiveInt = 1
    """Progress line and metrics every N steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under <run_dir>/tb."""
    peak_tflops: Optional[PositiveFloat] = None
    """Per-device dense peak TFLOP/s for MFU; None uses the datasheet value of a known GPU, and where there is none
    (CPU, a GPU not in launcher/train/metrics.py's table) MFU is reported as n/a and only TFLOP/s is logged."""


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

_INT64 = Range(ge=-(1 << 63), lt=1 << 63)  # every config integer ends up in a C int64 somewhere
_FLOAT_TEXT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:inf|infinity|nan)", re.IGNORECASE)
"""Float spellings YAML 1.1 leaves as strings (1e-4, 1E-4, +1e3, 1.0e4, nan): read as numbers, so every float
field takes what people write. Ranges then reject nan/inf (:mod:`moe_core.config_fields`)."""


class _RangeError(ConfigError):
    """The value has the field's type but is outside its declared range."""


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}


def _type_name(tp: Any) -> str:
    """How an error line names a field type: "an integer", "a list", ..."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is list:
        return "a list"
    if origin is Literal:
        return f"one of {list(typing.get_args(tp))}"
    return _TYPE_NAMES.get(tp) or getattr(tp, "__name__", None) or str(tp)


def _number(value: Any, path: str) -> float:
    if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        value = float(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise _RangeError(f"{path}: {value} is too large for a float") from None


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check/convert ``value`` to type ``tp`` (and its declared :class:`Range`); raise ConfigError naming ``path``
    if it does not fit."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        inner, *metadata = typing.get_args(tp)
        value = _coerce(value, inner, path)
        for allowed in metadata:
            if isinstance(allowed, Range) and not allowed.contains(value):
                raise _RangeError(f"{path}: {value!r} is outside the allowed range {allowed}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except _RangeError:
                raise  # the value has this member's type but not its range: that is what to report
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {' or '.join(map(_type_name, args))}, got {value!r}")
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
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if not _INT64.contains(value):
            raise _RangeError(f"{path}: {value} does not fit in 64 bits")
        return value
    if tp is float:
        return _number(value, path)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported field type {_type_name(tp)}")  # a bug in this file, not in the recipe


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)  # extras: keep each field's Annotated Range


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
    """CLI values are YAML scalars/lists: 8, 0.5, 1e-4, true, null, [1,2], 'abc'."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
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


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}{where}"


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: YAML would silently keep the last
    one (a repeated ``model:`` section would drop the first one's fields)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_recipe(recipe: str | Path) -> dict:
    """The raw section tree of a YAML recipe; any unreadable, non-text or non-YAML file is one ConfigError."""
    path = Path(recipe)
    if not path.is_file():
        raise ConfigError(f"recipe '{path}' not found (pass a YAML file, e.g. recipes/smoke_cpu.yaml)")
    try:
        text = path.read_bytes().decode("utf-8")
        raw = yaml.load(text, Loader=_RecipeLoader)
    except OSError as e:
        raise ConfigError(f"recipe '{path}' cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe '{path}' is not a text file (byte {e.start} is not UTF-8): pass a YAML "
                          "recipe, e.g. recipes/smoke_cpu.yaml") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe '{path}' is not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:
        raise ConfigError(f"recipe '{path}' is nested too deeply to be a recipe") from None
    if raw is None:
        raise ConfigError(f"recipe '{path}' is empty: a recipe is one complete YAML file (see recipes/smoke_cpu.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe '{path}' must be a mapping of sections (model:, moe:, ...)")
    return raw


def load_config(recipe: Optional[str | Path] = None, overrides: list[str] = ()) -> Config:
    """Build and validate a Config from an optional YAML recipe plus dotted overrides."""
    raw = read_recipe(recipe) if recipe is not None else {}
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


def uses_distributed_optimizer(cfg: Config, dp_size: int) -> bool:
    """``optim.distributed`` resolved: as set, else on when DP > 1 or the run is bf16/fp8."""
    if cfg.optim.distributed is not None:
        return cfg.optim.distributed
    return dp_size > 1 or cfg.train.precision != "fp32"


def overlap_param_gather(cfg: Config) -> bool:
    """``optim.overlap_param_gather`` resolved: as set, else on unless ``train.compile``."""
    if cfg.optim.overlap_param_gather is not None:
        return cfg.optim.overlap_param_gather
    return not cfg.train.compile


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """All cross-field invariants, in one place (each field's own range is declared next to it and checked when the
    config is parsed). ``world_size`` adds the checks that depend on it."""
    m, moe, par, tr = cfg.model, cfg.moe, cfg.parallel, cfg.train
    try:
        m.validate_attention()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    gqa = m.attention == "gqa"
    _require(not gqa or m.num_attention_heads % m.num_query_groups == 0,
             f"model.num_query_groups ({m.num_query_groups}) must divide model.num_attention_heads "
             f"({m.num_attention_heads})")
    if gqa and m.head_dim is None:
        _require(m.hidden_size % m.num_attention_heads == 0,
                 f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads "
                 f"({m.num_attention_heads}), or set model.head_dim")
    head_dim = m.head_dim or m.hidden_size // m.num_attention_heads
    _require(not gqa or head_dim % 2 == 0, f"the head width ({head_dim}: model.head_dim, or model.hidden_size / "
                                           "model.num_attention_heads) must be even: RoPE rotates pairs of channels")
    for i in m.dense_layers:
        _require(i < m.num_layers, f"model.dense_layers: layer {i} is outside [0, {m.num_layers})")
    _require(moe.top_k <= moe.num_experts,
             f"moe.top_k ({moe.top_k}) must be in [1, moe.num_experts={moe.num_experts}]")
    mm = moe.matryoshka
    if mm.enabled:
        _require(mm.k_min <= mm.k_max <= moe.num_experts,
                 f"moe.matryoshka needs 1 <= k_min ({mm.k_min}) <= k_max ({mm.k_max}) <= moe.num_experts "
                 f"({moe.num_experts})")
    if mm.eval_k is not None:
        ks = mm.eval_k if isinstance(mm.eval_k, list) else [mm.eval_k]
        for k in ks:
            _require(k <= moe.num_experts, f"moe.matryoshka.eval_k: k={k} outside [1, {moe.num_experts}]")
        n_moe = m.num_layers - len(set(m.dense_layers))
        _require(not isinstance(mm.eval_k, list) or len(mm.eval_k) == n_moe,
                 f"moe.matryoshka.eval_k lists {len(ks)} values but the model has {n_moe} MoE layers")
    _require(not (moe.mone.enabled and moe.mone.balance_loss_coeff > 0 and par.ep > 1),
             "moe.mone.balance_loss_coeff > 0 is only defined without expert parallelism (each EP rank would "
             "normalise over its own experts): set it to 0 or use parallel.ep=1")
    _require(moe.dispatcher != "llep" or moe.capacity_factor is None,
             "moe.dispatcher=llep is dropless: set moe.capacity_factor=null")
    _require(moe.num_experts % par.ep == 0,
             f"moe.num_experts ({moe.num_experts}) must be divisible by parallel.ep ({par.ep})")
    _require(m.num_attention_heads % par.tp == 0 and (not gqa or m.num_query_groups % par.tp == 0),
             f"parallel.tp ({par.tp}) must divide model.num_attention_heads ({m.num_attention_heads})"
             + (f" and model.num_query_groups ({m.num_query_groups})" if gqa else ""))
    _require(m.vocab_size % par.tp == 0, f"parallel.tp ({par.tp}) must divide model.vocab_size ({m.vocab_size})")
    _require(m.num_layers % par.pp == 0,
             f"parallel.pp ({par.pp}) must divide model.num_layers ({m.num_layers})")
    _require((tr.micro_batch_size * m.seq_length) % par.tp == 0,
             f"train.micro_batch_size * model.seq_length must be divisible by parallel.tp ({par.tp})")
    _require(cfg.optim.min_lr is None or cfg.optim.min_lr <= cfg.optim.lr,
             f"optim.min_lr ({cfg.optim.min_lr}) must be <= optim.lr ({cfg.optim.lr}), the peak the schedule decays "
             f"from: set optim.min_lr as well (e.g. optim.min_lr={cfg.optim.lr / 10:g})")
    _require(cfg.optim.distributed is not False or tr.precision == "fp32",
             f"optim.distributed=false needs train.precision=fp32: {tr.precision} parameters take their fp32 main "
             "weights from the distributed optimizer (leave optim.distributed unset, or true)")
    _require(not tr.compile or tr.precision != "fp32",
             "train.compile=true needs train.precision=bf16 or fp8 (torch.compile's grouped expert GEMM takes bf16 "
             "only): set train.precision=bf16, or train.compile=false")
    _require(not (tr.compile and cfg.optim.overlap_param_gather),
             "optim.overlap_param_gather=true cannot go with train.compile=true: megatron-core's parameter all-gather "
             "runs from forward pre-hooks inside the compiled blocks and breaks their graphs; leave "
             "optim.overlap_param_gather unset (null: off with compile)")
    _validate_data(cfg.data)
    _validate_device_needs(cfg)
    if tr.precision == "fp8":
        from parallel.fp8 import fp8_unavailable_here  # lazy: TE is only imported when fp8 is asked for

        reason = fp8_unavailable_here(cfg)
        _require(reason is None, str(reason))
    if world_size is not None:
        validate_world(cfg, world_size)


def _validate_data(data: DataConfig) -> None:
    """data.path or data.paths (not both) when reading shards; every directory exists; mixture entries complete
    and each directory listed once."""
    _require(not (data.path is not None and data.paths),
             "data.path and data.paths are mutually exclusive: give one directory as data.path or a weighted mixture "
             "as data.paths")
    _require(not data.paths or data.source == "shards", "data.paths needs data.source=shards")
    _require(data.source != "shards" or data.path is not None or bool(data.paths),
             "data.path is required when data.source=shards (or data.paths, a weighted mixture; run `moetron "
             "preprocess` to make shards)")
    if data.source != "shards":
        return
    for key in ("path", "valid_path"):
        path = getattr(data, key)
        _require(path is None or Path(path).is_dir(),
                 f"data.{key} '{path}' does not exist (run `moetron preprocess` to make shards)")
    seen: dict[Path, int] = {}
    for i, entry in enumerate(data.paths):
        key = f"data.paths[{i}]"
        _require(entry.path is not None, f"{key}.path is required: a directory written by `moetron preprocess`")
        _require(entry.weight is not None, f"{key}.weight is required: a number > 0 (weights are normalised to sum "
                                           "to 1)")
        _require(Path(entry.path).is_dir(), f"{key}.path '{entry.path}' does not exist (run `moetron preprocess` to "
                                            "make shards)")
        first = seen.setdefault(Path(entry.path).resolve(), i)
        _require(first == i, f"{key}.path '{entry.path}' repeats data.paths[{first}].path: list each directory once "
                             "(with the sum of its weights)")


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


def main(argv: Optional[list[str]] = None) -> int:
    """``moetron config [--recipe R] [key.path=value ...]``: the resolved config, every key with its value, type,
    default, allowed range and meaning (the dataclasses' own documentation)."""
    import sys

    from launcher.config_doc import describe

    p = ArgumentParser(prog="moetron config", description=main.__doc__.split("\n\n")[0])
    p.add_argument("--recipe", help="YAML recipe (see recipes/); without it, the defaults")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. moe.num_experts=8")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        print(f"moetron: config error: {e}", file=sys.stderr)
        return 2
    print(describe(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
