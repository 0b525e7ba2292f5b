"""Regional compilation: ``torch.compile`` on each transformer block (``train.compile``), as torchtitan does.

Each block is compiled in place (``nn.Module.compile``), so parameter names, ShardSpecs, megatron-core DDP hooks and
checkpoints are unchanged. Blocks share one compiled graph (dynamo treats module parameters as inputs), so the
compile cost is paid per distinct block shape, not per layer. Inside a block nothing breaks the graph: the MoE
layer makes no host sync (moe_core/permute.py) and reads only ints fixed for the step (the Matryoshka k, drawn in
``MoELayer.set_step``), so the only recompilations are one per distinct k in ``[k_min, k_max]``, which the
recompile limit below allows for. The pipeline schedule, the loss and the optimizer stay eager.
"""
from __future__ import annotations

import torch
from torch import nn

from parallel.config import RunConfig

_LIMIT_MARGIN = 4
"""Graphs per block beyond one per routed k: train vs eval, an eval k, a last partial micro-batch shape."""


def compile_blocks(model: nn.Module, cfg: RunConfig) -> None:
    """``torch.compile`` every transformer block of ``model`` (a ``MoETransformer`` stage) in place."""
    mm = cfg.moe.matryoshka
    ks = mm.k_max - mm.k_min + 1 if mm.enabled else 1
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, ks + _LIMIT_MARGIN)
    for block in model.layers.values():
        block.compile()
