"""The optimizer side of a training step: fp32 main weights and AdamW moments, data-parallel gradient reduction,
the global gradient norm, clipping, the update, and the checkpoint form of that state (collective-only methods
say so).

Two implementations behind one interface (:class:`TrainOptimizer`), chosen by :func:`build_optimizer`:

- :class:`DistributedAdam` (``optim.distributed``; default when DP > 1 or the run is bf16/fp8): megatron-core
  ``DistributedDataParallel`` + ``DistributedOptimizer`` (ZeRO-1, as Megatron-LM trains). Model parameters are in
  the compute dtype (bf16 for bf16/fp8 runs; the router stays fp32, see parallel/model.py); gradients accumulate
  in fp32 ``main_grad`` buffers over micro-batches, are reduce-scattered in buckets over the data-parallel group
  (dense parameters) or the expert-data-parallel group (expert parameters, marked ``allreduce=False``), optionally
  while backward still runs (``optim.overlap_grad_reduce``); fp32 main weights and Adam moments exist only for
  this rank's 1/DP shard; updated parameters are all-gathered, optionally during the next forward
  (``optim.overlap_param_gather``).
- :class:`LocalAdamW` (``optim.distributed=false``, fp32 only): torch AdamW on fp32 parameters replicated on every
  DP rank, gradients all-reduced by parallel/optim/grads.py. The exactness reference: resume is bit-identical.

Reduction: the gradient is that of the mean of the DP ranks' losses (both implementations scale by 1/DP, experts
included, see parallel/optim/grads.py; the trainer scales each rank's loss so that mean is the token-weighted one).
Per-head q/k-norm weights under TP are summed over TP first.
Norm: the L2 norm of the whole model's gradient, every distinct shard counted once (local: ShardSpec replication;
distributed: megatron-core's DP shards + TP-duplicate filter). A non-finite norm skips the update.

Checkpoint form, identical for both so a run may change implementation, TP/PP/EP layout or DP size: per parameter
``optim.exp_avg.<name>``, ``optim.exp_avg_sq.<name>`` and, when parameters are not fp32, the fp32 main weight
``optim.main_param.<name>``; megatron-core ShardedTensors over the GLOBAL parameter, like the weights. The
distributed optimizer assembles its DP shards into this form at save time (one all-reduce per state kind over the
(expert-)data-parallel group, so a save briefly holds this rank's full TP/EP/PP slice of the state, as
megatron-core's own ``fully_reshardable`` format does on DP rank 0) and slices its shard back out at load.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Iterator, Optional, Protocol

import torch
import torch.distributed as dist
from torch import nn

from parallel.optim.grads import clip_grads, global_grad_norm_sq, sum_pipeline_copies, sync_grads
from parallel.groups import ParallelGroups, megatron_process_groups
from parallel.sharding import get_spec, named_specs, pipeline_shared, sharded_tensor, tp_copies

MOMENTS = ("exp_avg", "exp_avg_sq")


class OptimSettings(Protocol):
    """What this module reads of the ``optim`` config section (launcher.config.OptimConfig has this shape)."""

    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    grad_clip: float
    overlap_grad_reduce: bool
    overlap_param_gather: bool
    bucket_size: Optional[int]


class TrainOptimizer:
    """One training step's optimizer work; see the module docstring. ``main_params_saved``: whether checkpoints
    carry fp32 main weights besides the model weights (parameters not in fp32)."""

    main_params_saved = False
    label = ""
    """What a person reads in the run summary."""

    def zero_grad(self) -> None:
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        raise NotImplementedError

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Context for the backward of every micro-batch but the last: no gradient reduction is started."""
        return contextlib.nullcontext()

    def reduce_grads(self) -> None:
        """Collective-only: finish the data-parallel gradient reduction of this step."""
        raise NotImplementedError

    def grad_norm_sq(self) -> torch.Tensor:
        """Collective-only: the squared global gradient norm, a float64 0-dim tensor on the training device (inf/NaN
        when a gradient is non-finite). No host read: the trainer fetches it with the step's other numbers in one
        transfer."""
        raise NotImplementedError

    def step(self, grad_norm: float) -> None:
        """Clip to ``optim.grad_clip`` by ``grad_norm`` and update. Collective-only for the distributed one."""
        raise NotImplementedError

    def sync_params(self) -> None:
        """Collective-only: make every parameter hold the latest update (before a save or an export)."""

    def updates(self) -> int:
        """Optimizer updates applied so far (Adam's bias-correction step)."""
        raise NotImplementedError

    def canonical_state(self, kind: str) -> dict[str, torch.Tensor]:
        """Collective-only for the distributed one: ``kind`` (``exp_avg``, ``exp_avg_sq`` or ``main_param``) of every
        parameter of this rank's TP/EP/PP slice, whole and fp32, keyed by parameter name (the checkpoint form)."""
        raise NotImplementedError

    def state_for_save(self, model: nn.Module, groups: ParallelGroups) -> dict[str, Any]:
        """ShardedTensors of the optimizer state, keyed as in the module docstring."""
        kinds = MOMENTS + (("main_param",) if self.main_params_saved else ())
        specs = {name: spec for name, _, spec in named_specs(model)}
        return {f"optim.{kind}.{name}": sharded_tensor(f"optim.{kind}.{name}", tensor, specs[name], groups)
                for kind in kinds for name, tensor in self.canonical_state(kind).items()}

    def state_for_load(self, model: nn.Module, groups: ParallelGroups, with_main: bool) -> dict[str, Any]:
        """fp32 load targets for :meth:`state_for_save`'s keys (``with_main``: the checkpoint holds main weights)."""
        kinds = MOMENTS + (("main_param",) if with_main else ())
        return {f"optim.{kind}.{name}": sharded_tensor(
                    f"optim.{kind}.{name}", torch.empty(p.shape, dtype=torch.float32, device=p.device), spec, groups)
                for kind in kinds for name, p, spec in named_specs(model)}

    def restore(self, loaded: dict[str, torch.Tensor], model: nn.Module, updates: int, with_main: bool) -> None:
        """Install loaded state; ``loaded`` also holds the model weights as fp32 (``model.<name>``, already copied
        into the parameters); ``updates`` restores Adam's step count."""
        raise NotImplementedError

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: ``optimizer_state`` (moments), ``main_params`` (fp32 main weights beyond the
        model's own), ``grads`` (gradient buffers)."""
        raise NotImplementedError


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (no decay on norms and other 1-D parameters), as megatron-core does."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class LocalAdamW(TrainOptimizer):
    """torch AdamW on fp32 parameters replicated over DP; parallel/optim/grads.py reduces and clips."""

    label = "AdamW replicated on every DP rank (optim.distributed=false)"

    def __init__(self, model: nn.Module, groups: ParallelGroups, cfg: OptimSettings):
        self.model, self.groups, self.cfg = model, groups, cfg
        self.optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def reduce_grads(self) -> None:
        sync_grads(self.model, self.groups)

    def grad_norm_sq(self) -> torch.Tensor:
        return global_grad_norm_sq(self.model, self.groups)

    def step(self, grad_norm: float) -> None:
        clip_grads(self.model, grad_norm, self.cfg.grad_clip)
        self.optimizer.step()

    def updates(self) -> int:
        states = [s for s in self.optimizer.state.values() if "step" in s]
        return int(states[0]["step"]) if states else 0

    def _init_state(self) -> None:
        """Materialise AdamW's lazily created state (zeros) so it can be saved before any step or be a load target."""
        for p in self.model.parameters():
            state = self.optimizer.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                for moment in MOMENTS:
                    state[moment] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def canonical_state(self, kind: str) -> dict[str, torch.Tensor]:
        self._init_state()
        return {name: p.detach() if kind == "main_param" else self.optimizer.state[p][kind]
                for name, p in self.model.named_parameters()}

    @torch.no_grad()
    def restore(self, loaded: dict[str, torch.Tensor], model: nn.Module, updates: int, with_main: bool) -> None:
        self._init_state()
        for name, p, _ in named_specs(model):
            state = self.optimizer.state[p]
            for moment in MOMENTS:
                state[moment].copy_(loaded[f"optim.{moment}.{name}"])
            state["step"].fill_(float(updates))
            if with_main:  # fp32 main weights of a bf16 run are more exact than its bf16 model weights
                p.copy_(loaded[f"optim.main_param.{name}"])

    def memory_bytes(self) -> dict[str, int]:
        self._init_state()
        moments = [s[m] for s in self.optimizer.state.values() for m in MOMENTS]
        return {"optimizer_state": _nbytes(moments), "main_params": 0,
                "grads": _nbytes(p for p in self.model.parameters())}  # one fp32 .grad per parameter


def _quiet(fn, *args, **kwargs):
    """Construct a megatron-core object without its console noise: warnings about TransformerConfig defaults we do
    not use, and DDP's log line asking callers to precompute the parameter layout it then computes itself. Nothing
    in them is for a moetron user to act on."""
    ddp_log = logging.getLogger("megatron.core.distributed.distributed_data_parallel")
    level = ddp_log.level
    ddp_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    finally:
        ddp_log.setLevel(level)


def _main_shards(sub) -> dict[nn.Parameter, torch.Tensor]:
    """Model parameter -> the fp32 main-weight shard the megatron-core DistributedOptimizer ``sub`` updates (the
    optimizer state is keyed by it). Read from its bf16 and fp32 group lists: its ``model_param_group_index_map``
    does not follow the order it gives a group that mixes bf16 and fp32 parameters (here: the fp32 router)."""
    pairs = [zip(models, shards) for models, shards in
             ((m, s) for kind in (("model_float16_groups", "shard_fp32_from_float16_groups"),
                                  ("model_fp32_groups", "shard_fp32_groups"))
              for m, s in zip(getattr(sub, kind[0]), getattr(sub, kind[1])))]
    return {model: shard for pair in pairs for model, shard in pair}


class DistributedAdam(TrainOptimizer):
    """megatron-core DistributedDataParallel + DistributedOptimizer over this rank's stage (see module docstring).

    ``model`` is the raw stage module; DDP's hooks live on its parameters and submodules, so the trainer keeps
    calling ``model`` itself."""

    label = "megatron-core distributed optimizer (fp32 main weights and Adam state sharded over DP)"

    def __init__(self, model: nn.Module, groups: ParallelGroups, cfg: OptimSettings, model_cfg):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer import TransformerConfig

        self.model, self.groups, self.cfg = model, groups, cfg
        dtypes = {p.dtype for p in model.parameters()}
        bf16 = torch.bfloat16 in dtypes
        self.main_params_saved = bf16
        for p in model.parameters():
            p.allreduce = not get_spec(p).is_expert  # megatron-core's mark for expert-data-parallel reduction
        transformer_cfg = _quiet(TransformerConfig, num_layers=model_cfg.num_layers,
                                 hidden_size=model_cfg.hidden_size,
                                 num_attention_heads=model_cfg.num_attention_heads, bf16=bf16,
                                 params_dtype=torch.bfloat16 if bf16 else torch.float32)
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True,
                                                overlap_grad_reduce=cfg.overlap_grad_reduce,
                                                overlap_param_gather=cfg.overlap_param_gather,
                                                bucket_size=cfg.bucket_size)
        process_groups = megatron_process_groups()
        self.ddp = _quiet(DistributedDataParallel, transformer_cfg, ddp_cfg, model, pg_collection=process_groups)
        optim_cfg = OptimizerConfig(optimizer="adam", lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    adam_beta1=cfg.beta1, adam_beta2=cfg.beta2, adam_eps=cfg.eps, bf16=bf16,
                                    params_dtype=torch.bfloat16 if bf16 else torch.float32,
                                    use_distributed_optimizer=True, clip_grad=cfg.grad_clip,
                                    overlap_param_gather=cfg.overlap_param_gather)
        self.optimizer = _quiet(get_megatron_optimizer, optim_cfg, [self.ddp], pg_collection=process_groups,
                                use_gloo_process_groups=False)
        for group in self.optimizer.param_groups:  # megatron leaves this to its scheduler: no decay on 1-D params
            group["weight_decay"] = cfg.weight_decay * group.get("wd_mult", 1.0)
        self._partial = [p for p in model.parameters() if get_spec(p).tp_partial_grad]
        self._pipeline_shared = pipeline_shared(model)
        self.ddp_device = next(model.parameters()).device
        self._copies = {p: tp_copies(spec, groups) * spec.pipeline_copies for _, p, spec in named_specs(model)}
        """TP peers and pipeline stages holding the same main-weight shard of each parameter (for
        :meth:`grad_norm_sq`)."""
        self._updates = 0

    def _sub_optimizers(self) -> list:
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()  # with overlap_param_gather this also starts the first parameter all-gather

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.ddp.no_sync()

    def reduce_grads(self) -> None:
        self.ddp.finish_grad_sync()
        if self._partial and self.groups.tp_size > 1:  # per-head norms: each TP rank summed its own heads only
            for p in self._partial:
                dist.all_reduce(p.main_grad, group=self.groups.tp_group)
        # the MTP embedding copy: its own bucket (shared_embedding), so this rank's DP shard of it is the same
        # elements on both stages and the sum of the whole buffers is exact where the optimizer reads it
        sum_pipeline_copies([p.main_grad for p in self._pipeline_shared], self.groups)

    def grad_norm_sq(self) -> torch.Tensor:
        """Squared global norm of the fp32 main-weight gradients, kept on the device. Each element of a parameter's
        gradient lives in exactly one (expert-)DP rank's shard; a parameter replicated over TP (norms, the router,
        experts are not: EP owns them) has the same shard on every TP peer, so it counts 1/tp per peer
        (``parallel.sharding.tp_copies``; the MTP embedding copy on the last stage halves it again;
        ``global_grad_norm_sq`` divides the replicated AdamW's full gradients by the whole ``replication``).
        megatron-core's own ``get_grad_norm`` is not used: it reads the norm on the host and its TP-duplicate filter
        (``param.tensor_model_parallel``) drops every non-TP parameter on TP ranks > 0, expert shards included,
        which undercounted the norm at TP > 1 with DP > 1."""
        self.optimizer.prepare_grads()  # main_grad shards -> fp32 main-weight .grad
        by_count: dict[int, list[torch.Tensor]] = {}
        for sub in self._sub_optimizers():
            for model_param, shard in _main_shards(sub).items():
                if shard.grad is not None:
                    by_count.setdefault(self._copies[model_param], []).append(shard.grad)
        total = torch.zeros((), dtype=torch.float64, device=self.ddp_device)
        for copies, grads in by_count.items():
            total += torch.stack(torch._foreach_norm(grads)).double().square().sum() / copies
        dist.all_reduce(total, group=dist.group.WORLD)  # shards are disjoint over DP, stages and EP ranks
        return total

    def step(self, grad_norm: float) -> None:
        from megatron.core.optimizer.optimizer import clip_grad_by_total_norm_fp32

        if 0 < self.cfg.grad_clip < grad_norm:
            for sub in self._sub_optimizers():
                params = sub.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(params, self.cfg.grad_clip, grad_norm)
        self.optimizer.step_with_ready_grads()
        self._updates += 1

    def sync_params(self) -> None:
        if self.cfg.overlap_param_gather:
            self.ddp.start_param_sync(force_sync=True)

    def updates(self) -> int:
        return self._updates

    # ------------------------------------------------------------ checkpoint form
    def _shards(self) -> Iterator[tuple[Any, list[tuple[str, nn.Parameter, Any, slice, dict]]]]:
        """Per megatron sub-optimizer (dense, expert): its (expert-)data-parallel group and, for every parameter
        it holds, (name, param, spec, flat range of this rank's shard, {"param", "exp_avg", "exp_avg_sq"}) —
        the dict is empty where this rank holds none of that parameter."""
        for sub in self._sub_optimizers():
            sub.init_state_fn(sub.optimizer, sub.config)  # moments exist before the first step too
            owned = {p for buffer in sub.buffers for p in buffer.params}  # same on every rank of the group
            mains = _main_shards(sub)
            rows = []
            for name, p, spec in named_specs(self.model):
                if p not in owned:
                    continue
                if p in sub.model_param_gbuf_map:  # parameters overlapping this rank's shard
                    r = sub._get_model_param_range_map(p)["param"]
                    main = mains[p]
                    tensors = {"param": main, **{m: sub.optimizer.state[main][m] for m in MOMENTS}}
                    rows.append((name, p, spec, slice(r.start, r.end), tensors))
                else:
                    rows.append((name, p, spec, slice(0, 0), {}))
            yield sub.data_parallel_group, rows

    def canonical_state(self, kind: str) -> dict[str, torch.Tensor]:
        """Assembled from the DP shards: each element lives on exactly one DP rank, so a sum over the group puts
        every parameter's tensor together."""
        out = {}
        for group, rows in self._shards():
            full = [torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for _, p, *_ in rows]
            for flat, (_, _, _, r, tensors) in zip(full, rows):
                if tensors:
                    flat[r] = tensors["param" if kind == "main_param" else kind]
            if full and dist.get_world_size(group) > 1:
                packed = torch.cat(full)
                dist.all_reduce(packed, group=group)
                full = list(packed.split([f.numel() for f in full]))
            out.update({name: f.view(p.shape) for f, (name, p, *_) in zip(full, rows)})
        return out

    @torch.no_grad()
    def restore(self, loaded: dict[str, torch.Tensor], model: nn.Module, updates: int, with_main: bool) -> None:
        for _, rows in self._shards():
            for name, _, _, r, tensors in rows:
                if not tensors:
                    continue
                for moment in MOMENTS:
                    tensors[moment].copy_(loaded[f"optim.{moment}.{name}"].reshape(-1)[r])
                # fp32 main weights: the checkpoint's own, else its (fp32-loaded) model weights
                main = loaded[f"optim.main_param.{name}" if with_main else f"model.{name}"]
                tensors["param"].copy_(main.reshape(-1)[r])
        for sub in self._sub_optimizers():
            for state in sub.optimizer.state.values():
                state["step"] = torch.tensor(float(updates))
        self._updates = updates

    def memory_bytes(self) -> dict[str, int]:
        moments, mains = [], []
        for _, rows in self._shards():
            for _, p, _, _, tensors in rows:
                if tensors:
                    moments += [tensors[m] for m in MOMENTS]
                    if tensors["param"].untyped_storage().data_ptr() != p.untyped_storage().data_ptr():
                        mains.append(tensors["param"])
        grads = [b.grad_data for b in self.ddp.buffers + self.ddp.expert_parallel_buffers]
        return {"optimizer_state": _nbytes(moments), "main_params": _nbytes(mains), "grads": _nbytes(grads)}


def build_optimizer(model: nn.Module, groups: ParallelGroups, cfg: OptimSettings, model_cfg,
                    distributed: bool) -> TrainOptimizer:
    """The run's optimizer: :class:`DistributedAdam` when ``distributed`` (required for non-fp32 parameters),
    else :class:`LocalAdamW`. ``model_cfg``: the model section (megatron-core's DDP wants its sizes)."""
    if distributed:
        return DistributedAdam(model, groups, cfg, model_cfg)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("parameters that are not fp32 need fp32 main weights, which live in the distributed "
                         "optimizer: set optim.distributed=true (or leave it unset)")
    return LocalAdamW(model, groups, cfg)
