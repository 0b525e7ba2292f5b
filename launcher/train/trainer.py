"""The training loop: micro-batches through the pipeline schedule (the objective is the token-weighted mean loss
over the global batch, ``launcher/train/token_loss.py``), DP gradient sync, clip, AdamW, schedule,
checkpoints, metrics, periodic validation (also the `moetron evaluate` engine), non-finite-loss skipping and
preemption.

Exactness: everything a step depends on is a function of (config, step, checkpointed state): the LR schedule is
a function of the step, M-MoE draws are keyed on (seed, step, layer), the data loader's position and the RNG
states are checkpointed. A run resumed from step N therefore reproduces the uninterrupted run's losses.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from launcher.train import checkpoint, flops, summary, token_loss
from launcher.train.checkpoint_rank0 import preflight_space, prepare, set_latest
from launcher.train.preemption import Preemption
from launcher.train.trainer_state import CheckpointedState
from launcher.config import (Config, ConfigError, check_eval_batches, resolve, save_resolved,
                             to_dict)
from launcher.data.build import build_loader
from launcher.errors import MoetronError
from launcher.log import BARE, RESULT
from launcher.train.metrics import (IntervalTimes, MetricsWriter, ProgressLine, StepStats, moe_layer_tag,
                                    peak_flops_per_device, throughput, training_scalars, moe_layer_scalars)
from launcher.train.step_reduce import LayerStepStats, PackedSum, StepReduction, pack_token_loss, token_mean
from launcher.train.watchdog import Unwatched, Watchdog
from moe_core.matryoshka import EvalK
from moe_core.profiling import phase
from parallel.groups import ParallelGroups
from parallel.model import activation_shape, build_model, token_losses
from parallel.optim.optimizer import build_optimizer
from parallel.schedule import PipelineSchedule

log = logging.getLogger(__name__)


class TrainingError(MoetronError):
    """The run cannot continue (e.g. too many non-finite steps in a row); the message says why and what to do.
    Exit code 1: the input was fine, the run failed."""

    kind = "training"
    exit_code = 1


def lr_at(cfg: Config, step: int) -> float:
    """Linear warmup to optim.lr over warmup_steps, then cosine (or constant) decay to ``optim.final_lr``."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.decay == "constant":
        return o.lr
    span = max(1, cfg.train.steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    min_lr = o.final_lr
    return min_lr + 0.5 * (o.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def precision_context(cfg: Config, groups: ParallelGroups):
    """bf16 runs need no context: parameters are bf16 (fp32 main weights live in the distributed optimizer,
    parallel/optim/optimizer.py), so every GEMM gets bf16 operands. fp8 runs add the FP8 context (converted projections
    run their GEMMs in FP8; amaxes are reduced over the stage's TP x DP group)."""
    if cfg.train.precision != "fp8":
        return contextlib.nullcontext()
    from parallel.fp8.swap import fp8_context

    return fp8_context(cfg, amax_group=groups.amax_group)


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)
    """Loss per executed step (token-weighted mean over the global batch), as every rank sees it."""
    final_step: int = 0
    skipped_steps: int = 0
    preempted: bool = False
    checkpoint: Optional[str] = None


class Trainer(CheckpointedState):
    def __init__(self, cfg: Config, groups: ParallelGroups, watchdog: Optional[Watchdog] = None):
        """``cfg`` as parsed or already resolved: the trainer runs (and records) ``resolve(cfg, world size)``.
        ``watchdog``: told each phase of the run (``launcher/train/watchdog.py``); None = unwatched."""
        cfg = resolve(cfg, groups.world_size)
        self.cfg, self.groups = cfg, groups
        self.watchdog = watchdog or Unwatched()
        self._first_step: Optional[int] = None
        self.run_dir = Path(cfg.logging.run_dir)
        self.ckpt_root = Path(cfg.checkpoint.dir)
        self.model = build_model(cfg, groups)
        self.device = next(self.model.parameters()).device
        self.compute_dtype = next(p.dtype for n, p in self.model.named_parameters() if "router" not in n)
        self.optimizer = build_optimizer(self.model, groups, cfg.optim, cfg.model, distributed=cfg.optim.distributed)
        self.num_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * groups.dp_size)
        self.loader = build_loader(cfg, "train", groups.dp_rank, groups.dp_size)
        self.hidden_shape = activation_shape(cfg, cfg.train.micro_batch_size)
        self.schedule = PipelineSchedule(groups, cfg.parallel.virtual_pp, self.hidden_shape, self.compute_dtype)
        """megatron-core's 1F1B / interleaved 1F1B over this rank's model chunks (``self.model.chunks``)."""
        self.writer = MetricsWriter(self.run_dir, enabled=False)  # fit() opens the real one once there is work
        self.progress = ProgressLine(cfg.train.steps)
        self.interval_times = IntervalTimes()
        self.peak = peak_flops_per_device(self.device, cfg.train.precision, cfg.logging.peak_tflops)
        self.step = 0
        self.skipped = 0
        self.nonfinite_streak = 0
        """Non-finite steps in a row up to now (checkpointed, so a restart cannot reset the count)."""
        self.run_id = uuid.uuid4().hex[:12]
        """Lineage id of this run's checkpoints (a resumed run takes its checkpoint's; rank 0's is the one used)."""
        self.last_good: Optional[str] = None
        """The newest checkpoint saved outside a non-finite streak: pruning keeps it, a stopped run names it."""
        self._saving: Optional[tuple[checkpoint.Saving, bool, float]] = None
        """The save in flight (``checkpoint.async_save``; whether it is outside a non-finite streak, the seconds its
        start took), committed by :meth:`finish_save`."""
        self._preemption: Optional[Preemption] = None
        """The signal flags of :meth:`fit` (saves outside it, e.g. convert's, have none)."""
        self.save_stalls: list[float] = []
        """Seconds each committed save kept training waiting (``launcher/bench/checkpoint_stall.py``)."""
        self._reduction = StepReduction(groups, self.device, cfg.model.trained_moe_layer_indices, cfg.moe.num_experts,
                                        self.num_micro * groups.dp_size, cfg.moe.mone.enabled,
                                        cfg.model.mtp_num_layers, cfg.model.mtp_loss_coeff,
                                        cfg.parallel.sequence_parallel)
        """The step's numbers: MoE statistics summed as micro-batches run, one all-reduce and host read per step."""
        self._mtp_scale_K: Optional[torch.Tensor] = None
        """This step's MTP gradient scales (``token_loss.mtp_gradient_scales``; last stage, MTP on)."""
        self._mtp_sums: list[torch.Tensor] = []
        """This step's per-micro-batch MTP loss sums [K] (detached, for ``train/mtp_loss``)."""
        self.mtp_loss: Optional[float] = None
        """The last training step's ``train/mtp_loss`` (None without MTP)."""

    def _mark(self, name: str, slow: bool = False) -> None:
        """Tell the watchdog that this rank starts phase ``name`` of the current step (``slow``, and every phase
        of the process's first step, get the watchdog's longer allowance)."""
        if self._first_step is None:
            self._first_step = self.step
        self.watchdog.enter(name, self.step, slow=slow or self.step == self._first_step)

    # ------------------------------------------------------------ one step
    def _forward(self, model, mb: dict, x: Optional[torch.Tensor]):
        """One micro-batch through one model chunk: its output activations, or on the last chunk its loss SUM over
        its label tokens (fp32 0-dim; ``loss_mask`` weights each token, every label counts without one). Training
        with MTP: ``(loss sum, MTP objective)`` (the depths' loss sums times this step's ``_mtp_scale_K``)."""
        inp = mb["tokens"].to(self.device) if model.pre_process else x  # chunks exchange the compute dtype
        mtp = bool(self.cfg.model.mtp_num_layers) and model.training and model.post_process
        with precision_context(self.cfg, self.groups):
            out = model(inp, mb["tokens"].to(self.device)) if mtp else model(inp)
        if model.training:  # MoE statistics of training steps only (validation forwards run in eval mode)
            self._reduction.add_micro_batch(model.moe_layers())
        if not model.post_process:
            return out
        logits, mtp_logits = out if mtp else (out, [])
        labels, mask = mb["labels"].to(self.device), mb.get("loss_mask")
        losses = token_losses(logits, labels, self.groups)
        loss_sum = losses.sum() if mask is None else (losses * mask.to(self.device, torch.float32)).sum()
        if not mtp:
            return loss_sum
        sums_K = token_loss.mtp_loss_sums(mtp_logits, labels, None if mask is None else mask.to(self.device),
                                          lambda logits_k, labels_k: token_losses(logits_k, labels_k, self.groups))
        self._mtp_sums.append(sums_K.detach())
        return loss_sum, (sums_K * self._mtp_scale_K).sum()

    def _label_tokens(self, micro: list[dict]) -> float:
        """This rank's share of the loss' divisor: the label tokens of its (CPU) micro-batches on the last stage,
        0 elsewhere (no loss there)."""
        return token_loss.label_tokens(micro) if self.groups.is_last_stage else 0.0

    def _mtp_label_tokens(self, micro: list[dict]) -> list[float]:
        """MTP only, on the last stage: each depth's label tokens of this rank's (CPU) micro-batches; sets this
        step's MTP gradient scales from them (collective over the last stage's DP group). Elsewhere: []."""
        K = self.cfg.model.mtp_num_layers
        if not K or not self.groups.is_last_stage:
            return []
        tokens_K = token_loss.mtp_label_tokens(micro, K)
        self._mtp_scale_K = token_loss.mtp_gradient_scales(tokens_K, self.cfg.model.mtp_loss_coeff, self.groups,
                                                           self.device)
        return tokens_K

    def _global_loss(self, loss_sums: list[torch.Tensor], tokens: float) -> float:
        """Token-weighted mean loss, made known on every rank (it lives on the last stage): (loss sum, label tokens)
        summed over micro-batches, stages and DP ranks in one all-reduce, divided once. Collective."""
        packed = PackedSum()
        pack_token_loss(packed, loss_sums, tokens, self.device)
        packed.all_reduce(self.groups.distributed)
        return token_mean(packed)

    def _to_device(self, mb: dict) -> dict:
        """A micro-batch on the training device, copied from pinned memory without blocking: a copy from pageable
        memory makes the host wait for the GPU's queue (a hidden sync per micro-batch). All of a step's micro-batches
        are sent at its start, so the copies overlap the queued compute."""
        if self.device.type != "cuda":
            return mb
        return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in mb.items()}

    def train_step(self, preemption: Optional[Preemption] = None
                   ) -> tuple[float, float, dict[int, LayerStepStats], bool]:
        """One optimizer step on the token-weighted mean loss of the global batch (``token_loss``; the gradient is
        exactly its gradient). Returns that loss, the gradient norm, the per-MoE-layer statistics and whether all
        ranks agreed to stop (a signal reached ``preemption`` on any rank by the end of backward). The host reads
        the device once, after backward (``StepReduction.reduce``)."""
        cfg = self.cfg
        self.model.train()
        self.model.set_step(self.step)
        self.optimizer.set_lr(lr_at(cfg, self.step))
        self.optimizer.zero_grad()
        self._mark("data")
        batches = [next(self.loader) for _ in range(self.num_micro)]
        tokens = self._label_tokens(batches)  # counted on the CPU batches, before they go to the device
        mtp_tokens = self._mtp_label_tokens(batches)
        micro = [self._to_device(mb) for mb in batches]
        self._mark("forward_backward")
        loss_sums = self.schedule(self.model.chunks, micro, self._forward,
                                  loss_scale=token_loss.gradient_scale(tokens, self.groups, self.device),
                                  no_sync=self.optimizer.no_sync)
        self._mark("optimizer")
        with phase("optimizer"):
            self.optimizer.reduce_grads()
            norm_sq = self.optimizer.grad_norm_sq()
        stop_requested = preemption is not None and preemption.requested
        self._mark("step_reduce")
        step = self._reduction.reduce(loss_sums, tokens, norm_sq, stop_requested, self.model.moe_layers(),
                                      self._mtp_sums, mtp_tokens)
        self._mtp_sums, self.mtp_loss = [], step.mtp_loss
        if not (math.isfinite(step.loss) and math.isfinite(step.grad_norm)):
            return step.loss, step.grad_norm, step.layers, step.stop
        self._mark("optimizer")
        with phase("optimizer"):
            self.optimizer.step(step.grad_norm)
        if cfg.moe.expert_bias:
            for idx, layer in self.model.moe_layers().items():
                layer.update_expert_bias(step.tokens_per_expert_dev[idx])  # the device copy: no host round trip
        return step.loss, step.grad_norm, step.layers, step.stop

    # ------------------------------------------------------------ validation
    def _valid_batches(self, n: int) -> list[dict]:
        """This DP rank's share of the first ``n`` micro-batches of the valid split: the split is read whole and
        in order on every rank and DP rank r takes batches r, r + dp, ..., so every layout sees the same batches."""
        check_eval_batches(n, self.groups.dp_size, "train.eval_batches (or eval --batches)",
                           self.cfg.parallel.micro_batch_group)
        loader = build_loader(self.cfg, "valid", 0, 1)
        if loader.plan is not None and n > loader.plan.batches_per_epoch:
            plan = loader.plan
            raise ConfigError(f"validation asks for {n} micro-batches but the valid split of '{plan.data_dir}' holds "
                              f"{plan.batches_per_epoch} of train.micro_batch_size={plan.micro_batch_size}: lower "
                              "train.eval_batches (or eval --batches) or hold out more data (preprocess "
                              "--valid-fraction)")
        return [next(loader) for _ in range(n)][self.groups.dp_rank::self.groups.dp_size]

    def evaluate(self, k: EvalK = None, batches: Optional[int] = None) -> float:
        """Token-weighted mean validation loss (nats/token) over the first ``batches`` (default
        train.eval_batches) micro-batches of the valid split, every MoE layer routing with ``k`` (an int, one int
        per MoE layer, or None = the config's eval k): (loss sum, label tokens) through micro-batches, stages and DP
        ranks, divided once. Depends only on the weights and the samples, not on the micro-batch size or the
        layout. Collective: all ranks call it. Leaves the model in train mode with the config's eval k."""
        micro = self._valid_batches(batches or self.cfg.train.eval_batches)
        self.model.eval()
        self.model.set_eval_k(k)
        try:
            loss_sums = self.schedule(self.model.chunks, micro, self._forward, forward_only=True)
        finally:
            self.model.set_eval_k(None)
            self.model.train()
        return self._global_loss(loss_sums, self._label_tokens(micro))

    def _validate(self) -> None:
        """Periodic validation: ``valid/loss`` at the eval k and, for M-MoE, ``valid/loss_k{k}`` for every k in
        [k_min, k_max] (the eval k's loss is reused from the sweep when it is one of them)."""
        self._mark("validation", slow=True)
        mm = self.cfg.moe.matryoshka
        sweep = {k: self.evaluate(k) for k in range(mm.k_min, mm.k_max + 1)} if mm.enabled else {}
        default_k = self.cfg.moe.default_eval_k
        loss = sweep[default_k] if isinstance(default_k, int) and default_k in sweep else self.evaluate()
        values = {"valid/loss": loss, **{f"valid/loss_k{k}": v for k, v in sweep.items()}}
        self.writer.scalars(values, self.step)
        log.info(f"validation after step {self.step}: "
                 + " | ".join(f"{tag[len('valid/'):]} {v:.4f}" for tag, v in values.items()))

    # ------------------------------------------------------------ loop
    def fit(self, preemption: Optional[Preemption] = None) -> TrainResult:
        """Train to train.steps. Pass the Preemption created at process start so a signal that arrives while
        the model is being built or resumed is not lost."""
        cfg = self.cfg
        preemption = self._preemption = preemption or Preemption()
        ckpt = prepare(self.ckpt_root, self.groups, resume=cfg.checkpoint.resume == "auto",
                                  writable=(self.run_dir,))
        resumed = self.maybe_resume(ckpt)
        result = TrainResult(checkpoint=str(resumed) if resumed else None)
        if self.step >= cfg.train.steps:
            log.info(f"nothing to do: finished at step {self.step}")
            result.final_step, result.skipped_steps = self.step, self.skipped
            return result
        preflight_space(self.ckpt_root, self.groups, checkpoint.checkpoint_bytes(self.model, self.groups),
                                   self._saves_to_come(), cfg.checkpoint.keep_last, self.run_id)
        if self.groups.rank == 0:  # the run directory's files are rank 0's to write
            save_resolved(cfg, self.run_dir)
            (self.run_dir / "PREEMPTED").unlink(missing_ok=True)  # a previous attempt's marker, not this run's
        log.info(summary.start_block(cfg, self.groups, self.step, self.ckpt_root, self.optimizer.label,
                                     resumed=resumed is not None))
        self.writer = MetricsWriter(self.run_dir, enabled=self.groups.rank == 0 and cfg.logging.tensorboard,
                                    purge_step=self.step if resumed else None)
        self.writer.config_text(to_dict(cfg), self.step)
        if cfg.train.eval_interval:
            self._valid_batches(cfg.train.eval_batches)  # bad validation settings fail now, not at the first eval
        last_saved = self.step
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            loss, norm, layer_stats, stop = self.train_step(preemption)
            step_time = time.perf_counter() - t0
            if math.isfinite(loss) and math.isfinite(norm):
                self.nonfinite_streak = 0
            else:
                self.nonfinite_streak += 1
                self.skipped += 1
                log.warning(f"step {self.step}: non-finite loss/grad-norm ({loss}, {norm}); update skipped "
                            f"({self.nonfinite_streak} in a row)")
                if self.nonfinite_streak >= cfg.train.max_consecutive_nonfinite:
                    raise TrainingError(self._stop_nonfinite())
            result.losses[self.step] = loss
            self.interval_times.add(step_time)
            self._log(loss, norm, layer_stats, last=self._ends_run(stop))
            self.step += 1
            if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0:
                self._validate()
            if self._saving is not None and self._saving[0].ready():
                result.checkpoint = str(self.finish_save())
            if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                if cfg.checkpoint.async_save:
                    self.start_save(background=True)
                else:
                    result.checkpoint = str(self.save())
                last_saved = self.step
            if stop:
                if last_saved != self.step:
                    result.checkpoint = str(self.save())
                result.preempted = True
                if self.groups.rank == 0:
                    (self.run_dir / "PREEMPTED").write_text(f"{self.step}\n")
                log.log(RESULT, f"PREEMPTED step={self.step}", extra=BARE)
                break
            if cfg.train.exit_interval and self.step % cfg.train.exit_interval == 0 and self.step < cfg.train.steps:
                if last_saved != self.step:
                    result.checkpoint = str(self.save())
                log.info(f"train.exit_interval reached: exiting at step {self.step}")
                break
        else:
            if cfg.checkpoint.save_at_end and last_saved != self.step:  # never re-save the step resumed from
                result.checkpoint = str(self.save())
        if self._saving is not None:  # an interval save still writing: the run ends once it is committed
            result.checkpoint = str(self.finish_save())
        result.final_step, result.skipped_steps = self.step, self.skipped
        self.writer.close()
        return result

    def _saves_to_come(self) -> int:
        """Checkpoints the rest of this run writes on schedule (interval saves and the final one)."""
        c, steps = self.cfg.checkpoint, self.cfg.train.steps
        saves = steps // c.interval - self.step // c.interval if c.interval else 0
        return saves + int(c.save_at_end and not (c.interval and steps % c.interval == 0))

    def _stop_nonfinite(self) -> str:
        """Point ``latest`` back at the newest checkpoint saved before the non-finite streak (collective) and say
        so: the TrainingError message."""
        self.finish_save()
        cfg, first = self.cfg, self.step - self.nonfinite_streak + 1
        head = (f"{self.nonfinite_streak} consecutive non-finite steps (train.max_consecutive_nonfinite="
                f"{cfg.train.max_consecutive_nonfinite}) at step {self.step}")
        good = self.ckpt_root / self.last_good if self.last_good else None
        if good is None or not good.is_dir():
            return (f"{head}: no checkpoint was saved before the first of them (step {first}); lower optim.lr or "
                    "check the data, and start again")
        set_latest(self.ckpt_root, good, self.groups)
        return (f"{head}: 'latest' now names {good}, the last checkpoint saved before them (the first was step "
                f"{first}); lower optim.lr or check the data, then restart to resume from it")

    def _dispatcher_scalars(self) -> dict[str, float]:
        """EP dispatch statistics of this rank's MoE layers (last micro-batch of the step): kept routing slots and
        dispatched rows per token (``parallel.dispatch.DispatchCounts``; rows < slots where the deduplicated
        dispatch sent a token once to several of its experts), and LLEP's imbalance before/after, tokens and
        weights moved, planner time. With PP>1 the logging rank sees its own stage's layers."""
        out = {}
        for idx, layer in self.model.moe_layers().items():
            counts = getattr(layer.dispatcher, "last_counts", None)
            if counts is not None and counts.tokens:
                out[f"{moe_layer_tag(idx)}/dispatch_slots_per_token"] = counts.slots / counts.tokens
                out[f"{moe_layer_tag(idx)}/dispatch_rows_per_token"] = counts.rows / counts.tokens
            for key, value in (getattr(layer.dispatcher, "last_stats", None) or {}).items():
                out[f"{moe_layer_tag(idx)}/llep_{key}"] = float(value)
        return out

    def _ends_run(self, stop: bool) -> bool:
        """Whether the step being finished is this run's last: train.steps, a stop signal or train.exit_interval."""
        done, exit_every = self.step + 1, self.cfg.train.exit_interval
        return stop or done >= self.cfg.train.steps or bool(exit_every and done % exit_every == 0)

    def _log(self, loss: float, norm: float, layer_stats: dict[int, LayerStepStats], last: bool) -> None:
        """Progress line and TensorBoard scalars every logging.log_interval steps and at the run's ``last`` step
        (so the final loss is always logged); timings are means over the steps since the previous log step."""
        if self.step % self.cfg.logging.log_interval != 0 and not last:
            return
        step_time = self.interval_times.take()
        if self.groups.rank != 0:  # rank 0 reports metrics
            return
        # FLOPs from the k each layer actually ran (M-MoE draws, capacity drops); MoNE also logs useful FLOPs
        fc = flops.training_flops(self.cfg, k_per_layer=flops.executed_k_per_layer(layer_stats))
        stats = StepStats(step=self.step, loss=loss, lr=lr_at(self.cfg, self.step), grad_norm=norm,
                          step_time_s=step_time, tokens=fc.tokens_per_step, flops=fc.train_per_step,
                          skipped_steps=self.skipped, mtp_loss=self.mtp_loss,
                          useful_flops=fc.train_per_step_useful if self.cfg.moe.mone.enabled else None)
        perf = throughput(stats, self.groups.world_size, self.peak)
        scalars = {**training_scalars(stats, perf), **moe_layer_scalars(layer_stats, self.cfg.moe)}
        if self.cfg.train.precision == "fp8":
            from parallel.fp8.swap import fp8_stats

            scalars.update(fp8_stats(self.model))
        scalars.update(self._dispatcher_scalars())
        # data.paths mixtures: cumulative tokens per source (all DP ranks; the same on every rank, no collective)
        scalars.update({f"train_data/tokens/{name}": n for name, n in self.loader.source_tokens().items()})
        self.writer.scalars(scalars, self.step)
        self.writer.expert_load(layer_stats, self.step)
        log.info(self.progress.format(stats, perf), extra=BARE)
