"""Regional compilation: ``torch.compile`` on each transformer block (``train.compile``), as torchtitan does.

Each block is compiled in place (``nn.Module.compile``), so parameter names, ShardSpecs, megatron-core DDP hooks and
checkpoints are unchanged. Blocks share one compiled graph (dynamo treats module parameters as inputs), so the
compile cost is paid per distinct block shape, not per layer. What the graph holds, by layout:

- One device (the local dispatcher): the whole block, with no graph break. The MoE layer makes no host sync
  (moe_core/permute.py) and reads only ints fixed for the step (the Matryoshka k, drawn in ``MoELayer.set_step``),
  so the recompilations are one per distinct k, for training and again for no-grad evaluation.
- Expert parallelism (and TP > 1, which dispatches through the same all-to-all dispatcher): the dispatcher's
  phases run eagerly (its ``traceable`` is False, so ``moe_core.dispatcher.dispatch_compute_combine`` runs them
  under ``torch.compiler.disable``: all-to-all split sizes are host ints, which would otherwise become graph guards
  and recompile per routing); attention and the router compile around it.
- TP > 1: megatron-core's TP linears launch asynchronous collectives that dynamo does not trace; each is a graph
  break (correct, fewer fusions).
- megatron-core's overlapped parameter all-gather runs from forward pre-hooks on every module, which would break
  every block's graph; ``optim.overlap_param_gather`` is therefore off with compile (launcher/config.py).
The pipeline schedule, the loss and the optimizer stay eager.
"""
from __future__ import annotations

import torch
from torch import nn

from parallel.config import RunConfig

_LIMIT_MARGIN = 4
"""Graphs per block beyond those per k: a last partial micro-batch shape, an evaluation batch shape, spare."""


def compile_blocks(model: nn.Module, cfg: RunConfig) -> None:
    """``torch.compile`` every transformer block of ``model`` (a ``MoETransformer`` stage) in place, with a
    recompile limit that fits one graph per routed k in training and one in evaluation."""
    mm = cfg.moe.matryoshka
    ks = mm.k_max - mm.k_min + 1 if mm.enabled else 1
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * ks + _LIMIT_MARGIN)
    for block in model.blocks().values():  # the MTP modules' blocks too
        block.compile()
