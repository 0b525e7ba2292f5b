"""The run-level sections of the config tree (YAML ``train``, ``optim``, ``data``, ``checkpoint``, ``logging``).

Each section documents its fields with their ranges, checks its own cross-field rules (``validate``, ValueError
naming the key) and defines its derived values; ``launcher/config.py`` composes them with the model, MoE and
parallel sections into :class:`launcher.config.Config`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional

from moe_core.config_fields import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range


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
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute (moe_core/recompute.py; torch's non-reentrant checkpoint): none = keep every activation;
    full = keep only each transformer block's input and recompute the block in backward (about one more forward:
    +33% of the step's FLOPs; an MoE block with EP runs its all-to-alls again); selective = the parts named in
    train.recompute_modules. Recomputed values equal the first pass's bit for bit (same k, neurons, RNG)."""
    recompute_modules: list[Literal["core_attn", "moe_act", "shared_experts", "norm", "mla_up_proj", "moe", "mlp"]] = \
        field(default_factory=list)
    """train.recompute=selective only (empty otherwise): any of core_attn (softmax(qk^T)v), moe_act (the routed
    experts' SwiGLU and down projection, nothing dispatched twice), shared_experts, norm (the block's RMSNorms),
    mla_up_proj (MLA's up-projections and RoPE; needs model.attention=mla), moe (the whole MoE layer; with EP its
    all-to-alls run again in backward), mlp (the dense layers' FFN; needs model.dense_layers). Saved bytes and
    FLOPs per module: docs/scale.md."""
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

    hang_timeout_s: Annotated[float, Range(ge=0, le=86_400)] = 300.0
    """Hang detection (launcher/train/watchdog.py; 0 = off): when one phase of a step (data, forward_backward,
    optimizer, step_reduce) stays unfinished this many seconds on any rank (4x for the first step of a process,
    validation and checkpoint saves, which may compile or write for long), every rank writes its Python stacks to
    <logging.run_dir>/hang/rank_N.txt, rank 0 prints one line naming the ranks that stopped and their phase, writes
    <logging.run_dir>/HUNG and the job exits with code 75 (slurm/pretrain.sbatch requeues it). Keep it above the
    slowest step and below MOETRON_DIST_TIMEOUT_MINUTES (10 min), after which a hung collective fails on its own."""

    def validate(self) -> None:
        from moe_core.recompute import Recompute

        problem = Recompute(self.recompute, frozenset(self.recompute_modules)).problem()
        if problem is not None:
            raise ValueError(problem)
        if len(set(self.recompute_modules)) != len(self.recompute_modules):
            raise ValueError(f"train.recompute_modules lists a module twice: {self.recompute_modules}")
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
    async_save: bool = False
    """true | false. true: interval saves copy the state to host memory and write it from a background thread
    while training goes on (torch DCP's writer through megatron-core's async request); 'latest' moves once every
    rank's files and the manifest are complete (checked after each step), and the save at the end, a stop or an
    exit waits for it. Costs one host copy of each rank's share of the weights and optimizer state while it writes."""


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
