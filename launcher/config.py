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
from typing import Annotated, Literal, Optional

import yaml

from launcher.config_parse import ConfigError, apply_override, from_dict, read_recipe
from launcher.errors import ArgumentParser, report
from moe_core.model_config import ModelConfig
from moe_core.config_fields import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range
from parallel.config import FP8Config, ParallelConfig, ParallelMoEConfig


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
    cpu_threads: Optional[PositiveInt] = None
    """CPU runs only (ignored where CUDA is available): intra-op threads per rank (torch.set_num_threads). null =
    automatic: OMP_NUM_THREADS when set, else the cores this process may use // the ranks on this node
    (LOCAL_WORLD_SIZE), at least 1; stays null on CUDA. More threads than cores make a loaded machine spin. The run
    block prints it."""

    def validate(self) -> None:
        if self.compile and self.precision == "fp32":
            raise ValueError("train.compile=true needs train.precision=bf16 or fp8 (torch.compile's grouped expert "
                             "GEMM takes bf16 only): set train.precision=bf16, or train.compile=false")


@dataclass
class OptimConfig:
    lr: Annotated[float, Range(ge=0, le=10)] = 3e-3
    """Peak learning rate, reached after warmup_steps (AdamW moves each weight by about lr per step: nothing trains
    far above 1, and beyond float32's range torch fails)."""
    min_lr: Optional[NonNegativeFloat] = None
    """Learning rate at the end of the decay (<= lr); null = automatic: lr / 10."""
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
    """megatron-core's distributed optimizer (ZeRO-1, parallel/optim/optimizer.py): fp32 main weights and Adam moments
    sharded over the (expert-)data-parallel group, fp32 gradient buffers reduce-scattered in buckets. null =
    automatic: on when the data-parallel size is > 1 or train.precision is bf16/fp8 (bf16 parameters take their fp32
    main weights from it); false = torch AdamW replicated on every DP rank (fp32 only; the bit-exact reference)."""
    overlap_grad_reduce: bool = True
    """Distributed optimizer: start each bucket's reduce-scatter while backward still runs."""
    overlap_param_gather: Optional[bool] = None
    """Distributed optimizer: all-gather the updated parameters during the next forward, bucket by bucket. null =
    automatic: on, except with train.compile: megatron-core starts these all-gathers from forward pre-hooks on every
    module, which would sit inside the compiled blocks and break their graphs (true with train.compile is refused)."""
    bucket_size: Optional[PositiveInt] = None
    """Distributed optimizer: gradient elements per reduce-scatter bucket (one bucket for all when
    overlap_grad_reduce is false); null = automatic: megatron-core's default, max(4e7, 1e6 * data-parallel size)."""

    @property
    def final_lr(self) -> float:
        """The learning rate at the end of the decay: min_lr, or lr / 10 when it is null."""
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def validate(self) -> None:
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr ({self.min_lr}) must be <= optim.lr ({self.lr}), the peak the schedule "
                             f"decays from: set optim.min_lr as well (e.g. optim.min_lr={self.lr / 10:g})")


@dataclass
class DataSource:
    path: Optional[str] = None
    """Directory of shards (with index.json) written by `moetron preprocess`; required (null is an error)."""
    weight: Optional[PositiveFloat] = None
    """Share of the mixture's samples, > 0; required (null is an error). Weights are normalised to sum to 1."""


@dataclass
class DataConfig:
    source: Literal["synthetic", "shards"] = "synthetic"
    """synthetic = deterministic random tokens (tests, benchmarks); shards = webdataset shards from preprocess."""
    path: Optional[str] = None
    """Directory of training shards (with index.json) when source = shards; null = none (synthetic data, or
    data.paths)."""
    paths: list[DataSource] = field(default_factory=list)
    """Instead of path: a weighted mixture, [{path: DIR, weight: W > 0}, ...], weights normalised (Megatron's
    --data-path W1 DIR1 W2 DIR2), all tokenized with one tokenizer. Sample g of the run comes from a source chosen
    by a fixed low-discrepancy rule, so every window of N samples holds weight * N + O(log N) of each source
    (launcher/data/mixture.py, Blend); each source keeps its own position, resumed exactly."""
    valid_path: Optional[str] = None
    """Directory of validation shards (its valid split, or its training split if it has none); null = off: no
    separate directory, validation reads held-out synthetic data, the valid split of path, or with paths the valid
    splits of all sources mixed with the same weights."""
    num_workers: NonNegativeInt = 0
    """DataLoader worker processes per rank for the training shards (0 = read in the training process)."""
    shuffle_buffer: NonNegativeInt = 256
    """Samples mixed by the streaming shuffle of the training shards (0 or 1 = shard order only)."""

    def validate(self) -> None:
        """data.path or data.paths (not both) when reading shards; mixture entries complete, each directory listed
        once. Whether the directories exist is the run's check (``check_data_dirs``)."""
        if self.path is not None and self.paths:
            raise ValueError("data.path and data.paths are mutually exclusive: give one directory as data.path or a "
                             "weighted mixture as data.paths")
        if self.paths and self.source != "shards":
            raise ValueError("data.paths needs data.source=shards")
        if self.source == "shards" and self.path is None and not self.paths:
            raise ValueError("data.path is required when data.source=shards (or data.paths, a weighted mixture; run "
                             "`moetron preprocess` to make shards)")
        seen: dict[Path, int] = {}
        for i, entry in enumerate(self.paths):
            key = f"data.paths[{i}]"
            if entry.path is None:
                raise ValueError(f"{key}.path is required: a directory written by `moetron preprocess`")
            if entry.weight is None:
                raise ValueError(f"{key}.weight is required: a number > 0 (weights are normalised to sum to 1)")
            first = seen.setdefault(Path(entry.path).resolve(), i)
            if first != i:
                raise ValueError(f"{key}.path '{entry.path}' repeats data.paths[{first}].path: list each directory "
                                 "once (with the sum of its weights)")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Checkpoint root; null = automatic: <run_dir>/checkpoints."""
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
    """Per-device dense peak TFLOP/s for MFU; null = automatic: the datasheet value of the GPU the run is on, and
    where there is none (CPU, a GPU not in launcher/train/metrics.py's table) it stays null = off: MFU is reported as
    n/a and only TFLOP/s is logged."""


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
    where CUDA is available) stay null."""
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
    _validate_device_needs(cfg)
    if tr.precision == "fp8":
        from parallel.fp8.swap import fp8_unavailable_here  # lazy: TE is only imported when fp8 is asked for

        reason = fp8_unavailable_here(cfg)
        _require(reason is None, str(reason))
    if world_size is not None:
        validate_world(cfg, world_size)


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


def check_eval_batches(batches: int, dp_size: int, key: str) -> None:
    """ConfigError unless ``batches`` validation micro-batches split evenly over ``dp_size`` DP ranks."""
    _require(batches >= 1 and batches % dp_size == 0,
             f"{key} ({batches}) must be a positive multiple of the data-parallel size ({dp_size}): validation "
             "batches are split evenly over DP ranks")


def validate_world(cfg: Config, world_size: int) -> None:
    """Checks that need the world size; run before any process group is created."""
    par, tr = cfg.parallel, cfg.train
    try:
        par.validate_world(world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dp = par.data_parallel_size(world_size)
    if tr.eval_interval:
        check_eval_batches(tr.eval_batches, dp, "train.eval_batches")
    _require(tr.global_batch_size % (tr.micro_batch_size * dp) == 0,
             f"train.global_batch_size ({tr.global_batch_size}) must be divisible by train.micro_batch_size * "
             f"data-parallel size ({tr.micro_batch_size}*{dp})")


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
