"""Per-rank memory estimate of a training layout, without building anything real (``moetron pretrain --dry-run``).

Bytes on the busiest pipeline rank (each rank holds its virtual stages' layers, ``parallel/layout.py``; the first
also the embedding, the last the LM head), by kind:
- weights: this rank's parameters (TP splits the attention/dense projections, embedding and LM head; EP splits the
  experts; PP splits the layers), bf16 in bf16/fp8 runs except the fp32 router, else fp32;
- gradients: one fp32 buffer of the rank's parameters (megatron-core's ``main_grad`` buffer, or fp32 ``.grad``);
- optimizer state: two fp32 Adam moments (+ fp32 main weights in bf16 runs), divided by the data-parallel size for
  dense parameters and by the expert-data-parallel size for expert parameters when the distributed optimizer is on;
- activations: what autograd keeps for one micro-batch in each model chunk, times the micro-batches of that chunk in
  flight when the rank's first backward starts (megatron-core's schedules: 1F1B runs pp - rank - 1 warm-up
  forwards, interleaved 1F1B (pp - rank - 1) * 2 + (virtual_pp - 1) * pp, chunk by chunk in groups of pp
  micro-batches, at most every micro-batch of every chunk; one more forward is alive then), per layer as
  launcher/train/activations.py counts it (GQA/MLA attention, MoE
  with MoNE and shared experts, dense FFN; what each ``train.recompute`` option drops), plus ``4 V + 12 D`` per
  token outside the layers on the last stage (fp32 logits for the loss), plus the peak of backward on top, for
  one micro-batch: the larger of the loss gradient (``8 V`` per token more on the last stage) and the stage's
  last layer's backward (its largest recomputed region and its FFN's gradient temporaries; earlier layers'
  regions are recomputed after later layers' activations are freed). Allocator slack and other temporaries are not
  included; checked against the measured activation peak of CPU steps at TP=1 (fp32 and bf16, every recompute
  option) and TP=2 with and without sequence parallelism. Multi-token prediction (``model.mtp_num_layers`` = K) puts K MTP modules on the
  last stage (weights: enorm, hnorm, eh_proj, one MoE block, norm each; with PP > 1 also a copy of the embedding)
  and adds per token, per depth, an MoE layer's activations plus ``b * 5 D`` (the two norm inputs, eh_proj's
  ``2 D`` input, the final norm's) and the logits' ``4 V / tp + 12 D``; backward starts in the last depth's block.
  ``parallel.sequence_parallel`` divides what is whole on every TP rank (norms, router, shared-expert gate, block
  inputs, the final norm) by TP.
The estimate is checked against a measured CPU step in tests/launcher/train/test_memory_estimate.py. It costs the
same at any model.num_layers (one layer of each kind is counted, on the meta device). ``moetron pretrain`` runs
:func:`check_fits` before it builds anything: a layout whose estimate (a lower bound: no slack) exceeds the device's
free memory, or on CPU the host's available RAM divided by the node's ranks, is one line with the estimate and what
to change. The dry run also prints the pipeline bubble: the idle fraction of a step, (pp - 1) / (virtual_pp *
micro-batches).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from launcher.config import Config, ConfigError, resolve
from launcher.train.activations import layer_bytes
from moe_core.recompute import Recompute

MiB, GiB = 1 << 20, 1 << 30


def format_bytes(n: float) -> str:
    """``n`` bytes as GiB with 2 decimals from 1 GiB up, MiB with 1 decimal below, right-aligned to 12 characters."""
    return f"{n / GiB:8.2f} GiB" if n >= GiB else f"{n / MiB:8.1f} MiB"


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    bubble: float = 0.0
    """Pipeline bubble: idle fraction of a step, (pp - 1) / (virtual_pp * micro-batches per step)."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def lines(self) -> list[str]:
        """The dry-run table: one line per kind, bytes as :func:`format_bytes` writes them."""
        return [f"  per-rank parameters {self.params:,}",
                f"  weights     {format_bytes(self.weights)}",
                f"  gradients   {format_bytes(self.gradients)}",
                f"  optimizer   {format_bytes(self.optimizer)}",
                f"  activations {format_bytes(self.activations)}",
                f"  total       {format_bytes(self.total)} (no allocator slack or temporaries)",
                f"  pipeline bubble {self.bubble:.1%} of a step"]


def _stage_params(cfg: Config, tp: int, ep: int, pp: int) -> list[dict[str, int]]:
    """Per pipeline rank: parameter counts on one rank by kind (dense, router, expert). Counted on a meta-device
    model of one layer of each kind (dense, MoE) plus the embedding, final norm, LM head and MTP modules, then
    multiplied out per rank (its virtual stages' layers): the model built does not grow with model.num_layers."""
    from torch import nn

    from moe_core.layers import ProjectionRMSNorm, ReplicatedLinear
    from moe_core.transformer import MoETransformer

    m = cfg.model
    dense = sorted(set(m.dense_layers))
    first_moe = next((i for i in range(m.num_layers) if m.is_moe_layer(i)), None)  # <= len(dense) + 1 steps
    samples = sorted({*dense[:1], *([first_moe] if first_moe is not None else [])})
    with torch.device("meta"):
        model = MoETransformer(m, cfg.moe, cfg.train.seed, layer_range=samples)
    split = (nn.Linear, nn.Embedding, ProjectionRMSNorm)  # ProjectionRMSNorm: OLMoE's q/k norm, split like q/k
    split_by_tp = {id(p) for mod in model.modules() if isinstance(mod, split) and not isinstance(mod, ReplicatedLinear)
                   for p in mod.parameters()}
    per_layer = {i: dict(dense=0, router=0, expert=0) for i in samples}
    outside = {"first": dict(dense=0, router=0, expert=0), "last": dict(dense=0, router=0, expert=0)}
    for name, p in model.named_parameters():
        parts = name.split(".")
        kind = "expert" if "experts" in parts else "router" if "router" in parts else "dense"
        n = p.numel() // (tp if id(p) in split_by_tp else 1) // (ep if kind == "expert" else 1)
        # the embedding on the first stage (MTP on the last stage needs its own copy); final norm, LM head and the
        # MTP modules on the last
        if parts[0] == "layers":
            per_layer[int(parts[1])][kind] += n
        elif parts[0] == "embed_tokens":
            outside["first"][kind] += n
            outside["last"][kind] += n if cfg.model.mtp_num_layers and pp > 1 else 0
        else:
            outside["last"][kind] += n
    plans = cfg.parallel.stage_plans(m)
    stages = []
    for s in range(pp):
        n_layers = sum(len(plan.layers) for plan in plans[s::pp])
        n_dense = sum(1 for i in dense if any(i in plan.layers for plan in plans[s::pp]))
        counts = {kind: n_dense * (per_layer[dense[0]][kind] if n_dense else 0)
                  + (n_layers - n_dense) * (per_layer[first_moe][kind] if first_moe is not None else 0)
                  for kind in ("dense", "router", "expert")}
        for kind in counts:
            counts[kind] += outside["first"][kind] * (s == 0) + outside["last"][kind] * (s == pp - 1)
        stages.append(counts)
    return stages


def in_flight(pp: int, virtual_pp: int, rank: int, num_micro: int) -> list[int]:
    """Micro-batches of each of pipeline rank ``rank``'s model chunks whose activations are alive when its first
    backward starts (module docstring): megatron-core's warm-up forwards plus one."""
    total = num_micro * virtual_pp
    warmup = pp - rank - 1 if virtual_pp == 1 else (pp - rank - 1) * 2 + (virtual_pp - 1) * pp
    alive = min(warmup + 1, total)
    return [sum(1 for k in range(alive) if (k // pp) % virtual_pp == c) for c in range(virtual_pp)]


def estimate(cfg: Config, world_size: int) -> MemoryEstimate:
    """The busiest rank's estimate for ``cfg`` at ``world_size`` ranks (module docstring)."""
    cfg = resolve(cfg, world_size)
    tp, pp, ep, vpp = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.virtual_pp
    dp = cfg.parallel.data_parallel_size(world_size)
    edp = tp * dp // ep
    m, moe, tr = cfg.model, cfg.moe, cfg.train
    b = 4 if tr.precision == "fp32" else 2
    distributed = cfg.optim.distributed
    num_micro = tr.global_batch_size // (tr.micro_batch_size * dp)
    tokens = tr.micro_batch_size * m.seq_length
    sp = tp if cfg.parallel.sequence_parallel else 1  # what is whole on TP ranks is a token shard under SP
    rc = Recompute(tr.recompute, frozenset(tr.recompute_modules))
    kinds = {is_moe: layer_bytes(m, moe, b, tp, sp, is_moe, rc) for is_moe in (False, True)}  # one layer of each
    plans = cfg.parallel.stage_plans(m)
    best = None
    for stage, counts in enumerate(_stage_params(cfg, tp, ep, pp)):
        params = sum(counts.values())
        weights = b * (counts["dense"] + counts["expert"]) + 4 * counts["router"]
        state_per_param = 8 + (4 if b == 2 else 0)
        if distributed:
            optimizer = state_per_param * ((counts["dense"] + counts["router"]) / dp + counts["expert"] / edp)
        else:
            optimizer = state_per_param * params
        alive = in_flight(pp, vpp, stage, num_micro)
        kept = peak = 0.0
        for chunk, micro_batches in enumerate(alive):
            plan = plans[chunk * pp + stage]
            n_moe = sum(1 for i in plan.layers if m.is_moe_layer(i))
            chunk_kept = n_moe * kinds[True].kept + (len(plan.layers) - n_moe) * kinds[False].kept
            last = kinds[m.is_moe_layer(plan.layers[-1])] if len(plan.layers) else None
            loss_grad = freed = 0.0
            if plan.post_process:
                logits = 4 * m.vocab_size / tp + 12 * m.hidden_size / sp
                chunk_kept += logits + m.mtp_num_layers * (kinds[True].kept + b * 5 * m.hidden_size + logits)
                loss_grad = 8 * m.vocab_size / tp  # the logits' gradient: two fp32 [tokens, V/tp] buffers
                last = kinds[True] if m.mtp_num_layers else last
                freed = logits  # the last head's logits (the main one's, or the last MTP depth's), before its block
            kept += chunk_kept * micro_batches
            # backward's peak on top of what the rank keeps: its start on the last stage (the loss gradient), then
            # the chunk's last block, the first one backward recomputes, while earlier blocks' activations are kept
            peak = max(peak, loss_grad, (last.backward - freed) if last else 0.0)
        activations = int(tokens * (kept + peak))
        est = MemoryEstimate(params, int(weights), 4 * params, int(optimizer), activations,
                             bubble=(pp - 1) / (vpp * num_micro))
        best = est if best is None or est.total > best.total else best
    return best


def device_budget() -> tuple[int, str]:
    """(bytes one rank may use, what they are): the free memory of this rank's GPU (``LOCAL_RANK``), or on CPU the
    host's available RAM divided by the ranks on this node (``LOCAL_WORLD_SIZE``)."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"{format_bytes(free).strip()} free on its {torch.cuda.get_device_name(device)}"
    import psutil

    ram = psutil.virtual_memory().available
    share = f" / {local_ranks} ranks on this node" if local_ranks > 1 else ""
    return ram // local_ranks, f"{format_bytes(ram).strip()} of available host RAM{share}"


def _what_to_change(cfg: Config, est: MemoryEstimate) -> str:
    """The settings that shrink the largest part of ``est``."""
    m, tr, par = cfg.model, cfg.train, cfg.parallel
    if est.activations >= est.total / 2:
        levers = [f"train.recompute ({tr.recompute})"] if tr.recompute != "full" else []
        if par.tp > 1 and not par.sequence_parallel:
            levers.append("parallel.sequence_parallel (false)")
        return (f"lower train.micro_batch_size ({tr.micro_batch_size}), model.seq_length ({m.seq_length}) or "
                f"model.num_layers ({m.num_layers}), or raise " + ", ".join(levers + [f"parallel.tp ({par.tp})"])
                + f" / parallel.pp ({par.pp})")
    moe = cfg.moe
    expert_weights = 3 * moe.num_experts * moe.expert_ffn_hidden_size * m.hidden_size / par.ep
    if expert_weights >= est.params / 2:
        return (f"lower moe.num_experts ({moe.num_experts}) or moe.expert_ffn_hidden_size "
                f"({moe.expert_ffn_hidden_size}), or raise parallel.ep ({par.ep})")
    return (f"lower model.hidden_size ({m.hidden_size}), model.num_layers ({m.num_layers}) or model.vocab_size "
            f"({m.vocab_size}), or raise parallel.tp ({par.tp}) / parallel.pp ({par.pp})")


def fit_problem(cfg: Config, world_size: int) -> Optional[str]:
    """None when the busiest rank's estimate fits :func:`device_budget`, else one line: the estimate by part, the
    budget and the settings to change."""
    est = estimate(cfg, world_size)
    budget, what = device_budget()
    if est.total <= budget:
        return None
    return (f"this layout needs at least {format_bytes(est.total).strip()} per rank (weights "
            f"{format_bytes(est.weights).strip()}, gradients {format_bytes(est.gradients).strip()}, optimizer "
            f"{format_bytes(est.optimizer).strip()}, activations {format_bytes(est.activations).strip()}; "
            f"pretrain --dry-run) but a rank has {what}: {_what_to_change(resolve(cfg, world_size), est)}")


def check_fits(cfg: Config, world_size: int) -> None:
    """ConfigError with :func:`fit_problem`'s line when the layout does not fit this machine (before a run builds
    anything)."""
    problem = fit_problem(cfg, world_size)
    if problem:
        raise ConfigError(problem)
