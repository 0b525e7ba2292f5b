"""Multi-token prediction (MTP, DeepSeek-V3 technical report arXiv 2412.19437 section 2.2), single device.

``model.mtp_num_layers`` = K sequential modules after the main model. With ``h^0 = norm(h_L)`` (the main model's
final-normed hidden states, the ones its LM head reads, as megatron-core's decoder output) and ``t`` the input
tokens, module k = 1..K computes at every position i::

    h'^k_i = eh_proj( cat[ enorm(Emb(t_{i+k})), hnorm(h^{k-1}_i) ] )      # [2D] -> [D]
    h^k_i  = norm( Block_k(h'^k_i) )                                       # one transformer block, its own norm
    P^k_i  = softmax( lm_head(h^k_i) )                                     # predicts t_{i+k+1}

The concatenation puts the EMBEDDING FIRST: the paper's equation 21 writes ``[RMSNorm(h); RMSNorm(Emb)]``, but the
official DeepSeek-V3 weights (and vLLM's / SGLang's ``deepseek_mtp``, megatron-core) use ``[enorm(emb); hnorm(h)]``,
which is what the released ``eh_proj`` expects. ``Emb`` and ``lm_head`` are the main model's (shared, not copies
in the single-device model). ``Block_k`` is the main model's ``Block`` at layer index ``num_layers + k - 1``, always
an MoE block (DeepSeek-V3's MTP layer is), so Matryoshka draws and MoE statistics key on that index. The next depth
reads ``h^k`` (normed, as megatron-core chains its MTP layers; vLLM's multi-step drafting feeds the un-normed block
output back instead; the official checkpoint has K = 1, where the two agree).

Shifting: depth k reads ``t_{i+k}`` = ``tokens[i + k]`` and predicts ``labels[i + k]`` (``labels[j] = t_{j+1}``).
Positions ``i >= S - k`` have no target inside the sample: their input token is filled with 0 and their loss mask
is 0 (:func:`shift_left`), so the sequence keeps its length S (the same RoPE tables, shapes and per-sequence
routing statistics as the main model; causal attention keeps the filled tail out of every earlier position; the
tail still takes part in the MTP block's routing, its statistics and aux losses, as in megatron-core).

Parameter names (checkpoint keys, stable; the Hugging Face converter maps them to DeepSeek-V3's
``model.layers.{num_hidden_layers + k - 1}.{enorm, hnorm, eh_proj, shared_head.norm, ...}``): ``mtp.{k-1}.enorm``,
``mtp.{k-1}.hnorm``, ``mtp.{k-1}.eh_proj``, ``mtp.{k-1}.block.*`` (the ``Block``'s own names: ``input_layernorm``,
``self_attn``, ``post_attention_layernorm``, ``mlp``) and ``mtp.{k-1}.norm``.

The loss (``launcher/train/token_loss.py`` reduces it over the global batch): depth k's token-weighted mean
cross-entropy ``L_k = sum(mask_k * ce_k) / sum(mask_k)`` over the step's global batch, and
``L_MTP = mtp_loss_coeff * mean_k L_k``.

Shapes: B batch, S sequence, D hidden, V vocab. Parallelism is the caller's: ``eh_proj`` comes from the
:class:`~moe_core.layers.LayerFactory` (column-parallel with its output gathered under TP, as megatron-core; under
sequence parallelism its input is the gathered sequence and its output is scattered back to the token shard).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from moe_core.config import MoEConfig
from moe_core.layers import LayerFactory, RMSNorm
from moe_core.matryoshka import KSchedule
from moe_core.model_config import ModelConfig
from moe_core.recompute import maybe_checkpointed


def shift_left(x_BS: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` shifted k positions to the left along the sequence, the last k positions filled with 0:
    ``out[:, i] = x[:, i + k]`` for ``i < S - k``. Same dtype and device. ValueError unless 0 <= k < S."""
    if not 0 <= k < x_BS.shape[1]:
        raise ValueError(f"shift_left: k={k} must be in [0, {x_BS.shape[1]}) (the sequence length)")
    return torch.cat([x_BS[:, k:], x_BS.new_zeros(x_BS.shape[0], k)], dim=1)


def depth_targets(labels_BS: torch.Tensor, loss_mask_BS: torch.Tensor | None, depth: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, float32 loss mask) of MTP depth ``depth`` (1-based): ``labels[i + depth]`` and its mask (all ones
    without ``loss_mask_BS``), 0 where ``i + depth`` falls outside the sample."""
    mask = torch.ones(labels_BS.shape, dtype=torch.float32, device=labels_BS.device) if loss_mask_BS is None \
        else loss_mask_BS.to(torch.float32)
    return shift_left(labels_BS, depth), shift_left(mask, depth)


class MTPModule(nn.Module):
    """One MTP depth: ``norm(block(eh_proj(cat[enorm(emb), hnorm(h)])))``, [B, S, D] x [B, S, D] -> [B, S, D]."""

    def __init__(self, m: ModelConfig, moe: MoEConfig, layer_idx: int, factory: LayerFactory,
                 k_schedule: KSchedule, block_cls: Callable[..., nn.Module]):
        super().__init__()
        self.enorm = RMSNorm(m.hidden_size, m.norm_eps)
        self.hnorm = RMSNorm(m.hidden_size, m.norm_eps)
        self.sequence_gather, self.sequence_scatter = factory.sequence_gather(), factory.sequence_scatter()
        self.eh_proj = factory.column(2 * m.hidden_size, m.hidden_size, gather_output=True)
        self.block = block_cls(m, moe, layer_idx, factory, k_schedule)
        self.norm = RMSNorm(m.hidden_size, m.norm_eps)

    def forward(self, h_BSD: torch.Tensor, emb_BSD: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.enorm(emb_BSD), self.hnorm(h_BSD)], dim=-1)
        x = self.sequence_scatter(self.eh_proj(self.sequence_gather(x)))
        full = self.block.recompute.block  # train.recompute=full: the block is one region, as in the main stack
        return self.norm(maybe_checkpointed(full, self.block, x, cos, sin, replaying=True))


class MultiTokenPrediction(nn.ModuleList):
    """The K MTP modules (``mtp.{k-1}``), run in sequence after the main model."""

    def __init__(self, m: ModelConfig, moe: MoEConfig, factory: LayerFactory, k_schedule: KSchedule,
                 block_cls: Callable[..., nn.Module]):
        super().__init__([MTPModule(m, moe, idx, factory, k_schedule, block_cls) for idx in m.mtp_layer_indices])

    def forward(self, h_BSD: torch.Tensor, tokens_BS: torch.Tensor, embed: nn.Module, head: nn.Module,
                cos: torch.Tensor, sin: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every depth (list of K [B, S, V] tensors; V/tp under TP) from the main model's final-normed
        hidden states ``h_BSD``, its input ``tokens_BS`` (int64) and the shared ``embed`` / ``head``."""
        logits = []
        for depth, module in enumerate(self, start=1):
            h_BSD = module(h_BSD, embed(shift_left(tokens_BS, depth)), cos, sin)
            logits.append(head(h_BSD))
        return logits
